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

// vmHistogram is a histogram as /metrics exposes it, summed over every series of one metric
// name: either VictoriaMetrics' vmrange buckets ("1.000e-04...1.136e-04" → count in it), or
// Prometheus' cumulative le buckets, kept under keys "le:<bound>".
type vmHistogram map[string]float64

const lePrefix = "le:"

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
		key, label := "", `vmrange="`
		i := strings.Index(line, label)
		if i < 0 {
			key, label = lePrefix, `le="`
			if i = strings.Index(line, label); i < 0 {
				continue
			}
		}
		rest := line[i+len(label):]
		j := strings.IndexByte(rest, '"')
		if j < 0 {
			return nil, fmt.Errorf("parse histogram %s: unterminated bucket label in %q", name, line)
		}
		vmrange := key + rest[:j]
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
	if n, ok := h[lePrefix+"+Inf"]; ok {
		return n
	}
	n := 0.0
	for k, v := range h {
		if !strings.HasPrefix(k, lePrefix) {
			n += v
		}
	}
	return n
}

// quantile returns the upper bound of the bucket that holds quantile q (0..1), in seconds:
// an upper estimate, never an underestimate. NaN when h is empty.
func (h vmHistogram) quantile(q float64) (float64, error) {
	if _, ok := h[lePrefix+"+Inf"]; ok {
		return h.leQuantile(q)
	}
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

// leQuantile is quantile for cumulative le buckets: the smallest bound whose count reaches
// quantile q; +Inf when only the last bucket does.
func (h vmHistogram) leQuantile(q float64) (float64, error) {
	type bucket struct{ le, n float64 }
	var bs []bucket
	for k, v := range h {
		b, ok := strings.CutPrefix(k, lePrefix)
		if !ok {
			return 0, fmt.Errorf("histogram mixes le and vmrange buckets (%q)", k)
		}
		le, err := strconv.ParseFloat(b, 64)
		if err != nil {
			return 0, fmt.Errorf("parse le bucket %q: %w", b, err)
		}
		bs = append(bs, bucket{le, v})
	}
	total := h.count()
	if total == 0 {
		return math.NaN(), nil
	}
	sort.Slice(bs, func(i, j int) bool { return bs[i].le < bs[j].le })
	for _, b := range bs {
		if b.n >= q*total {
			return b.le, nil
		}
	}
	return math.Inf(1), nil
}

// topBound returns the largest finite bucket bound of h, 0 when it has none.
func (h vmHistogram) topBound() float64 {
	top := 0.0
	for k := range h {
		var b string
		if le, ok := strings.CutPrefix(k, lePrefix); ok {
			b = le
		} else if _, hi, ok := strings.Cut(k, "..."); ok {
			b = hi
		}
		if v, err := strconv.ParseFloat(b, 64); err == nil && !math.IsInf(v, 0) && v > top {
			top = v
		}
	}
	return top
}
