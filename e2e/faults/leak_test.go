package faults

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/policy-engine/policy-engine/agent"
	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
	"github.com/policy-engine/policy-engine/kernel"

	// The in-process agent runs the real policies and the test ones.
	_ "github.com/policy-engine/policy-engine/internal/testpolicies"
	_ "github.com/policy-engine/policy-engine/policies/all"
)

// goroutines reads a process's goroutine count from its pprof listener.
func goroutines(t *testing.T, get func(testing.TB, string) (int, string)) int {
	t.Helper()
	code, body := get(t, "/debug/pprof/goroutine?debug=1")
	if code != 200 {
		t.Fatalf("pprof: %d %s", code, body)
	}
	return testenv.Goroutines(t, body)
}

// settles waits until a process's goroutine count is back to at most want, and returns it.
func settles(t *testing.T, get func(testing.TB, string) (int, string), want int) int {
	t.Helper()
	n := 0
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if n = goroutines(t, get); n <= want {
			return n
		}
		time.Sleep(50 * time.Millisecond)
	}
	return n
}

// TestEnvoyGoesAwayNoLeak ends streams at every phase, with agent calls in flight, half-closes
// them and drops whole connections, then checks that both processes are back to the goroutines
// they had before, that no stream is still counted open, and that every agent call ended.
func TestEnvoyGoesAwayNoLeak(t *testing.T) {
	// pprof (off by default) counts the goroutines.
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML + "    pprof_enabled: true\n    admin_address: \"{{AGENT_ADMIN}}\"\n", KernelYAML: leakKernelYAML + "  observability: {pprof_enabled: true}\n",
		AgentBin: testenv.Build(t, testenv.TestAgentPackage)})
	// Warm up: one full exchange on each route, on a client that is then closed.
	c, err := envoytest.Dial(e.KernelAddr, envoyConfig)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"/both", "/body"} {
		if s := play(c, p, request(p)); s.outcome() != "upstream" {
			t.Fatalf("warm-up %s: %s", p, s.outcome())
		}
	}
	c.Close()
	time.Sleep(200 * time.Millisecond)
	kernelBefore := goroutines(t, e.GetAdmin)
	agentBefore := goroutines(t, e.GetAgentAdmin)
	protoBefore := metric(t, e, "policy_kernel_protocol_errors_total")

	rounds := scale(15, 150)
	if err := earlyEndStorm(e.KernelAddr, 4, rounds); err != nil {
		t.Fatal(err)
	}
	streams := rounds * (4*len(earlyEnds) + 8)
	alive(t, e)

	testenv.WaitFor(t, 5*time.Second, "no stream counted open", func() bool { return metric(t, e, "policy_kernel_streams_active") == 0 })
	// Two goroutines of slack: an HTTP keep-alive connection of the metrics client may come or go.
	kernelAfter := settles(t, e.GetAdmin, kernelBefore+2)
	agentAfter := settles(t, e.GetAgentAdmin, agentBefore+2)
	t.Logf("reliability: Envoy goes away mid-stream: %d streams ended early at every phase, %d connections dropped; kernel goroutines %d → %d, agent goroutines %d → %d",
		streams, rounds, kernelBefore, kernelAfter, agentBefore, agentAfter)
	if kernelAfter > kernelBefore+2 {
		_, dump := e.GetAdmin(t, "/debug/pprof/goroutine?debug=1")
		t.Errorf("kernel goroutines %d → %d:\n%s", kernelBefore, kernelAfter, dump)
	}
	if agentAfter > agentBefore+2 {
		_, dump := e.GetAgentAdmin(t, "/debug/pprof/goroutine?debug=1")
		t.Errorf("agent goroutines %d → %d:\n%s", agentBefore, agentAfter, dump)
	}
	// Every agent call that started has ended: run to its end or cancelled with its stream.
	testenv.WaitFor(t, 2*time.Second, "every slow policy to end", func() bool {
		started := agentMetric(t, e, `policy_testagent_sleep_total{outcome="started"}`)
		ended := agentMetric(t, e, `policy_testagent_sleep_total{outcome="completed"}`) + agentMetric(t, e, `policy_testagent_sleep_total{outcome="cancelled"}`)
		return started > 0 && started == ended
	})
	// A call Envoy gives up on is cancelled at the agent: the kernel sends a cancel for its
	// call_id on the shared stream.
	if n := agentMetric(t, e, `policy_testagent_sleep_total{outcome="cancelled"}`); n == 0 {
		t.Error("no agent call was cancelled: the early ends did not land inside agent calls")
	}
	// Envoy's way of ending a stream is no error.
	if n := metric(t, e, "policy_kernel_protocol_errors_total") - protoBefore; n != 0 {
		t.Errorf("%v protocol errors counted", n)
	}
	if n := metric(t, e, `policy_kernel_agent_unavailable_total{agent="a"}`) + metric(t, e, `policy_kernel_agent_timeouts_total{agent="a"}`); n != 0 {
		t.Errorf("streams that Envoy ended were counted as %v agent failures", n)
	}
	for _, l := range strings.Split(e.Kernel.Logs.String(), "\n") {
		if strings.Contains(l, `"level":"error"`) || strings.Contains(l, `"level":"warn"`) {
			t.Errorf("kernel logged: %s", l)
		}
	}
	// Still serving.
	c2 := e.Dial(t, envoyConfig)
	if s := play(c2, "/both", request("/both")); s.outcome() != "upstream" {
		t.Fatalf("after the storm: %s", s.outcome())
	}
}

