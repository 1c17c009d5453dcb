package testenv

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
)

// Metric returns the value of one series in a Prometheus text exposition, written the way it
// appears there (`name{label="v"}`), and 0 when the series is absent, as a counter that was
// never incremented may be.
func Metric(body, series string) float64 {
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err == nil {
				return f
			}
		}
	}
	return 0
}

// SumMetrics adds up every series whose text starts with prefix, such as
// `policy_kernel_requests_total{route="/x"` for a route's requests of every status.
func SumMetrics(body, prefix string) float64 {
	sum := 0.0
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, prefix) || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		if f, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			sum += f
		}
	}
	return sum
}

// Goroutines reads the goroutine count from a /debug/pprof/goroutine?debug=1 body.
func Goroutines(t testing.TB, pprofBody string) int {
	t.Helper()
	line, _, _ := strings.Cut(pprofBody, "\n")
	v, ok := strings.CutPrefix(line, "goroutine profile: total ")
	if !ok {
		t.Fatalf("not a goroutine profile: %.200q", pprofBody)
	}
	n, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil {
		t.Fatalf("goroutine profile header %q: %v", line, err)
	}
	return n
}

// RSSKiB returns a process's resident set size in KiB, from /proc.
func RSSKiB(pid int) (int, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) == 0 {
				break
			}
			return strconv.Atoi(f[0])
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}
