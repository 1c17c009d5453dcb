package policyctl

import (
	"github.com/policy-engine/policy-engine/agent"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/kernel"
)

// kernelSkipMessage is what explain says of an entry the kernel skipped.
const kernelSkipMessage = "when condition is false: the kernel decided, the agent was not called"

// kernelSkipped records a phase whose chain the kernel let go without the agent, every entry's
// when condition being false (kernel.Server.SetSkipHook).
func (t *tracer) kernelSkipped(_ string, phase agentv1.PolicyPhase) {
	t.mu.Lock()
	t.skipped = append(t.skipped, phase)
	t.mu.Unlock()
}

// withKernelSkips returns the traces with one "skipped" trace for every entry of a chain the
// kernel skipped, so that explain shows where the decision was made.
func (t *tracer) withKernelSkips(c kernel.RouteChoice) []agent.EntryTrace {
	traces := t.take()
	t.mu.Lock()
	defer t.mu.Unlock()
	return kernelSkips(c, t.skipped, traces)
}

// kernelSkips appends to traces a "skipped" trace for every entry of the chains of the phases
// the kernel skipped.
func kernelSkips(c kernel.RouteChoice, skipped []agentv1.PolicyPhase, traces []agent.EntryTrace) []agent.EntryTrace {
	for _, ph := range skipped {
		chain := c.Request
		if ph == agentv1.PolicyPhase_RESPONSE {
			chain = c.Response
		}
		for i, p := range chain {
			traces = append(traces, agent.EntryTrace{Phase: ph, Index: i, Policy: p.GetName(), Outcome: "skipped", OnFailure: p.GetOnFailure(), Message: kernelSkipMessage})
		}
	}
	return traces
}
