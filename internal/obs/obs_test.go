package obs

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/VictoriaMetrics/metrics"
)

func TestLabel(t *testing.T) {
	for in, want := range map[string]string{"a": `"a"`, `q"x`: `"q\"x"`, `b\s`: `"b\\s"`, "n\nl": `"n\nl"`} {
		if got := Label(in); got != want {
			t.Errorf("Label(%q) = %s, want %s", in, got, want)
		}
	}
}

func get(t *testing.T, s *Server, path string) (int, string) {
	t.Helper()
	r, err := http.Get("http://" + s.Addr() + path)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Body.Close()
	b, _ := io.ReadAll(r.Body)
	return r.StatusCode, string(b)
}

func TestHandler(t *testing.T) {
	set := metrics.NewSet()
	set.NewCounter(`obs_test_total{x="1"}`).Add(3)
	ready := false
	s, err := Listen("127.0.0.1:0", Handler(Options{
		Sets:           func() []*metrics.Set { return []*metrics.Set{set} },
		Ready:          func() (bool, any) { return ready, map[string]bool{"ready": ready} },
		ProcessMetrics: true,
	}))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if code, body := get(t, s, "/metrics"); code != 200 || !strings.Contains(body, `obs_test_total{x="1"} 3`) || !strings.Contains(body, "process_resident_memory_bytes") {
		t.Fatalf("%d %s", code, body)
	}
	if code, body := get(t, s, "/health/ready"); code != 503 || !strings.Contains(body, `"ready":false`) {
		t.Fatalf("%d %s", code, body)
	}
	ready = true
	if code, _ := get(t, s, "/health/ready"); code != 200 {
		t.Fatal(code)
	}
	if code, body := get(t, s, "/health/live"); code != 200 || !strings.Contains(body, "live") {
		t.Fatal(code, body)
	}
	// The metrics listener serves neither the config nor profiles: they are the admin's.
	for _, p := range []string{"/debug/pprof/cmdline", "/config"} {
		if code, _ := get(t, s, p); code != 404 {
			t.Fatalf("%s on the metrics listener: %d", p, code)
		}
	}
	a, err := Listen("127.0.0.1:0", AdminHandler(AdminOptions{Pprof: true}))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if code, _ := get(t, a, "/debug/pprof/cmdline"); code != 200 {
		t.Fatal(code)
	}
	if code, _ := get(t, a, "/metrics"); code != 404 {
		t.Fatalf("/metrics on the admin listener: %d", code)
	}
}

func TestHandlerDefaults(t *testing.T) {
	s, err := Listen("127.0.0.1:0", Handler(Options{}))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if code, _ := get(t, s, "/health/ready"); code != 200 {
		t.Fatal("no readiness function means ready")
	}
	if code, _ := get(t, s, "/debug/pprof/"); code != 404 {
		t.Fatal("pprof is not on the metrics listener")
	}
	admin, err := Listen("127.0.0.1:0", AdminHandler(AdminOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	if code, _ := get(t, admin, "/debug/pprof/"); code != 404 {
		t.Fatal("pprof must be off unless asked for")
	}
	if code, body := get(t, s, "/metrics"); code != 200 || body != "" {
		t.Fatalf("%d %q", code, body)
	}
	if _, err := Listen("256.1.1.1:0", Handler(Options{})); err == nil {
		t.Fatal("bad address accepted")
	}
}

func TestConfigEndpoint(t *testing.T) {
	s, err := Listen("127.0.0.1:0", AdminHandler(AdminOptions{Config: func() any { return map[string]string{"version": "v1"} }}))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if code, body := get(t, s, "/config"); code != 200 || strings.TrimSpace(body) != `{"version":"v1"}` {
		t.Fatalf("/config: %d %s", code, body)
	}
	r, err := http.Post("http://"+s.Addr()+"/config", "application/json", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	r.Body.Close()
	if r.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("POST /config: %d, want 405", r.StatusCode)
	}
	none, err := Listen("127.0.0.1:0", AdminHandler(AdminOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	defer none.Close()
	if code, _ := get(t, none, "/config"); code != 404 {
		t.Fatalf("/config without Options.Config: %d", code)
	}
}
