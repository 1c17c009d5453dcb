package kernel

import (
	"context"
	"sync"
	"testing"
	"time"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// idAgent is a PolicyAgent that keeps chains by id per stream, as the real agent does, and
// records what each request carried.
type idAgent struct {
	agentv1.UnimplementedPolicyAgentServer
	advertise bool // chain_ids in GetAgentConfig
	mu        sync.Mutex
	seen      []string // "full" or "id" per request, in order
	forget    bool     // drop the kept chains before the next request
	neverKeep bool     // answer CHAIN_UNKNOWN to every request (a broken agent)
}

func (a *idAgent) GetAgentConfig(context.Context, *agentv1.GetAgentConfigRequest) (*agentv1.GetAgentConfigResponse, error) {
	return &agentv1.GetAgentConfigResponse{AgentName: "ids", ChainIds: a.advertise}, nil
}

func (a *idAgent) ExecuteStream(st agentv1.PolicyAgent_ExecuteStreamServer) error {
	kept := map[uint64]bool{}
	for {
		b, err := st.Recv()
		if err != nil {
			return nil
		}
		for _, req := range b.GetRequests() {
			a.mu.Lock()
			if a.forget {
				clear(kept)
				a.forget = false
			}
			what := "id"
			if len(req.GetPolicies()) > 0 {
				what = "full"
				kept[req.GetChainId()] = true
			}
			a.seen = append(a.seen, what)
			code := agentv1.StatusCode_OK
			if a.neverKeep || !kept[req.GetChainId()] {
				code = agentv1.StatusCode_CHAIN_UNKNOWN
			}
			a.mu.Unlock()
			resp := &agentv1.PolicyResponse{CallId: req.GetCallId(), Status: &agentv1.ResponseStatus{Code: code}}
			if err := st.Send(&agentv1.PolicyResponseBatch{Responses: []*agentv1.PolicyResponse{resp}}); err != nil {
				return err
			}
		}
	}
}

func (a *idAgent) take() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	s := a.seen
	a.seen = nil
	return s
}

// TestStreamClientChainIDs: to an agent that keeps chains by id, a chain's policies go once per
// stream and later calls carry the id alone; an agent that answers CHAIN_UNKNOWN (it lost
// them: restarted, or its table was full) gets the policies again in the same call, once; an
// agent that does not advertise chain ids always gets the policies.
func TestStreamClientChainIDs(t *testing.T) {
	call := func(c *streamAgentClient) agentv1.StatusCode {
		t.Helper()
		req := &agentv1.PolicyRequest{RequestId: "r", ChainId: chainIDOf([]*agentv1.Policy{{Name: "auth"}}), Policies: []*agentv1.Policy{{Name: "auth"}}}
		resp, err := c.ExecuteTimeout(context.Background(), req, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if len(req.GetPolicies()) != 1 {
			t.Fatal("the caller's request lost its policies")
		}
		return resp.GetStatus().GetCode()
	}
	equal := func(got []string, want ...string) bool {
		if len(got) != len(want) {
			return false
		}
		for i := range got {
			if got[i] != want[i] {
				return false
			}
		}
		return true
	}
	for _, advertise := range []bool{true, false} {
		path := socketPath(t)
		a := &idAgent{advertise: advertise}
		serveAgent(t, path, a)
		c := newTestStreamClient(t, path, 1)
		c.verify = true
		for range 3 {
			if code := call(c); code != agentv1.StatusCode_OK {
				t.Fatalf("advertise %v: %v", advertise, code)
			}
		}
		if !advertise {
			if got := a.take(); !equal(got, "full", "full", "full") {
				t.Fatalf("agent without chain ids got %v", got)
			}
			continue
		}
		if got := a.take(); !equal(got, "full", "id", "id") {
			t.Fatalf("agent with chain ids got %v", got)
		}
		a.mu.Lock()
		a.forget = true
		a.mu.Unlock()
		if code := call(c); code != agentv1.StatusCode_OK {
			t.Fatalf("after the agent forgot: %v", code)
		}
		if got := a.take(); !equal(got, "id", "full") {
			t.Fatalf("after the agent forgot: %v", got)
		}
		// An agent that never keeps them: one resend, then its answer, which the kernel
		// judges (an unknown status: invalid agent response, never an allow).
		a.mu.Lock()
		a.neverKeep = true
		a.mu.Unlock()
		if code := call(c); code != agentv1.StatusCode_CHAIN_UNKNOWN {
			t.Fatalf("broken agent: %v", code)
		}
		if got := a.take(); !equal(got, "id", "full") {
			t.Fatalf("broken agent: %v", got)
		}
	}
}

// TestChainIDs: the same policies get the same id, other policies (any setting) another, an
// empty chain none.
func TestChainIDs(t *testing.T) {
	a := []*agentv1.Policy{{Name: "auth", Metadata: map[string]string{"k": "v", "j": "w"}}}
	b := []*agentv1.Policy{{Name: "auth", Metadata: map[string]string{"j": "w", "k": "v"}}}
	c := []*agentv1.Policy{{Name: "auth", Metadata: map[string]string{"k": "v", "j": "w"}, Shadow: true}}
	d := []*agentv1.Policy{{Name: "auth", Metadata: map[string]string{"k": "v", "j": "w"}, When: "true"}}
	if chainIDOf(a) == 0 || chainIDOf(a) != chainIDOf(b) {
		t.Fatal("the same chain got different ids")
	}
	if chainIDOf(a) == chainIDOf(c) || chainIDOf(a) == chainIDOf(d) || chainIDOf(c) == chainIDOf(d) {
		t.Fatal("different chains share an id")
	}
	if chainIDOf(nil) != 0 {
		t.Fatal("an empty chain got an id")
	}
}
