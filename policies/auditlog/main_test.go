package auditlog

import (
	"context"
	"testing"

	"github.com/policy-engine/policy-engine/agent/policy"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if a sink's writer goroutine outlives them: every Close
// must end its goroutine.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// runResponse runs a response phase as the agent does: Execute, then ObserveChain with the
// chain's outcome (here: allowed).
func runResponse(p policy.Policy, c *policy.Context) (policy.Result, error) {
	r, err := p.Execute(context.Background(), c)
	if o, ok := p.(policy.ChainObserver); ok {
		o.ObserveChain(c, policy.Outcome{})
	}
	return r, err
}
