package ops

import (
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

// gauge reads one unlabelled sample of a Prometheus text exposition.
func gauge(t *testing.T, text, name string) string {
	t.Helper()
	for line := range strings.SplitSeq(text, "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("no %s sample in:\n%s", name, text)
	return ""
}

// The agent runs on one processor while it is idle, unless its environment sets GOMAXPROCS;
// the kernel keeps the runtime's choice.
func TestIdleAgentRunsOnOneProcessor(t *testing.T) {
	if runtime.NumCPU() < 2 {
		t.Skip("one CPU: nothing to tune")
	}
	agentProcs := func(e *testenv.Env) string {
		code, out := e.GetAgent(t, "/metrics")
		if code != 200 {
			t.Fatalf("agent /metrics: %d %s", code, out)
		}
		return gauge(t, out, "go_gomaxprocs")
	}
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: fmt.Sprintf(kernelYAML, "gmp")})
	do(t, e.Dial(t, envoyConfig)) // a request goes through
	// Starting up is busy and may have given the agent a second processor: idle, it goes back
	// to one within a second or so.
	testenv.WaitFor(t, 10*time.Second, "the idle agent's go_gomaxprocs to be 1", func() bool { return agentProcs(e) == "1" })
	_, kout := e.Get(t, "/metrics")
	if got, want := gauge(t, kout, "go_gomaxprocs"), fmt.Sprint(runtime.GOMAXPROCS(0)); got != want {
		t.Errorf("the kernel's go_gomaxprocs = %s, want the runtime's %s", got, want)
	}

	e2 := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: fmt.Sprintf(kernelYAML, "gmp2"), AgentEnv: []string{"GOMAXPROCS=2"}})
	time.Sleep(1500 * time.Millisecond) // time enough for a tuner to have taken processors away
	if got := agentProcs(e2); got != "2" {
		t.Errorf("the agent's go_gomaxprocs = %s, want the 2 its environment sets", got)
	}
}
