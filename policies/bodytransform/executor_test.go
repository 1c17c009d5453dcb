package bodytransform

import (
	"context"
	"io"
	"testing"

	"github.com/policy-engine/policy-engine/agent"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
)

// newExecutor returns an agent executor loaded with a minimal config, running the policies
// compiled into this test binary.
func newExecutor(t *testing.T) *agent.Executor {
	t.Helper()
	cfg, err := agent.ParseConfig("agent.yaml", []byte("agent_core:\n  name: test\n  socket_path: unix:///nonexistent.sock\n"))
	if err != nil {
		t.Fatal(err)
	}
	level, _ := logging.ParseLevel("error")
	e := agent.NewExecutor(logging.New(io.Discard, "agent", level))
	if err := e.Load(cfg.AgentCore, "test"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return e
}

// TestThroughExecutor runs the policy the way the agent does for a response phase.
func TestThroughExecutor(t *testing.T) {
	e := newExecutor(t)
	req := &agentv1.PolicyRequest{
		RequestId: "req-1",
		RouteName: "users",
		Phase:     agentv1.PolicyPhase_RESPONSE,
		Policies: []*agentv1.Policy{{
			Name:     Name,
			Metadata: map[string]string{"remove_fields": `["internal_id","items.internal_id"]`},
		}},
		Context: &agentv1.RequestContext{Method: "GET", Path: "/api/v1/users"},
		Response: &agentv1.ResponseContext{
			StatusCode: 200,
			Headers:    map[string]string{"content-type": "application/json; charset=utf-8", "content-length": "96"},
			Body:       []byte(`{"internal_id":"u-1","name":"Ada","items":[{"id":12345678901234567890,"internal_id":7},{"id":2}]}`),
		},
	}
	resp := e.Execute(context.Background(), req)
	if resp.GetStatus().GetCode() != agentv1.StatusCode_OK {
		t.Fatalf("status = %v: %s", resp.GetStatus(), resp.GetMessage())
	}
	var bodies []string
	for _, in := range resp.GetInstructions() {
		switch in.GetType() {
		case agentv1.InstructionType_SET_BODY:
			bodies = append(bodies, string(in.GetBody().GetBody()))
		default:
			t.Fatalf("unexpected instruction %v", in)
		}
	}
	want := `{"name":"Ada","items":[{"id":12345678901234567890},{"id":2}]}`
	if len(bodies) != 1 || bodies[0] != want {
		t.Fatalf("bodies = %q, want [%q]", bodies, want)
	}

	// An unchanged body yields no instruction at all.
	req.Response.Body = []byte(`{"name":"Ada"}`)
	resp = e.Execute(context.Background(), req)
	if resp.GetStatus().GetCode() != agentv1.StatusCode_OK || len(resp.GetInstructions()) != 0 {
		t.Fatalf("unchanged body: %v", resp)
	}
}
