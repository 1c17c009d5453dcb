package loadtest

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/policy-engine/policy-engine/agent"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/kernel"
	"github.com/policy-engine/policy-engine/loadtest/crossing"
)

func TestParseOptions(t *testing.T) {
	o, err := parseOptions(nil, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if e, err := parseOptions([]string{"-server-env", "GOGC=200,GOMAXPROCS=2"}, &bytes.Buffer{}); err != nil || len(e.ServerEnv) != 2 || e.ServerEnv[1] != "GOMAXPROCS=2" {
		t.Errorf("-server-env: %v, %v", e, err)
	}
	if len(o.Rates) != 2 || o.Rates[0] != 2500 || o.Rates[1] != 5000 || o.Conns != 2 || o.Streams != 10000 || len(o.Targets) != 2 || o.OpenFor+o.ClosedFor+o.Warmup > 30*time.Second {
		t.Errorf("defaults %+v", o)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"-rate", "0"}, "-rate must be positive"},
		{[]string{"-conns", "0"}, "must be positive"},
		{[]string{"-streams", "-1"}, "-streams must not be negative"},
		{[]string{"-targets", "noop,envoy"}, `unknown target "envoy"`},
		{[]string{"x"}, "unexpected arguments"},
		{[]string{"-rate", "x"}, "invalid value"},
		{[]string{"-server-env", "GOGC=200,oops"}, `"oops" is not KEY=VALUE`},
		{[]string{"-message-timeout", "10s"}, "-message-timeout must be from 4ms to 6s"},
	} {
		if _, err := parseOptions(c.args, &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("parseOptions(%q): err = %v, want %q", c.args, err, c.want)
		}
	}
}

// The configs the load test writes must be valid for the real binaries.
func TestConfigsAreValid(t *testing.T) {
	for _, chain := range []string{"apiKeyAuth + allowAll", "apiKeyAuth + rateLimit"} {
		kc := kernelConfig(9001, 9090, 9190, "/tmp/a.sock", chain, 200*time.Millisecond, "  version: \"x\"")
		cfg, err := kernel.ParseConfig("kernel.yaml", []byte(kc))
		if err != nil {
			t.Fatalf("%s: kernel config: %v\n%s", chain, err, kc)
		}
		rp := cfg.PolicyKernel.RoutePolicies
		if len(rp) != 1 || rp[0].RouteName != RouteName || len(rp[0].RequestPolicyChain) != 2 || len(rp[0].ResponsePolicyChain) != 1 {
			t.Fatalf("%s: routes %+v", chain, rp)
		}
		if want := strings.Fields(chain)[2]; rp[0].RequestPolicyChain[1].Policy != want {
			t.Errorf("second policy %q, want %q", rp[0].RequestPolicyChain[1].Policy, want)
		}
		if cfg.PolicyKernel.Version != "x" {
			t.Errorf("extra YAML not applied")
		}
		if cfg.PolicyKernel.Server.MessageTimeoutMS != 200 || cfg.PolicyKernel.Agents[0].TimeoutMS != 150 {
			t.Errorf("timeouts: message %d ms, agent %d ms; want 200 and 150", cfg.PolicyKernel.Server.MessageTimeoutMS, cfg.PolicyKernel.Agents[0].TimeoutMS)
		}
	}
	ac, err := agent.ParseConfig("agent.yaml", []byte(agentConfig("/tmp/a.sock", 9091, 9191)))
	if err != nil {
		t.Fatal(err)
	}
	if ac.AgentCore.Observability.MetricsAddress != "127.0.0.1:9091" {
		t.Errorf("agent metrics address %q", ac.AgentCore.Observability.MetricsAddress)
	}
	req, resp := chains()
	if !strings.HasPrefix(req, "apiKeyAuth + ") || resp != "addSecurityHeaders" {
		t.Errorf("chains() = %q, %q", req, resp)
	}
}

// buildBinaries builds the three servers into a temporary folder.
func buildBinaries(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-tags", "vtprotobuf", "-o", dir+"/", "./cmd/policy-kernel", "./cmd/policy-agent", "./loadtest/cmd/extproc-noop")
	cmd.Dir = ".."
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	return dir
}

func TestMainEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the servers")
	}
	bin := buildBinaries(t)
	work := t.TempDir()
	jsonOut := filepath.Join(work, "out", "report.json")
	profiles := filepath.Join(work, "profiles")
	var stdout, stderr bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	err := Main(ctx, []string{
		"-bin", bin, "-rate", "200", "-open", "500ms", "-closed", "1500ms", "-warmup", "300ms", "-concurrency", "4",
		"-streams", "300", "-repeat", "2", "-json", jsonOut, "-workdir", filepath.Join(work, "run"),
		"-profile", profiles, "-profile-seconds", "1s",
		"-targets", "noop,kernel+agent,kernel+agent-uds",
		// The test checks the pipeline, not timing: other packages' tests share the CPUs.
		"-message-timeout", "4s",
	}, &stdout, &stderr)
	if err != nil {
		t.Fatalf("Main: %v\nstderr:\n%s", err, stderr.String())
	}
	out := stdout.String()
	for _, want := range []string{"noop", "kernel+agent", "kernel+agent-uds", "streams 300", "over the runs", "met in", "report written to"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	data, err := os.ReadFile(jsonOut)
	if err != nil {
		t.Fatal(err)
	}
	var rep Report
	if err := json.Unmarshal(data, &rep); err != nil {
		t.Fatal(err)
	}
	if len(rep.Rows) != 21 {
		t.Fatalf("%d rows, want idle, then open, closed and streams twice, for the three targets:\n%s", len(rep.Rows), out)
	}
	streamChecks := map[int]bool{}
	for _, c := range rep.Checks {
		if strings.Contains(c.What, "streams 300") {
			streamChecks[c.Run] = true
		}
	}
	if !streamChecks[1] || !streamChecks[2] {
		t.Errorf("held-stream memory checked in runs %v, want 1 and 2:\n%s", streamChecks, out)
	}
	for _, c := range rep.Summary {
		if c.Runs != 2 {
			t.Errorf("summary %+v: want two runs", c)
		}
	}
	if len(rep.Summary) == 0 {
		t.Errorf("no summary over the runs:\n%s", out)
	}
	for _, row := range rep.Rows {
		if row.Errors != 0 {
			t.Errorf("%s %s: %d errors: %v", row.Target, row.Phase, row.Errors, row.Errs)
		}
		if row.Phase == phaseIdle {
			if len(row.Procs) == 0 || row.Procs[0].PeakRSS <= 0 || row.RSSRatio <= 0 {
				t.Errorf("idle row without memory: %+v", row)
			}
			continue
		}
		if strings.HasPrefix(row.Phase, phaseStreams) {
			if row.Requests != 300 {
				t.Errorf("%s held %d streams, want 300", row.Target, row.Requests)
			}
			continue
		}
		if row.Requests == 0 || row.CPUPer1k <= 0 || row.CPURatio <= 0 || row.P99us <= 0 {
			t.Errorf("row without measurements: %+v", row)
		}
		kernelRow := row.Target == targetKernel || row.Target == targetKernelUDS
		if kernelRow && (len(row.Procs) != 2 || row.Procs[0].PeakRSS <= 0) {
			t.Errorf("kernel row processes: %+v", row.Procs)
		}
		if kernelRow && row.KernelP99us <= 0 {
			t.Errorf("kernel row without the kernel's own p99: %+v", row)
		}
		if kernelRow && (row.AgentCallP50us <= 0 || row.AgentCallP99us < row.AgentCallP50us) {
			t.Errorf("kernel row without the agent call's p50 and p99: %+v", row)
		}
	}
	for _, f := range []string{"kernel.cpu.pprof", "kernel.heap.pprof", "agent.cpu.pprof", "agent.heap.pprof", "kernel.streams.heap.pprof", "open200.kernel.trace", "open200.agent.trace"} {
		if fi, err := os.Stat(filepath.Join(profiles, f)); err != nil || fi.Size() == 0 {
			t.Errorf("profile %s: %v", f, err)
		}
	}
	// The two traces of the open loop follow the agent calls from one process into the other.
	b, err := crossing.AnalyzeTraces(filepath.Join(profiles, "open200.kernel.trace"), filepath.Join(profiles, "open200.agent.trace"))
	if err != nil {
		t.Fatal(err)
	}
	if b.Calls < 20 || b.Alone < b.Calls/4 {
		t.Errorf("crossing: %d calls in the kernel's trace, %d followed through the agent's", b.Calls, b.Alone)
	}
	// The servers were stopped: nothing listens on the agent's socket any more.
	if _, err := os.Stat(filepath.Join(work, "run", "kernel.log")); err != nil {
		t.Errorf("kernel log: %v", err)
	}
}

