package loadtest

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"strings"
)

// vmHistogram is a VictoriaMetrics histogram as /metrics exposes it: counts per vmrange
// bucket ("1.000e-04...1.136e-04"), summed over every series of one metric name.
type vmHistogram map[string]float64

// parseVMHistogram reads the buckets of the histogram called name from a Prometheus text
// exposition, adding up the series of all label sets.
func parseVMHistogram(r io.Reader, name string) (vmHistogram, error) {
	h := vmHistogram{}
	prefix := name + "_bucket{"
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, prefix) {
			continue
		}
		i := strings.Index(line, `vmrange="`)
		if i < 0 {
			continue
		}
		rest := line[i+len(`vmrange="`):]
		j := strings.IndexByte(rest, '"')
		if j < 0 {
			return nil, fmt.Errorf("parse histogram %s: unterminated vmrange in %q", name, line)
		}
		vmrange := rest[:j]
		k := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[k+1:], 64)
		if err != nil {
			return nil, fmt.Errorf("parse histogram %s: value of %q: %w", name, line, err)
		}
		h[vmrange] += v
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read metrics: %w", err)
	}
	return h, nil
}

// sub returns the counts of h that were added since earlier.
func (h vmHistogram) sub(earlier vmHistogram) vmHistogram {
	out := vmHistogram{}
	for k, v := range h {
		if d := v - earlier[k]; d > 0 {
			out[k] = d
		}
	}
	return out
}

// count returns the number of observations.
func (h vmHistogram) count() float64 {
	n := 0.0
	for _, v := range h {
		n += v
	}
	return n
}

// quantile returns the upper bound of the bucket that holds quantile q (0..1), in seconds:
// an upper estimate, never an underestimate. NaN when h is empty.
func (h vmHistogram) quantile(q float64) (float64, error) {
	type bucket struct{ lo, hi, n float64 }
	var bs []bucket
	for k, v := range h {
		lo, hi, ok := strings.Cut(k, "...")
		if !ok {
			return 0, fmt.Errorf("parse vmrange %q: want lo...hi", k)
		}
		l, err1 := strconv.ParseFloat(lo, 64)
		u, err2 := strconv.ParseFloat(hi, 64)
		if err1 != nil || err2 != nil {
			return 0, fmt.Errorf("parse vmrange %q: bounds are not numbers", k)
		}
		bs = append(bs, bucket{l, u, v})
	}
	total := h.count()
	if total == 0 {
		return math.NaN(), nil
	}
	sort.Slice(bs, func(i, j int) bool { return bs[i].lo < bs[j].lo })
	want := q * total
	cum := 0.0
	for _, b := range bs {
		cum += b.n
		if cum >= want {
			return b.hi, nil
		}
	}
	return bs[len(bs)-1].hi, nil
}
