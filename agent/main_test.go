package agent

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

const agentYAML = `agent_core:
  name: "%s"
  socket_path: "%s"
  policies:
    config:
      t.setHeader: {}
  observability:
    log_level: %s
    metrics_address: "%s"
`

type runningAgent struct {
	*testenv.InProc
	sock, cfgPath, metrics string
	conn                   *grpc.ClientConn
	client                 agentv1.PolicyAgentClient
}

func startAgent(t *testing.T) *runningAgent {
	t.Helper()
	return startAgentAt(t, "debug")
}

// startAgentAt runs the agent of agentYAML, at a log level, in the test's process.
func startAgentAt(t *testing.T, level string) *runningAgent {
	t.Helper()
	dir := t.TempDir()
	a := &runningAgent{sock: filepath.Join(dir, "agent.sock"), cfgPath: filepath.Join(dir, "agent.yaml"), metrics: testenv.FreeAddr(t)}
	if err := os.WriteFile(a.cfgPath, []byte(fmt.Sprintf(agentYAML, "a1", a.sock, level, a.metrics)), 0o600); err != nil {
		t.Fatal(err)
	}
	a.InProc = testenv.RunMain(t, Main, "--config", a.cfgPath)
	testenv.WaitDial(t, a, "unix", a.sock)
	conn, err := grpc.NewClient("unix://"+a.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	a.conn = conn
	a.client = agentv1.NewPolicyAgentClient(conn)
	t.Cleanup(func() { conn.Close() })
	return a
}

func TestMainServes(t *testing.T) {
	a := startAgent(t)
	ctx := context.Background()
	fi, err := os.Stat(a.sock)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode: %v %v", fi.Mode(), err)
	}
	cfg, err := a.client.GetAgentConfig(ctx, &agentv1.GetAgentConfigRequest{})
	if err != nil || cfg.GetAgentName() != "a1" || len(cfg.GetSupportedPolicies()) == 0 {
		t.Fatalf("GetAgentConfig: %v %v", cfg, err)
	}
	resp, err := a.client.Execute(ctx, req(p("t.setHeader", "key", "x", "value", "1")))
	if err != nil || resp.GetStatus().GetCode() != agentv1.StatusCode_OK || resp.GetRequestId() != "r1" {
		t.Fatalf("Execute: %v %v", resp, err)
	}
	vc, err := a.client.ValidateChains(ctx, &agentv1.ValidateChainsRequest{Entries: []*agentv1.ChainEntry{
		{Policy: p("t.setHeader", "key", "x", "value", "1")},
		{Policy: p("t.setHeader", "bogus", "1"), Phase: agentv1.PolicyPhase_RESPONSE},
	}})
	if err != nil || len(vc.GetErrors()) != 2 || vc.GetErrors()[0] != "" || !strings.Contains(vc.GetErrors()[1], `unknown key`) {
		t.Fatalf("ValidateChains: %v %v", vc, err)
	}
	hc, err := healthpb.NewHealthClient(a.conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || hc.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health: %v %v", hc, err)
	}

	// Many calls multiplexed on one stream, in batches of ten, answered by call id.
	raw, err := a.client.ExecuteStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	stream := &callStream{st: raw}
	const n = 50
	var batch []*agentv1.PolicyRequest
	for i := 1; i <= n; i++ {
		r := req(p("t.setHeader", "key", "x", "value", fmt.Sprint(i)))
		r.CallId = uint64(i)
		if i%10 == 0 {
			r.Policies = []*agentv1.Policy{p("t.sleep", "sleep", "20ms"), p("t.setHeader", "key", "x", "value", fmt.Sprint(i))}
		}
		if batch = append(batch, r); len(batch) == 10 {
			if err := stream.Send(batch...); err != nil {
				t.Fatal(err)
			}
			batch = nil
		}
	}
	seen := map[uint64]bool{}
	for len(seen) < n {
		resp, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if got := resp.GetInstructions()[len(resp.GetInstructions())-1].GetHeader().GetValue(); got != fmt.Sprint(resp.GetCallId()) {
			t.Fatalf("call %d answered with %s", resp.GetCallId(), got)
		}
		seen[resp.GetCallId()] = true
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != io.EOF {
		t.Fatalf("stream end: %v", err)
	}

	// Metrics, readiness and liveness on the metrics address; pprof only when enabled.
	get := func(path string) (int, string) { return testenv.HTTPGet("http://" + a.metrics + path) }
	if code, body := get("/metrics"); code != 200 || !strings.Contains(body, `policy_agent_executions_total{policy="t.setHeader",status="ok"}`) || !strings.Contains(body, "go_goroutines") {
		t.Fatalf("metrics %d:\n%s", code, body)
	}
	if code, body := get("/health/ready"); code != 200 || !strings.Contains(body, `"config_version"`) {
		t.Fatalf("ready %d %s", code, body)
	}
	if code, _ := get("/health/live"); code != 200 {
		t.Fatalf("live %d", code)
	}
	if code, _ := get("/debug/pprof/"); code != 404 {
		t.Fatalf("pprof without pprof_enabled: %d, want 404", code)
	}
}

func TestMainReload(t *testing.T) {
	a := startAgent(t)
	ctx := context.Background()
	version := func() string {
		cfg, err := a.client.GetAgentConfig(ctx, &agentv1.GetAgentConfigRequest{})
		if err != nil {
			t.Fatal(err)
		}
		return cfg.GetConfigVersion()
	}
	v1 := version()
	a.Reload(t, "config unchanged; reload skipped")
	if version() != v1 {
		t.Fatal("identical bytes changed the version")
	}
	// An invalid file keeps the old config and says why, naming file, line and key.
	if err := os.WriteFile(a.cfgPath, []byte("agent_core:\n  name: a1\n  socket_path: "+a.sock+"\n  bogus: 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	a.Reload(t, "config reload failed; keeping the previous config")
	if !strings.Contains(a.Logs.String(), "agent.yaml:4: agent_core.bogus: unknown key") {
		t.Fatalf("reload error does not name file, line and key:\n%s", a.Logs.String())
	}
	if version() != v1 {
		t.Fatal("an invalid reload changed the config")
	}
	// The socket cannot move on reload.
	if err := os.WriteFile(a.cfgPath, []byte("agent_core:\n  name: a1\n  socket_path: /elsewhere.sock\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	a.Reload(t, "agent_core.socket_path: cannot change on reload")
	// A valid change takes effect.
	if err := os.WriteFile(a.cfgPath, []byte(fmt.Sprintf(agentYAML, "a1", a.sock, "debug", a.metrics)+"  version: \"v2\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	a.Reload(t, "config reloaded")
	if v := version(); v == v1 || !strings.HasPrefix(v, "v2-") {
		t.Fatalf("version after reload %q (before %q)", v, v1)
	}
}

// TestMainAuditAtErrorLevel runs an agent at log level error: the start-up line with the config
// version and every reload (skipped, failed, successful) are still logged, as audit lines with
// their own level, and no other line below error is.
func TestMainAuditAtErrorLevel(t *testing.T) {
	a := startAgentAt(t, "error")
	a.Reload(t, "config unchanged; reload skipped")
	if err := os.WriteFile(a.cfgPath, []byte("agent_core:\n  name: a1\n  socket_path: "+a.sock+"\n  bogus: 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	a.Reload(t, "config reload failed; keeping the previous config")
	if err := os.WriteFile(a.cfgPath, []byte(fmt.Sprintf(agentYAML, "a1", a.sock, "error", testenv.FreeAddr(t))+"  version: v2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	a.Reload(t, "config reloaded")

	seen := testenv.CheckAuditLog(t, a.Logs.String(), map[string]string{
		"policy-agent serving":                              "info",
		"config unchanged; reload skipped":                  "info",
		"config reload failed; keeping the previous config": "error",
		"observability.metrics_address, admin_address, metrics_enabled and pprof_enabled take effect on restart only": "warn",
		"config reloaded": "info",
	})
	if v, _ := seen["config reloaded"].Metadata["config_version"].(string); !strings.HasPrefix(v, "v2-") {
		t.Errorf("config reloaded without the new version: %v", seen["config reloaded"].Metadata)
	}
}

func TestMainValidateAndErrors(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	os.WriteFile(good, []byte("agent_core:\n  name: a\n  socket_path: "+filepath.Join(dir, "s.sock")+"\n"), 0o600)
	var out bytes.Buffer
	if err := Main(context.Background(), []string{"--config", good, "--validate"}, &out); err != nil || !strings.Contains(out.String(), "valid (version") {
		t.Fatalf("validate good: %v %s", err, out.String())
	}
	f := func(args []string, want string) {
		t.Helper()
		var out bytes.Buffer
		err := Main(context.Background(), args, &out)
		if err == nil || !strings.Contains(err.Error()+out.String(), want) {
			t.Errorf("Main(%q) = %v (%s), want %q", args, err, out.String(), want)
		}
	}
	f([]string{"--nope"}, "flag provided but not defined")
	f([]string{"--config", ""}, "-config must not be empty")
	f([]string{"extra"}, "unexpected arguments")
	f([]string{"--config", filepath.Join(dir, "missing.yaml")}, "read agent config")
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("agent_core:\n  name: \"\"\n  socket_path: x\n  server:\n    max_concurrent_requests: -1\n    request_timeout_ms: -1\n    max_chain_duration_ms: -1\n  resource_limits:\n    max_body_size_bytes: -1\n    max_state_size_bytes: -1\n  observability:\n    log_level: loud\n"), 0o600)
	for _, want := range []string{"agent_core.name: must not be empty", "max_concurrent_requests: must not be negative", "request_timeout_ms: must not be negative", "max_chain_duration_ms: must not be negative", "max_body_size_bytes: must not be negative", "max_state_size_bytes: must not be negative", `unknown log level "loud"`} {
		f([]string{"--config", bad}, want)
	}
	pol := filepath.Join(dir, "pol.yaml")
	os.WriteFile(pol, []byte("agent_core:\n  name: a\n  socket_path: x\n  policies:\n    config:\n      nosuch: {}\n"), 0o600)
	f([]string{"--config", pol, "--validate"}, "agent_core.policies.config.nosuch: no such policy is compiled in")
	// A socket path that cannot be listened on.
	blocked := filepath.Join(dir, "blocked.yaml")
	os.WriteFile(blocked, []byte("agent_core:\n  name: a\n  socket_path: "+good+"\n"), 0o600)
	f([]string{"--config", blocked}, "is not a socket")
	// A metrics address that cannot be bound.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln.Close()
	busy := filepath.Join(dir, "busy.yaml")
	os.WriteFile(busy, []byte("agent_core:\n  name: a\n  socket_path: "+filepath.Join(dir, "b.sock")+"\n  observability:\n    metrics_address: "+ln.Addr().String()+"\n"), 0o600)
	f([]string{"--config", busy}, "listen on metrics address")
}
