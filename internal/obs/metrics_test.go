package obs

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"strings"
	"testing"

	"github.com/VictoriaMetrics/metrics"
)

// TestWriteMetrics checks the exposition that promtool lints: every family once, with HELP
// and, when described, TYPE, its samples together even when the sets interleave them.
func TestWriteMetrics(t *testing.T) {
	s := metrics.NewSet()
	s.NewCounter(`x_requests_total{route="b"}`).Add(2)
	s.NewPrometheusHistogramExt(`x_duration_seconds{route="a"}`, []float64{0.1, 1}).Update(0.5)
	s.NewCounter(`x_requests_total{route="a"}`).Inc()
	s.NewGauge(`x_other`, func() float64 { return 3 })
	s2 := metrics.NewSet()
	s2.NewCounter(`x_requests_total{route="c"}`).Inc() // the same family from another set
	fams := familyIndex([]Family{
		{Name: "x_requests_total", Type: "counter", Help: "Requests.\nBy route \\ agent."},
		{Name: "x_duration_seconds", Type: "histogram", Help: "Durations."},
		{Name: "go_goroutines", Help: "Overridden."},
	})
	var buf bytes.Buffer
	WriteMetrics(&buf, fams, func() []*metrics.Set { return []*metrics.Set{s, s2} }, false)
	want := `# HELP x_duration_seconds Durations.
# TYPE x_duration_seconds histogram
x_duration_seconds_bucket{route="a",le="0.1"} 0
x_duration_seconds_bucket{route="a",le="1"} 1
x_duration_seconds_bucket{route="a",le="+Inf"} 1
x_duration_seconds_sum{route="a"} 0.5
x_duration_seconds_count{route="a"} 1
# HELP x_other Process metric.
x_other 3
# HELP x_requests_total Requests.\nBy route \\ agent.
# TYPE x_requests_total counter
x_requests_total{route="a"} 1
x_requests_total{route="b"} 2
x_requests_total{route="c"} 1
`
	if buf.String() != want {
		t.Fatalf("got:\n%s\nwant:\n%s", buf.String(), want)
	}
	if fams["go_goroutines"].Help != "Overridden." {
		t.Fatal("a process's own description must win")
	}

	buf.Reset()
	WriteMetrics(&buf, fams, nil, true)
	out := buf.String()
	for _, want := range []string{"# HELP go_goroutines Overridden.\ngo_goroutines ", "# HELP process_cpu_seconds_total Total user and system CPU time", "# HELP go_gc_forced_count Go runtime metric."} {
		if !strings.Contains(out, want) {
			t.Errorf("runtime metrics lack %q", want)
		}
	}
	if strings.Contains(out, "# TYPE go_") || strings.Contains(out, "# TYPE process_") {
		t.Error("runtime families must stay untyped")
	}
	if _, err := exec.LookPath("promtool"); err == nil {
		cmd := exec.Command("promtool", "check", "metrics")
		cmd.Stdin = strings.NewReader(out)
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("promtool check metrics: %v\n%s", err, b)
		}
	}
}

func TestNoMetrics(t *testing.T) {
	h := Handler(Options{NoMetrics: true})
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if rec.Code != http.StatusNotFound {
		t.Fatalf("/metrics with NoMetrics: %d", rec.Code)
	}
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/health/live", nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("/health/live with NoMetrics: %d", rec.Code)
	}
}
