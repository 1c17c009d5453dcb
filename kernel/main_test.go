package kernel

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/policy-engine/policy-engine/agent"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/testenv"
	"github.com/policy-engine/policy-engine/internal/yamlconf"
	_ "github.com/policy-engine/policy-engine/policies/all"
)

const mainAgentYAML = `agent_core:
  name: default-agent
  socket_path: %s
  policies:
    config:
      apiKeyAuth:
        keys: [{key: secret-1, user_id: alice}]
`

const mainKernelYAML = `policy_kernel:
  agents:
    - name: default-agent
      socket_path: %s
      health_check_interval_ms: 100
  route_policies:
    - route_name: /api/v1/users
      request_policy_chain:
        - policy: apiKeyAuth
      response_policy_chain:
        - policy: addSecurityHeaders
%s
`

type env struct {
	dir, sock, kernelCfg, addr, metrics string
	agent, kernel                       *testenv.InProc
	conn                                *grpc.ClientConn
}

// startEnv runs an agent and a kernel in the test's process, the kernel's config being
// mainKernelYAML with extraKernel added to its policy_kernel section.
func startEnv(t *testing.T, extraKernel string) *env {
	t.Helper()
	e := &env{dir: t.TempDir(), addr: testenv.FreeAddr(t), metrics: testenv.FreeAddr(t)}
	e.sock = filepath.Join(e.dir, "agent.sock")
	agentCfg := filepath.Join(e.dir, "agent.yaml")
	os.WriteFile(agentCfg, []byte(fmt.Sprintf(mainAgentYAML, e.sock)), 0o600)
	e.kernelCfg = filepath.Join(e.dir, "kernel.yaml")
	os.WriteFile(e.kernelCfg, []byte(fmt.Sprintf(mainKernelYAML, e.sock, extraKernel)), 0o600)
	e.agent = testenv.RunMain(t, agent.Main, "--config", agentCfg)
	testenv.WaitDial(t, e.agent, "unix", e.sock)
	e.kernel = testenv.RunMain(t, Main, "--config", e.kernelCfg, "--listen", e.addr, "--metrics-listen", e.metrics, "--admin-listen", "127.0.0.1:0")
	testenv.WaitDial(t, e.kernel, "tcp", e.addr)
	conn, err := grpc.NewClient(e.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	e.conn = conn
	// Cleanups run last first: the connection closes, then the kernel stops, then the agent.
	t.Cleanup(func() { conn.Close() })
	return e
}

// do sends one request's headers over a fresh stream and returns the reply.
func (e *env) do(t *testing.T, path string, kv ...string) *extprocv3.ProcessingResponse {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel() // Envoy ends every stream by cancelling it
	st, err := extprocv3.NewExternalProcessorClient(e.conn).Process(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(reqHeaders(path, true, "", kv...)); err != nil {
		t.Fatal(err)
	}
	r, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func (e *env) get(t *testing.T, path string) (int, string) {
	t.Helper()
	return testenv.HTTPGet("http://" + e.metrics + path)
}

func TestMainEndToEndInProcess(t *testing.T) {
	e := startEnv(t, "")
	if r := e.do(t, "/api/v1/users"); r.GetImmediateResponse().GetStatus().GetCode() != 401 {
		t.Fatalf("no key: %v", r)
	}
	if r := e.do(t, "/api/v1/users", "x-api-key", "wrong"); r.GetImmediateResponse().GetStatus().GetCode() != 403 {
		t.Fatalf("wrong key: %v", r)
	}
	r := e.do(t, "/api/v1/users", "x-api-key", "secret-1")
	if setHeadersOf(t, r.GetRequestHeaders().GetResponse().GetHeaderMutation())["x-user-id"] != "alice" {
		t.Fatalf("good key: %v", r)
	}
	hc, err := healthpb.NewHealthClient(e.conn).Check(context.Background(), &healthpb.HealthCheckRequest{Service: "envoy.service.ext_proc.v3.ExternalProcessor"})
	if err != nil || hc.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("grpc health %v %v", hc, err)
	}
	testenv.WaitFor(t, 10*time.Second, "readiness", func() bool { c, _ := e.get(t, "/health/ready"); return c == 200 })
	_, body := e.get(t, "/metrics")
	for _, want := range []string{
		`policy_kernel_requests_total{route="/api/v1/users",agent="default-agent",status="deny"} 2`,
		`policy_kernel_requests_total{route="/api/v1/users",agent="default-agent",status="allow"} 1`,
		`policy_kernel_agent_health{agent="default-agent"} 1`,
		`policy_kernel_request_duration_seconds_bucket{route="/api/v1/users",agent="default-agent"`,
		`policy_kernel_config_info{version=`,
		`policy_kernel_streams_active 0`,
		`go_goroutines`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	if c, _ := e.get(t, "/health/live"); c != 200 {
		t.Fatal("live")
	}
}

func TestMainReloadAndAgentLoss(t *testing.T) {
	e := startEnv(t, "")
	e.kernel.Reload(t, "config unchanged; reload skipped")
	os.WriteFile(e.kernelCfg, []byte("policy_kernel:\n  agents: []\n  bogus: 1\n"), 0o600)
	e.kernel.Reload(t, "config reload failed; keeping the previous config")
	if !strings.Contains(e.kernel.Logs.String(), "kernel.yaml:3: policy_kernel.bogus: unknown key") {
		t.Fatal("reload failure does not name file, line and key")
	}
	if r := e.do(t, "/api/v1/users"); r.GetImmediateResponse().GetStatus().GetCode() != 401 {
		t.Fatal("an invalid reload changed behaviour")
	}
	// A reload whose chains its agent cannot run is invalid too: the snapshot is checked
	// against the agent's policies before it replaces the current one.
	os.WriteFile(e.kernelCfg, []byte(fmt.Sprintf(`policy_kernel:
  agents:
    - name: default-agent
      socket_path: %s
  route_policies:
    - route_name: /api/v1/users
      request_policy_chain: [{policy: allowAll}]
    - route_name: /broken
      request_policy_chain: [{policy: noSuchPolicy}]
`, e.sock)), 0o600)
	e.kernel.Reload(t, "config reload failed; keeping the previous config")
	if !strings.Contains(e.kernel.Logs.String(), `kernel.yaml:9: policy_kernel.route_policies[1].request_policy_chain[0].policy: policy \"noSuchPolicy\" is not supported by agent \"default-agent\"`) {
		t.Fatalf("rejected snapshot not reported with file, line and key:\n%s", e.kernel.Logs.String())
	}
	if r := e.do(t, "/api/v1/users"); r.GetImmediateResponse().GetStatus().GetCode() != 401 {
		t.Fatal("a rejected reload changed behaviour")
	}
	// A valid reload: the route now allows everyone.
	os.WriteFile(e.kernelCfg, []byte(fmt.Sprintf(`policy_kernel:
  version: v2
  agents:
    - name: default-agent
      socket_path: %s
      health_check_interval_ms: 100
  route_policies:
    - route_name: /api/v1/users
      request_policy_chain: [{policy: allowAll}]
    - route_name: /new
      request_policy_chain: [{policy: allowAll}]
`, e.sock)), 0o600)
	e.kernel.Reload(t, "config reloaded")
	// The line says which routes the reload added, removed and changed.
	var md map[string]any
	for _, l := range testenv.LogLines(t, e.kernel.Logs.String()) {
		if l.Message == "config reloaded" {
			md = l.Metadata
		}
	}
	if fmt.Sprint(md["routes_added"], md["routes_removed"], md["routes_changed"]) != "[/new] [] [/api/v1/users]" {
		t.Fatalf("config reloaded: %v", md)
	}
	if r := e.do(t, "/api/v1/users"); r.GetRequestHeaders() == nil {
		t.Fatalf("after reload: %v", r)
	}
	_, body := e.get(t, "/metrics")
	if !strings.Contains(body, `policy_kernel_config_reload_total{status="success"} 1`) || !strings.Contains(body, `policy_kernel_config_reload_total{status="failure"} 2`) || !strings.Contains(body, `policy_kernel_config_info{version="v2-`) {
		t.Fatalf("reload metrics:\n%s", body)
	}
	_, ready := e.get(t, "/health/ready")
	if !strings.Contains(ready, `"config_version":"v2-`) {
		t.Fatalf("ready %s", ready)
	}

	// The agent goes away: readiness follows, requests are denied within the budget.
	e.agent.Stop(t)
	testenv.WaitFor(t, 10*time.Second, "not ready", func() bool { c, _ := e.get(t, "/health/ready"); return c == 503 })
	start := time.Now()
	r := e.do(t, "/api/v1/users")
	if r.GetImmediateResponse().GetStatus().GetCode() != 500 || time.Since(start) > time.Second {
		t.Fatalf("agent down: %v after %v", r, time.Since(start))
	}
	// It comes back: the kernel reconnects by itself.
	agentCfg := filepath.Join(e.dir, "agent.yaml")
	e.agent = testenv.RunMain(t, agent.Main, "--config", agentCfg)
	testenv.WaitFor(t, 10*time.Second, "ready again", func() bool { c, _ := e.get(t, "/health/ready"); return c == 200 })
	testenv.WaitFor(t, 10*time.Second, "serving again", func() bool { return e.do(t, "/api/v1/users").GetRequestHeaders() != nil })
}

// TestMainAuditAtErrorLevel runs a kernel at log level error: the start-up line with the config
// version, and every reload (skipped, failed, successful) are still logged, as audit lines,
// and no other line below error is.
func TestMainAuditAtErrorLevel(t *testing.T) {
	e := startEnv(t, "  observability:\n    log_level: error\n")
	testenv.WaitFor(t, 10*time.Second, "the start-up line", func() bool { return strings.Contains(e.kernel.Logs.String(), "policy-kernel serving") })
	e.kernel.Reload(t, "config unchanged; reload skipped")
	os.WriteFile(e.kernelCfg, []byte("policy_kernel:\n  agents: []\n  observability: {log_level: error}\n"), 0o600)
	e.kernel.Reload(t, "config reload failed; keeping the previous config")
	os.WriteFile(e.kernelCfg, []byte(fmt.Sprintf(mainKernelYAML, e.sock, "  version: v2\n  observability:\n    log_level: error\n    metrics_port: 1\n")), 0o600)
	e.kernel.Reload(t, "config reloaded")

	lines := testenv.CheckAuditLog(t, e.kernel.Logs.String(), map[string]string{
		"policy-kernel serving":                             "info",
		"config unchanged; reload skipped":                  "info",
		"config reload failed; keeping the previous config": "error",
		"these settings take effect on restart only":        "warn",
		"config reloaded":                                   "info",
	})
	if v, _ := lines["config reloaded"].Metadata["config_version"].(string); !strings.HasPrefix(v, "v2-") {
		t.Errorf("config reloaded without the new version: %v", lines["config reloaded"].Metadata)
	}
}

func TestMainValidateAndErrors(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "none.sock")
	cfg := filepath.Join(dir, "k.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(mainKernelYAML, sock, "")), 0o600)
	var out bytes.Buffer
	err := Main(context.Background(), []string{"--config", cfg, "--validate", "--agent-wait", "0"}, &out)
	if err == nil || !strings.Contains(err.Error(), `k.yaml:4: policy_kernel.agents[0].socket_path: agent "default-agent" did not answer`) || strings.Contains(out.String(), "valid (version") {
		t.Fatalf("validate without agent: %v %s", err, out.String())
	}
	f := func(args []string, want string) {
		t.Helper()
		var out bytes.Buffer
		err := Main(context.Background(), args, &out)
		if err == nil || !strings.Contains(err.Error()+out.String(), want) {
			t.Errorf("Main(%q) = %v (%s), want %q", args, err, out.String(), want)
		}
	}
	f([]string{"--bogus"}, "flag provided but not defined")
	f([]string{"--config", "", "--agent-wait", "-1s", "x"}, "unexpected arguments")
	f([]string{"--config", ""}, "-config must not be empty")
	f([]string{"--config", filepath.Join(dir, "missing")}, "read kernel config")
	f([]string{"--config", cfg, "--agent-wait", "0", "--listen", "256.0.0.1:1"}, "listen on")
	busy, _ := net.Listen("tcp", "127.0.0.1:0")
	defer busy.Close()
	f([]string{"--config", cfg, "--agent-wait", "0", "--listen", "127.0.0.1:0", "--metrics-listen", busy.Addr().String(), "--admin-listen", "127.0.0.1:0"}, "listen on metrics address")
	f([]string{"--config", cfg, "--agent-wait", "0", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--admin-listen", busy.Addr().String()}, "listen on admin address")

	// With the agent up, validation checks every chain against its policies.
	asock := filepath.Join(dir, "a.sock")
	acfg := filepath.Join(dir, "a.yaml")
	os.WriteFile(acfg, []byte(fmt.Sprintf(mainAgentYAML, asock)), 0o600)
	a := testenv.RunMain(t, agent.Main, "--config", acfg)
	testenv.WaitDial(t, a, "unix", asock)
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte(fmt.Sprintf(mainKernelYAML, asock, "    - route_name: /x\n      response_policy_chain: [{policy: apiKeyAuth}]\n    - route_name: /y\n      request_policy_chain: [{policy: nope}]")), 0o600)
	out.Reset()
	err = Main(context.Background(), []string{"--config", bad, "--validate"}, &out)
	if err == nil || !strings.Contains(err.Error(), `bad.yaml:13: policy_kernel.route_policies[1].response_policy_chain[0].policy: policy "apiKeyAuth" does not run in the response phase`) ||
		!strings.Contains(err.Error(), `bad.yaml:15: policy_kernel.route_policies[2].request_policy_chain[0].policy: policy "nope" is not supported by agent "default-agent"`) {
		t.Fatalf("validate with bad chains: %v", err)
	}
}

// TestMainDrain shows SIGTERM's order: readiness off at once, streams still accepted during the
// drain delay, then refused, then Main returns.
func TestMainDrain(t *testing.T) {
	e := startEnv(t, "  server:\n    drain_delay_ms: 300\n")
	_ = corev3.HeaderValue{}
	testenv.WaitFor(t, 10*time.Second, "ready", func() bool { c, _ := e.get(t, "/health/ready"); return c == 200 })
	e.kernel.Cancel()
	testenv.WaitFor(t, 10*time.Second, "not ready", func() bool { c, _ := e.get(t, "/health/ready"); return c == 503 })
	if r := e.do(t, "/api/v1/users"); r.GetImmediateResponse().GetStatus().GetCode() != 401 {
		t.Fatal("streams during the drain delay must still be served")
	}
	if err, ok := e.kernel.Wait(10 * time.Second); !ok || err != nil {
		t.Fatalf("kernel did not stop: returned %v (%v)", err, ok)
	}
}

func TestRouteChanges(t *testing.T) {
	chain := func(p string) []ChainEntry { return []ChainEntry{{Policy: p}} }
	old := &KernelConfig{RoutePolicies: []RoutePolicy{
		{RouteName: "/same", RequestPolicyChain: chain("allowAll")},
		{RouteName: "/gone", RequestPolicyChain: chain("allowAll")},
		{RouteName: "/chain", RequestPolicyChain: chain("allowAll")},
		{RouteName: "/mode", RequestPolicyChain: chain("allowAll")},
		{RouteName: "/meta", RequestPolicyChain: []ChainEntry{{Policy: "apiKeyAuth", Metadata: yamlconf.Metadata{"header_name": "X-A"}}}},
	}}
	cur := &KernelConfig{RoutePolicies: []RoutePolicy{
		{RouteName: "/meta", RequestPolicyChain: []ChainEntry{{Policy: "apiKeyAuth", Metadata: yamlconf.Metadata{"header_name": "X-B"}}}},
		{RouteName: "/new", RequestPolicyChain: chain("allowAll")},
		{RouteName: "/chain", ResponsePolicyChain: chain("allowAll")},
		{RouteName: "/mode", Mode: ModeShadow, RequestPolicyChain: chain("allowAll")},
		{RouteName: "/same", RequestPolicyChain: chain("allowAll")},
	}, DefaultPolicy: &ChainPair{RequestPolicyChain: chain("allowAll")}}
	d := routeChanges(old, cur)
	if fmt.Sprint(d.added, d.removed, d.changed, d.defaultChanged) != "[/new] [/gone] [/chain /meta /mode] true" {
		t.Fatalf("%+v", d)
	}
	if d := routeChanges(cur, cur); len(d.added)+len(d.removed)+len(d.changed) != 0 || d.defaultChanged {
		t.Fatalf("no change: %+v", d)
	}
	many := &KernelConfig{}
	for i := range maxLoggedRoutes + 5 {
		many.RoutePolicies = append(many.RoutePolicies, RoutePolicy{RouteName: fmt.Sprintf("/r%02d", i)})
	}
	d = routeChanges(&KernelConfig{}, many)
	if len(d.added) != maxLoggedRoutes+5 || len(firstNames(d.added)) != maxLoggedRoutes || firstNames(d.added)[0] != "/r00" {
		t.Fatalf("many: %d %v", len(d.added), firstNames(d.added))
	}
}

// TestAdminAddr: --admin-listen wins over the config; else observability.admin_address and
// admin_port (127.0.0.1:9190 by default, IPv6 bracketed); admin_port -1 turns the listener off.
func TestAdminAddr(t *testing.T) {
	for _, c := range []struct{ flag, obs, want string }{
		{"", "", "127.0.0.1:9190"},
		{"", "observability: {admin_address: 0.0.0.0, admin_port: 9300}", "0.0.0.0:9300"},
		{"", "observability: {admin_address: '::1', admin_port: 9300}", "[::1]:9300"},
		{"", "observability: {admin_port: -1}", ""},
		{"127.0.0.1:0", "observability: {admin_port: -1}", "127.0.0.1:0"},
		{"10.0.0.1:7000", "observability: {admin_address: 0.0.0.0, admin_port: 9300}", "10.0.0.1:7000"},
	} {
		cfg, err := ParseConfig("kernel.yaml", []byte("policy_kernel:\n  agents: [{name: a, socket_path: /unused.sock}]\n  "+c.obs+"\n"))
		if err != nil {
			t.Fatalf("%s: %v", c.obs, err)
		}
		if got := adminAddr(&flags{admin: c.flag}, cfg.PolicyKernel); got != c.want {
			t.Errorf("flag %q, %s: %q, want %q", c.flag, c.obs, got, c.want)
		}
	}
}

// TestOnLearn: an agent that comes back with another policy set gives it to the agents of the
// config in force that use its client, and the routes are checked again against it at once: a
// policy it no longer has makes its routes refused (and counted by
// policy_kernel_invalid_routes). A client the config does not use changes nothing.
func TestOnLearn(t *testing.T) {
	k := newTestKernel(t, baseConfig, &fakeAgent{})
	k.m.registerInvalidRoutes(k.s)
	invalidRoutes := func() string {
		var b bytes.Buffer
		k.m.set.WritePrometheus(&b)
		for _, l := range strings.Split(b.String(), "\n") {
			if v, ok := strings.CutPrefix(l, "policy_kernel_invalid_routes "); ok {
				return v
			}
		}
		return "absent"
	}
	logs := &testenv.SyncBuffer{}
	kern := &Kernel{server: k.s, log: logging.New(logs, "kernel", zerolog.InfoLevel), metrics: k.m}
	before := k.s.Snapshot()
	if before.refusedRoutes() != 1 || invalidRoutes() != "1" { // /broken
		t.Fatalf("before: %d refused, metric %s", before.refusedRoutes(), invalidRoutes())
	}

	kern.onLearn(&fakeAgent{}, &agentv1.GetAgentConfigResponse{})
	if k.s.Snapshot() != before {
		t.Fatal("a client of no agent rebuilt the snapshot")
	}

	info := testInfo()
	info.AgentVersion = "t2"
	info.SupportedPolicies = slices.DeleteFunc(info.SupportedPolicies, func(p *agentv1.PolicyInfo) bool { return p.GetName() == "auth" })
	kern.onLearn(k.agent, info)
	after := k.s.Snapshot()
	if after == before || k.state.info.Load() != info {
		t.Fatal("the new policy set was not taken")
	}
	if r := after.route("", "/api/v1/users"); r == nil || !strings.Contains(r.invalid, `"auth"`) {
		t.Fatalf("/api/v1/users: %+v", r)
	}
	// /api/v1/users, named-route and /lean use auth; /broken stays refused.
	if after.refusedRoutes() != 4 || invalidRoutes() != "4" {
		t.Fatalf("after: %d refused %q, metric %s", after.refusedRoutes(), after.invalid, invalidRoutes())
	}
	if !strings.Contains(logs.String(), "agent came back with another policy set") || !strings.Contains(logs.String(), `"agent_version":"t2"`) ||
		!strings.Contains(logs.String(), "routes checked again against the agents' policies") {
		t.Errorf("logs: %s", logs.String())
	}

	// Before any config: nothing to do, and no snapshot counts a refused route.
	empty := &Kernel{server: NewServer(logging.New(io.Discard, "kernel", zerolog.Disabled), newKernelMetrics())}
	empty.onLearn(k.agent, info)
	if empty.server.Snapshot() != nil || empty.server.Snapshot().refusedRoutes() != 0 {
		t.Fatal("a kernel without a config built one")
	}
}
