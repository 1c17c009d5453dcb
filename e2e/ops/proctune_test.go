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

// Both binaries run on one processor while they are idle, and keep the GOMAXPROCS an operator
// sets in their environment.
func TestIdleProcessesRunOnOneProcessor(t *testing.T) {
	if runtime.NumCPU() < 2 {
		t.Skip("one CPU: nothing to tune")
	}
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: fmt.Sprintf(kernelYAML, "gmp"), AgentEnv: []string{"GOMAXPROCS=2"}})
	do(t, e.Dial(t, envoyConfig)) // a request goes through
	// Starting up is busy and may have given the kernel a second processor: idle, it goes back
	// to one within a second or so.
	testenv.WaitFor(t, 10*time.Second, "the idle kernel's go_gomaxprocs to be 1", func() bool {
		_, kout := e.Get(t, "/metrics")
		return gauge(t, kout, "go_gomaxprocs") == "1"
	})
	code, aout := e.GetAgent(t, "/metrics")
	if code != 200 {
		t.Fatalf("agent /metrics: %d %s", code, aout)
	}
	if got := gauge(t, aout, "go_gomaxprocs"); got != "2" {
		t.Errorf("the agent's go_gomaxprocs = %s, want the 2 its environment sets", got)
	}
}
