package testenv

import (
	"os"
	"testing"
)

const exposition = `# HELP x
policy_kernel_requests_total{route="/a",agent="x",status="allow"} 3
policy_kernel_requests_total{route="/a",agent="x",status="deny"} 2
policy_kernel_requests_total{route="/ab",agent="x",status="allow"} 7
go_goroutines 12
bad_line
policy_kernel_requests_total{route="/a",agent="x",status="error"} not-a-number
`

func TestMetric(t *testing.T) {
	f := func(series string, want float64) {
		t.Helper()
		if got := Metric(exposition, series); got != want {
			t.Errorf("Metric(%s) = %v, want %v", series, got, want)
		}
	}
	f("go_goroutines", 12)
	f(`policy_kernel_requests_total{route="/a",agent="x",status="deny"}`, 2)
	f("absent", 0)
	f(`policy_kernel_requests_total{route="/a",agent="x",status="error"}`, 0)
	if got := SumMetrics(exposition, `policy_kernel_requests_total{route="/a",`); got != 5 {
		t.Errorf("SumMetrics = %v, want 5", got)
	}
	if got := SumMetrics(exposition, "bad_line"); got != 0 {
		t.Errorf("SumMetrics of a line without a value = %v", got)
	}
}

func TestGoroutinesAndRSS(t *testing.T) {
	if n := Goroutines(t, "goroutine profile: total 42\n1 @ 0x1\n"); n != 42 {
		t.Fatalf("Goroutines = %d", n)
	}
	if kib, err := RSSKiB(os.Getpid()); err != nil || kib <= 0 {
		t.Fatalf("RSSKiB = %d, %v", kib, err)
	}
	if _, err := RSSKiB(-1); err == nil {
		t.Fatal("RSSKiB of no process")
	}
}