func TestRunFailsWhenAServerDoesNotStart(t *testing.T) {
	bin := t.TempDir()
	// A "server" that exits at once.
	if err := os.WriteFile(filepath.Join(bin, "extproc-noop"), []byte("#!/bin/sh\necho broken >&2\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	o, err := parseOptions([]string{"-bin", bin, "-targets", "noop", "-start-timeout", "5s"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = Run(context.Background(), o, &bytes.Buffer{})
	if err == nil || !strings.Contains(err.Error(), "noop exited during start-up: broken") {
		t.Fatalf("err = %v, want the start-up failure with the server's output", err)
	}
	o.BinDir = filepath.Join(bin, "missing")
	if _, err := Run(context.Background(), o, &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), "start noop") {
		t.Fatalf("missing binary: err = %v", err)
	}
}

func TestProcessStopEscalates(t *testing.T) {
	dir := t.TempDir()
	// Ignores SIGTERM: stop must kill it after its grace period.
	p, err := startProcess("/bin/sh", []string{"-c", "trap '' TERM; echo started; while :; do sleep 0.05; done"}, "stubborn", dir)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	start := time.Now()
	p.stop()
	if !p.exited() {
		t.Fatal("process still running after stop")
	}
	if d := time.Since(start); d < 4*time.Second {
		t.Errorf("stop took %s: it should have waited for SIGTERM before killing", d)
	}
	if err := syscall.Kill(p.pid(), 0); err == nil {
		t.Error("the process is still alive")
	}
	if !strings.Contains(p.tail(), "started") {
		t.Errorf("log tail %q", p.tail())
	}
	p.stop() // stopping a stopped process is a no-op
}

func TestWaitForTimesOut(t *testing.T) {
	p, err := startProcess("/bin/sh", []string{"-c", "echo $LOADTEST_MARK; sleep 30"}, "sleeper", t.TempDir(), "LOADTEST_MARK=marked")
	if err != nil {
		t.Fatal(err)
	}
	defer p.stop()
	err = waitTCP(context.Background(), "127.0.0.1:1", p, 300*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "sleeper not ready after 300ms: marked") {
		t.Fatalf("err = %v", err)
	}
	err = waitReady(context.Background(), "http://127.0.0.1:1/health/ready", p, 200*time.Millisecond)
	if err == nil {
		t.Fatal("waitReady on a closed port succeeded")
	}
}

func TestMachine(t *testing.T) {
	m := machine()
	if m.CPUs <= 0 || !strings.HasPrefix(m.GoVersion, "go") || !strings.HasPrefix(m.Kernel, "Linux ") || m.LoadAverage == "" {
		t.Errorf("machine() = %+v", m)
	}
}

// TestJWTScenarioConfigs checks the configs of the JWT scenarios: valid for both binaries,
// jwtValidation first, cached only in jwt-cached, and the agent builds the entry with the
// generated key.
func TestJWTScenarioConfigs(t *testing.T) {
	j, err := newJWTSetup()
	if err != nil {
		t.Fatal(err)
	}
	for _, cached := range []bool{false, true} {
		ac, kc := j.configs(agentConfig("/tmp/a.sock", 9091, 9191), kernelConfig(9001, 9090, 9190, "/tmp/a.sock", "apiKeyAuth + rateLimit", 200*time.Millisecond, ""), cached)
		cfg, err := kernel.ParseConfig("kernel.yaml", []byte(kc))
		if err != nil {
			t.Fatalf("kernel config: %v\n%s", err, kc)
		}
		first := cfg.PolicyKernel.RoutePolicies[0].RequestPolicyChain[0]
		if first.Policy != "jwtValidation" || (first.Cache != nil) != cached {
			t.Fatalf("cached=%v: first entry %+v", cached, first)
		}
		a, err := agent.ParseConfig("agent.yaml", []byte(ac))
		if err != nil {
			t.Fatalf("agent config: %v\n%s", err, ac)
		}
		e := agent.NewExecutor(logging.New(io.Discard, "agent", zerolog.ErrorLevel))
		if err := e.Load(a.AgentCore, "v"); err != nil {
			t.Fatal(err)
		}
		if msgs := e.ValidateChains([]*agentv1.ChainEntry{{Phase: agentv1.PolicyPhase_REQUEST, Policy: &agentv1.Policy{Name: "jwtValidation", Metadata: first.Metadata}}}); msgs[0] != "" {
			t.Fatalf("agent refuses the entry: %s", msgs[0])
		}
		e.Close()
	}
	tr := j.traffic(DefaultTraffic(RouteName, APIKey))
	found := false
	for _, h := range tr.RequestHeaders {
		found = found || h[0] == "authorization" && strings.HasPrefix(h[1], "Bearer ey")
	}
	if !found {
		t.Fatalf("no token in %v", tr.RequestHeaders)
	}
	if _, err := parseOptions([]string{"-scenario", "jwt-cached"}, &bytes.Buffer{}); err != nil {
		t.Fatal(err)
	}
	if _, err := parseOptions([]string{"-scenario", "oauth"}, &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), "unknown scenario") {
		t.Fatalf("bad scenario: %v", err)
	}
}
