package loadtest

import (
	"math"
	"strings"
	"testing"
)

const metricsSample = `# a comment
policy_kernel_request_duration_seconds_bucket{route="/a",agent="x",vmrange="1.000e-04...1.136e-04"} 90
policy_kernel_request_duration_seconds_bucket{route="/b",agent="x",vmrange="1.000e-04...1.136e-04"} 5
policy_kernel_request_duration_seconds_bucket{route="/a",agent="x",vmrange="8.799e-04...1.000e-03"} 4
policy_kernel_request_duration_seconds_bucket{route="/a",agent="x",vmrange="4.642e-03...5.275e-03"} 1
policy_kernel_request_duration_seconds_sum{route="/a",agent="x"} 0.02
policy_kernel_request_duration_seconds_count{route="/a",agent="x"} 95
policy_kernel_requests_total{route="/a",agent="x",status="allow"} 95
other_bucket{vmrange="1...2"} 7
`

func TestVMHistogram(t *testing.T) {
	h, err := parseVMHistogram(strings.NewReader(metricsSample), "policy_kernel_request_duration_seconds")
	if err != nil {
		t.Fatal(err)
	}
	if h.count() != 100 {
		t.Fatalf("count = %g, want 100 (series of both routes added up)", h.count())
	}
	f := func(q, want float64) {
		t.Helper()
		got, err := h.quantile(q)
		if err != nil {
			t.Fatal(err)
		}
		if math.Abs(got-want) > 1e-12 {
			t.Errorf("quantile(%g) = %g, want %g", q, got, want)
		}
	}
	f(0.5, 1.136e-04)
	f(0.95, 1.136e-04)
	f(0.99, 1.000e-03)
	f(1, 5.275e-03)
	// Only what was added since the earlier scrape counts.
	earlier := vmHistogram{"1.000e-04...1.136e-04": 95}
	d := h.sub(earlier)
	if d.count() != 5 {
		t.Fatalf("sub count = %g, want 5", d.count())
	}
	if q, _ := d.quantile(0.5); q != 1.000e-03 {
		t.Errorf("sub quantile(0.5) = %g, want 1e-3", q)
	}
	if q, _ := (vmHistogram{}).quantile(0.99); !math.IsNaN(q) {
		t.Errorf("quantile of an empty histogram = %g, want NaN", q)
	}
}

func TestVMHistogramErrors(t *testing.T) {
	for _, c := range []struct{ text, want string }{
		{`m_bucket{vmrange="1...2} 3`, "unterminated bucket label"},
		{`m_bucket{vmrange="1...2"} x`, "value of"},
	} {
		if _, err := parseVMHistogram(strings.NewReader(c.text), "m"); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("parse %q: err = %v, want %q", c.text, err, c.want)
		}
	}
	h, err := parseVMHistogram(strings.NewReader(`m_bucket{other="1"} 3`), "m")
	if err != nil || len(h) != 0 {
		t.Errorf("a bucket without vmrange or le: %v, %v; want it skipped", h, err)
	}
	for _, bad := range []vmHistogram{{"12": 1}, {"a...2": 1}} {
		if _, err := bad.quantile(0.5); err == nil {
			t.Errorf("quantile of %v succeeded", bad)
		}
	}
}

const leSample = `policy_kernel_request_duration_seconds_bucket{route="/a",agent="x",le="0.0005"} 60
policy_kernel_request_duration_seconds_bucket{route="/a",agent="x",le="0.001"} 97
policy_kernel_request_duration_seconds_bucket{route="/a",agent="x",le="0.0025"} 99
policy_kernel_request_duration_seconds_bucket{route="/a",agent="x",le="+Inf"} 100
policy_kernel_request_duration_seconds_bucket{route="/b",agent="x",le="0.0005"} 40
policy_kernel_request_duration_seconds_bucket{route="/b",agent="x",le="0.001"} 100
policy_kernel_request_duration_seconds_bucket{route="/b",agent="x",le="0.0025"} 100
policy_kernel_request_duration_seconds_bucket{route="/b",agent="x",le="+Inf"} 100
policy_kernel_request_duration_seconds_count{route="/b",agent="x"} 100
`

func TestLEHistogram(t *testing.T) {
	h, err := parseVMHistogram(strings.NewReader(leSample), "policy_kernel_request_duration_seconds")
	if err != nil {
		t.Fatal(err)
	}
	if h.count() != 200 {
		t.Fatalf("count = %g, want 200", h.count())
	}
	f := func(h vmHistogram, q, want float64) {
		t.Helper()
		got, err := h.quantile(q)
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Errorf("quantile(%g) = %g, want %g", q, got, want)
		}
	}
	f(h, 0.5, 0.0005)
	f(h, 0.9, 0.001)
	f(h, 0.99, 0.0025)
	// One of the 200 took longer than 2.5ms: the maximum is only known to be finite.
	f(h, 1, math.Inf(1))
	f(vmHistogram{"le:0.001": 1, "le:+Inf": 3}, 0.9, math.Inf(1))
	// Since an earlier scrape.
	earlier := vmHistogram{"le:0.0005": 100, "le:0.001": 150, "le:0.0025": 150, "le:+Inf": 150}
	f(h.sub(earlier), 0.5, 0.001)
	if top := h.topBound(); top != 0.0025 {
		t.Errorf("top bound %g, want 0.0025", top)
	}
	if top := (vmHistogram{"1.0e-3...2.0e-3": 1}).topBound(); top != 0.002 {
		t.Errorf("vmrange top bound %g", top)
	}
	if q, _ := (vmHistogram{"le:+Inf": 0}).quantile(0.5); !math.IsNaN(q) {
		t.Errorf("empty le histogram: %g", q)
	}
	for _, bad := range []vmHistogram{{"le:+Inf": 1, "1...2": 1}, {"le:+Inf": 1, "le:x": 1}} {
		if _, err := bad.quantile(0.5); err == nil {
			t.Errorf("quantile of %v succeeded", bad)
		}
	}
}