// TestNoGoroutineLeakInProcess runs the kernel and the agent in this process, plays the same
// early ends, stops both, and checks with goleak that every goroutine they started has ended.
func TestNoGoroutineLeakInProcess(t *testing.T) {
	opts := []goleak.Option{goleak.IgnoreCurrent()}
	dir := t.TempDir()
	sock := filepath.Join(dir, "agent.sock")
	agentCfg := filepath.Join(dir, "agent.yaml")
	kernelCfg := filepath.Join(dir, "kernel.yaml")
	expand := strings.NewReplacer("{{SOCK}}", sock, `  observability:
    metrics_address: "{{AGENT_METRICS}}"
`, "").Replace
	if err := os.WriteFile(agentCfg, []byte(expand(agentYAML)), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(kernelCfg, []byte(expand(leakKernelYAML)), 0o600); err != nil {
		t.Fatal(err)
	}
	addr, metrics := testenv.FreeAddr(t), testenv.FreeAddr(t)

	run := func(main func(context.Context, []string, io.Writer) error, args ...string) (stop func() error) {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- main(ctx, args, io.Discard) }()
		return func() error {
			cancel()
			select {
			case err := <-done:
				return err
			case <-time.After(15 * time.Second):
				return fmt.Errorf("did not stop")
			}
		}
	}
	stopAgent := run(agent.Main, "--config", agentCfg)
	stopKernel := run(kernel.Main, "--config", kernelCfg, "--listen", addr, "--metrics-listen", metrics, "--admin-listen", "127.0.0.1:0")
	c, err := envoytest.Dial(addr, envoyConfig)
	if err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, 10*time.Second, "the kernel to serve", func() bool {
		return play(c, "/both", request("/both")).outcome() == "upstream"
	})
	if err := earlyEndStorm(addr, 4, scale(5, 50)); err != nil {
		t.Error(err)
	}
	for range 20 {
		if s := play(c, "/body", request("/body")); s.outcome() != "upstream" {
			t.Errorf("/body: %s", s.outcome())
		}
	}
	c.Close()
	if err := stopKernel(); err != nil {
		t.Errorf("kernel: %v", err)
	}
	if err := stopAgent(); err != nil {
		t.Errorf("agent: %v", err)
	}
	goleak.VerifyNone(t, opts...)
}
