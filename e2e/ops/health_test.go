package ops

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

// grpcHealth asks the kernel's gRPC health service what Envoy's health checker would.
func grpcHealth(t *testing.T, addr string) healthpb.HealthCheckResponse_ServingStatus {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	r, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: "envoy.service.ext_proc.v3.ExternalProcessor"})
	if err != nil {
		return healthpb.HealthCheckResponse_UNKNOWN
	}
	return r.GetStatus()
}

type readyBody struct {
	Status        string   `json:"status"`
	NotReady      []string `json:"not_ready"`
	ConfigVersion string   `json:"config_version"`
	Agents        map[string]struct {
		Healthy bool `json:"healthy"`
	} `json:"agents"`
	Draining bool `json:"draining"`
}

func ready(t *testing.T, e *testenv.Env) (int, readyBody) {
	t.Helper()
	code, body := e.Get(t, "/health/ready")
	var b readyBody
	if code != 0 {
		if err := json.Unmarshal([]byte(body), &b); err != nil {
			t.Fatalf("/health/ready body %q: %v", body, err)
		}
	}
	return code, b
}

// TestReadinessFollowsAgent kills the agent and starts it again: /health/ready, the gRPC
// health service and policy_kernel_agent_health follow, the JSON body names the agent that is
// down, requests are denied meanwhile and served again after.
func TestReadinessFollowsAgent(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: fmt.Sprintf(kernelYAML, "h1")})
	c := e.Dial(t, envoyConfig)
	code, b := ready(t, e)
	if code != 200 || b.Status != "ready" || len(b.NotReady) != 0 || !b.Agents["default-agent"].Healthy || !strings.HasPrefix(b.ConfigVersion, "h1-") {
		t.Fatalf("ready: %d %+v", code, b)
	}
	if st := grpcHealth(t, e.KernelAddr); st != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("gRPC health %v", st)
	}
	if c, live := e.Get(t, "/health/live"); c != 200 || !strings.Contains(live, "live") {
		t.Fatalf("live %d %s", c, live)
	}

	e.Agent.Kill()
	testenv.WaitFor(t, 5*time.Second, "not ready", func() bool { c, _ := ready(t, e); return c == 503 })
	_, b = ready(t, e)
	if b.Status != "not ready" || b.Agents["default-agent"].Healthy || len(b.NotReady) != 1 ||
		b.NotReady[0] != fmt.Sprintf("agent %q is not reachable at %q", "default-agent", e.AgentSock) {
		t.Fatalf("not ready body %+v", b)
	}
	testenv.WaitFor(t, 5*time.Second, "gRPC NOT_SERVING", func() bool {
		return grpcHealth(t, e.KernelAddr) == healthpb.HealthCheckResponse_NOT_SERVING
	})
	if _, m := e.Get(t, "/metrics"); !strings.Contains(m, `policy_kernel_agent_health{agent="default-agent"} 0`) {
		t.Fatal("policy_kernel_agent_health does not show the agent down")
	}
	r := do(t, c, [2]string{"x-request-id", "req-while-down"})
	if r.Status != 500 || r.Forwarded != nil {
		t.Fatalf("agent down: %d forwarded %v", r.Status, r.Forwarded != nil)
	}
	if c, _ := e.Get(t, "/health/live"); c != 200 {
		t.Fatal("liveness must not follow the agent")
	}

	e.StartAgent(t)
	testenv.WaitFor(t, 10*time.Second, "ready again", func() bool { c, _ := ready(t, e); return c == 200 })
	testenv.WaitFor(t, 5*time.Second, "gRPC SERVING", func() bool {
		return grpcHealth(t, e.KernelAddr) == healthpb.HealthCheckResponse_SERVING
	})
	if r := do(t, c); r.Status != 200 || testenv.Header(r.Headers, "x-config-version") != "h1" {
		t.Fatalf("after the agent came back: %d", r.Status)
	}
	if _, m := e.Get(t, "/metrics"); !strings.Contains(m, `policy_kernel_agent_health{agent="default-agent"} 1`) {
		t.Fatal("policy_kernel_agent_health does not show the agent back")
	}

	// The failure was logged with the request's id at the top level, and the transitions at
	// warn and info.
	var sawRequest, sawDown, sawUp bool
	for _, l := range logLines(t, e.Kernel.Logs.String()) {
		sawRequest = sawRequest || (l["request_id"] == "req-while-down" && l["level"] == "error")
		sawDown = sawDown || l["message"] == "agent unhealthy"
		sawUp = sawUp || l["message"] == "agent healthy"
	}
	if !sawRequest || !sawDown || !sawUp {
		t.Fatalf("logs: request %v, down %v, up %v\n%s", sawRequest, sawDown, sawUp, e.Kernel.Logs.String())
	}
}

