package kernel

import (
	"context"
	"strings"
	"testing"
	"time"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// staticAgent is a validatingAgent that reports the entries of policy "hdr" as static, with
// the instructions ins, as the real agent does for addSecurityHeaders.
type staticAgent struct {
	*validatingAgent
	ins []*agentv1.Instruction
}

func (a *staticAgent) ValidateChains(ctx context.Context, entries []*agentv1.ChainEntry) (*agentv1.ValidateChainsResponse, error) {
	vr, err := a.validatingAgent.ValidateChains(ctx, entries)
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		f := &agentv1.EntryFacts{}
		if e.GetPolicy().GetName() == "hdr" || e.GetPolicy().GetName() == "allowAll" {
			f.StaticOutcome = &agentv1.StaticOutcome{}
			if e.GetPolicy().GetName() == "hdr" {
				f.StaticOutcome.Instructions = a.ins
			}
		}
		vr.Facts = append(vr.Facts, f)
	}
	return vr, nil
}

const staticConfig = `policy_kernel:
  agents:
    - name: a
      socket_path: /unused.sock
      timeout_ms: 50
  route_policies:
    - route_name: /static
      request_policy_chain:
        - policy: auth
      response_policy_chain:
        - policy: hdr
    - route_name: /open
      request_policy_chain:
        - policy: allowAll
    - route_name: /shadow
      response_policy_chain:
        - policy: hdr
          mode: shadow
    - route_name: /mixed
      response_policy_chain:
        - policy: hdr
        - policy: lean
`

// TestStaticChains: a response chain whose entries the agent reports as static is answered by
// the kernel without a call, with what the agent would have answered (Envoy's rejected
// mutations dropped as from a reply), and its request context is let go after the request
// phase; a request chain of allowAll is answered the same way. A chain with an entry in
// shadow or with an entry that is not static is called as before, and so is every chain of an
// agent that reports no static outcome (an older build).
func TestStaticChains(t *testing.T) {
	tk := newTestKernel(t, staticConfig, &fakeAgent{})
	va := &staticAgent{validatingAgent: &validatingAgent{fakeAgent: tk.agent},
		ins: []*agentv1.Instruction{setHeader("X-Frame-Options", "DENY"), setHeader(":status", "abc"), removeHeader("server")}}
	snap := tk.s.Snapshot()
	for _, a := range snap.agents {
		a.client = va
	}
	errs := checkEntries(snap.Config, snap.agents, time.Second)
	snap = buildSnapshot(snap.Config, snap.Version, snap.agents, tk.m)
	tk.s.Store(snap)
	if len(errs) > 0 || len(snap.invalid) > 0 {
		t.Fatalf("%v %v", errs, snap.invalid)
	}

	st := tk.open(t)
	st.send(t, reqHeaders("/static", false, "/static"))
	if tk.agent.ncalls() != 1 || tk.agent.call(0).GetPhase() != agentv1.PolicyPhase_REQUEST {
		t.Fatalf("request phase: %d calls", tk.agent.ncalls())
	}
	r := st.send(t, respHeaders("200", true, "server", "x"))
	if tk.agent.ncalls() != 1 {
		t.Fatalf("the static response chain called the agent")
	}
	hm := r.GetResponseHeaders().GetResponse().GetHeaderMutation()
	if h := setHeadersOf(t, hm); len(h) != 1 || h["x-frame-options"] != "DENY" || len(hm.GetRemoveHeaders()) != 1 || hm.GetRemoveHeaders()[0] != "server" {
		t.Fatalf("static reply: %v", hm)
	}

	// An agent found down is called as before, so that the answer is that of an agent down.
	tk.state.healthy.Store(false)
	st = tk.open(t)
	st.send(t, reqHeaders("/static", false, "/static"))
	st.send(t, respHeaders("200", true))
	if tk.agent.ncalls() != 3 {
		t.Fatalf("agent found down: %d calls, want the response chain called", tk.agent.ncalls())
	}
	tk.state.healthy.Store(true)
	tk.agent.mu.Lock()
	tk.agent.calls = tk.agent.calls[:1]
	tk.agent.mu.Unlock()

	// allowAll alone: the request phase is answered without the agent, nothing changed.
	st = tk.open(t)
	r = st.send(t, reqHeaders("/open", true, "/open"))
	if tk.agent.ncalls() != 1 || r.GetRequestHeaders() == nil || r.GetRequestHeaders().GetResponse() != nil {
		t.Fatalf("allowAll request chain: %d calls, %v", tk.agent.ncalls(), r)
	}

	// In shadow, or next to an entry that is not static: called.
	for i, route := range []string{"/shadow", "/mixed"} {
		st = tk.open(t)
		st.send(t, reqHeaders(route, false, route))
		st.send(t, respHeaders("200", true))
		if tk.agent.ncalls() != 2+i {
			t.Fatalf("%s: %d calls, want the response chain called", route, tk.agent.ncalls())
		}
	}

	// An agent that reports no static outcome: every chain is called.
	old := &validatingAgent{fakeAgent: tk.agent}
	for _, a := range snap.agents {
		a.verdicts.Store(nil)
	}
	if snap, errs = rebuildWith(t, tk, old); len(errs) > 0 || len(snap.invalid) > 0 {
		t.Fatalf("%v %v", errs, snap.invalid)
	}
	n := tk.agent.ncalls()
	st = tk.open(t)
	st.send(t, reqHeaders("/static", false, "/static"))
	st.send(t, respHeaders("200", true))
	if tk.agent.ncalls() != n+2 {
		t.Fatalf("older agent: %d calls, want 2", tk.agent.ncalls()-n)
	}
	if !strings.Contains(tk.logs.String(), "set :status: not a valid status") {
		t.Fatalf("the dropped mutation was not logged:\n%s", tk.logs.String())
	}
}

// TestRequestDoneStatic: a stream whose response chain is static keeps neither the request
// context nor the state for its response phase; one whose response chain reads the state
// keeps it.
func TestRequestDoneStatic(t *testing.T) {
	for _, static := range []bool{true, false} {
		r := &Route{response: chain{policies: []*agentv1.Policy{{Name: "hdr"}}, noRequest: true}}
		if static {
			r.response.static = &staticChain{}
		}
		st := &stream{route: r, reqCtx: getRequestContext(), state: map[string]string{"k": "v"}}
		st.requestDone()
		if st.reqCtx != nil || (st.state == nil) != static {
			t.Errorf("static %v: request context %v, state %v", static, st.reqCtx, st.state)
		}
	}
}