// logLines parses JSON log lines and checks the fields of the specification's §7.2.
func logLines(t *testing.T, logs string) []map[string]any {
	t.Helper()
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(logs))
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("log line is not JSON: %q", sc.Text())
		}
		for _, k := range []string{"timestamp", "level", "component", "message"} {
			if _, ok := m[k]; !ok {
				t.Fatalf("log line without %s: %q", k, sc.Text())
			}
		}
		for k := range m {
			switch k {
			case "timestamp", "level", "component", "message", "request_id", "metadata":
			default:
				t.Fatalf("log line with a top-level field %q outside §7.2: %q", k, sc.Text())
			}
		}
		out = append(out, m)
	}
	return out
}

// TestLogsQuietOnHotPath sends requests at log level info and finds no line for them in either
// process's log, and no secret anywhere.
func TestLogsQuietOnHotPath(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: fmt.Sprintf(kernelYAML, "l1")})
	c := e.Dial(t, envoyConfig)
	kn, an := len(logLines(t, e.Kernel.Logs.String())), len(logLines(t, e.Agent.Logs.String()))
	for i := 0; i < 100; i++ {
		if r := do(t, c); r.Status != 200 {
			t.Fatalf("status %d", r.Status)
		}
		do(t, c, [2]string{"x-api-key", "wrong-key-value"})
	}
	if k, a := len(logLines(t, e.Kernel.Logs.String())), len(logLines(t, e.Agent.Logs.String())); k != kn || a != an {
		t.Fatalf("200 requests logged %d kernel and %d agent lines:\n%s\n%s", k-kn, a-an, e.Kernel.Logs.String(), e.Agent.Logs.String())
	}
	for _, l := range []string{e.Kernel.Logs.String(), e.Agent.Logs.String()} {
		if strings.Contains(l, "demo-key-123") || strings.Contains(l, "wrong-key-value") {
			t.Fatal("an API key reached a log")
		}
	}
}

// TestPprof shows that /debug/pprof/ (profiles, goroutine dumps, the command line) is off by
// default on both processes while the probes and metrics stay, and that pprof_enabled: true
// serves it on the admin listener, never on the metrics listener.
func TestPprof(t *testing.T) {
	adminYAML := agentYAML + "    admin_address: \"{{AGENT_ADMIN}}\"\n"
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: adminYAML, KernelYAML: fmt.Sprintf(kernelYAML, "p1")})
	for _, p := range []string{"/debug/pprof/", "/debug/pprof/cmdline", "/debug/pprof/goroutine?debug=2"} {
		for _, get := range []func(testing.TB, string) (int, string){e.Get, e.GetAdmin, e.GetAgent, e.GetAgentAdmin} {
			if code, _ := get(t, p); code != 404 {
				t.Fatalf("%s by default: %d, want 404", p, code)
			}
		}
	}
	for _, p := range []string{"/metrics", "/health/live", "/health/ready"} {
		if code, _ := e.Get(t, p); code != 200 {
			t.Fatalf("kernel %s with pprof off: %d", p, code)
		}
		if code, _ := e.GetAgent(t, p); code != 200 {
			t.Fatalf("agent %s with pprof off: %d", p, code)
		}
	}
	on := fmt.Sprintf(kernelYAML, "p2") + "  observability:\n    pprof_enabled: true\n"
	e2 := testenv.StartEnv(t, testenv.Options{AgentYAML: adminYAML + "    pprof_enabled: true\n", KernelYAML: on})
	if code, body := e2.GetAdmin(t, "/debug/pprof/"); code != 200 || !strings.Contains(body, "goroutine") {
		t.Fatalf("pprof on: %d", code)
	}
	if code, _ := e2.GetAgentAdmin(t, "/debug/pprof/cmdline"); code != 200 {
		t.Fatalf("agent pprof on: %d", code)
	}
	if code, _ := e2.Get(t, "/debug/pprof/"); code != 404 {
		t.Fatalf("kernel pprof on the metrics listener: %d", code)
	}
	if code, _ := e2.GetAgent(t, "/debug/pprof/cmdline"); code != 404 {
		t.Fatalf("agent pprof on the metrics listener: %d", code)
	}
}
