package agent

import (
	"context"
	"maps"
	"slices"
	"strings"
	"testing"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

func when(pol *agentv1.Policy, cond string) *agentv1.Policy { pol.When = cond; return pol }

// costly is a condition that exceeds the cost limit on any request.
const costly = `[1,2,3,4,5,6,7,8,9,10].all(a, [1,2,3,4,5,6,7,8,9,10].all(b, [1,2,3,4,5,6,7,8,9,10].all(c, [1,2,3,4,5,6,7,8,9,10].all(d, a+b+c+d > 0))))`

func routed(method string, policies ...*agentv1.Policy) *agentv1.PolicyRequest {
	r := req(policies...)
	r.RouteName = "orders"
	r.Context.Method = method
	return r
}

// TestWhenSkipsEntries: an entry whose condition is false does not run, sets nothing, is
// counted by policy and route, told to the hook as skipped and written to the debug log; the
// others run as usual.
func TestWhenSkipsEntries(t *testing.T) {
	e, logs := newTestExecutor(t, testCore())
	var traces []string
	e.SetEntryHook(func(tr EntryTrace) { traces = append(traces, tr.Policy+":"+tr.Outcome) })
	chain := func() []*agentv1.Policy {
		return []*agentv1.Policy{
			when(p("t.setHeader", "key", "x-write", "value", "1"), `request.method != "GET"`),
			when(p("t.setHeader", "key", "x-query", "value", "1"), `request.query["q"] == "v" && request.url_path == "/x"`),
			when(p("t.state", "key", "k", "value", "s"), `"a" in request.headers && route.name == "orders"`),
			p("t.setHeader", "key", "x-always", "value", "1"),
		}
	}
	r := e.Execute(context.Background(), routed("GET", chain()...))
	if got := headersOf(r); r.GetStatus().GetCode() != agentv1.StatusCode_OK || !maps.Equal(got, map[string]string{"x-query": "1", "x-always": "1"}) {
		t.Fatalf("GET: %v, headers %v", r.GetStatus(), got)
	}
	if want := []string{"t.setHeader:skipped", "t.setHeader:allow", "t.state:allow", "t.setHeader:allow"}; !slices.Equal(traces, want) {
		t.Fatalf("traces %v, want %v", traces, want)
	}
	r = e.Execute(context.Background(), routed("POST", chain()...))
	if got := headersOf(r); !maps.Equal(got, map[string]string{"x-write": "1", "x-query": "1", "x-always": "1"}) {
		t.Fatalf("POST: headers %v", got)
	}
	if got := metricValue(t, e, `policy_agent_entries_skipped_total{policy="t.setHeader",route="orders"}`); got != 1 {
		t.Errorf("skipped counted %v, want 1", got)
	}
	if !strings.Contains(logs.String(), "policy skipped: its when condition is false") {
		t.Errorf("no debug line for the skip:\n%s", logs)
	}
	// One compiled condition per distinct expression, whatever the number of runs.
	if n := e.snap.Load().condCount.Load(); n != 3 {
		t.Errorf("%d conditions compiled, want 3", n)
	}
}

// TestWhenReadsState: a condition sees the state that earlier entries of the chain set, and
// the state the kernel sent.
func TestWhenReadsState(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	chain := func(set bool) []*agentv1.Policy {
		c := []*agentv1.Policy{when(p("t.setHeader", "key", "x-role", "value", "checked"), `"user" in state && state["user"] == "alice"`)}
		if set {
			c = append([]*agentv1.Policy{p("t.state", "key", "user", "value", "alice")}, c...)
		}
		return c
	}
	if got := headersOf(e.Execute(context.Background(), req(chain(true)...))); got["x-role"] != "checked" {
		t.Errorf("state set by an earlier entry: headers %v", got)
	}
	if got := headersOf(e.Execute(context.Background(), req(chain(false)...))); got["x-role"] != "" {
		t.Errorf("no state: headers %v", got)
	}
	rq := req(chain(false)...)
	rq.State = map[string]string{"user": "alice"}
	if got := headersOf(e.Execute(context.Background(), rq)); got["x-role"] != "checked" {
		t.Errorf("state from the kernel: headers %v", got)
	}
}

// TestWhenErrors: a condition that fails to evaluate (a missing key, the cost limit) fails its
// entry, and on_failure decides as for a policy error; an enforcing entry denies whatever
// on_failure says, never runs open.
func TestWhenErrors(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	f := func(entry *agentv1.Policy, wantCode agentv1.StatusCode, wantAfter bool) {
		t.Helper()
		r := e.Execute(context.Background(), req(entry, p("t.setHeader", "key", "x-after", "value", "1")))
		if r.GetStatus().GetCode() != wantCode {
			t.Fatalf("%s/%s/%q: status %v (%s)", entry.GetName(), entry.GetOnFailure(), entry.GetWhen(), r.GetStatus(), r.GetMessage())
		}
		if wantCode == agentv1.StatusCode_POLICY_ERROR && !strings.Contains(r.GetMessage(), "when condition") {
			t.Fatalf("message %q does not name the condition", r.GetMessage())
		}
		if after := headersOf(r)["x-after"] == "1"; after != wantAfter {
			t.Fatalf("%s/%s: later entry ran = %v", entry.GetName(), entry.GetOnFailure(), after)
		}
	}
	for _, c := range []string{`request.headers["authorization"] == "x"`, costly, `request.method ==`} {
		f(when(p("t.setHeader", "key", "x", "value", "1"), c), agentv1.StatusCode_POLICY_ERROR, false)
		f(onFailure(when(p("t.setHeader", "key", "x", "value", "1"), c), "continue"), agentv1.StatusCode_OK, true)
		f(onFailure(when(p("t.setHeader", "key", "x", "value", "1"), c), "skip_remaining"), agentv1.StatusCode_OK, false)
		for _, mode := range []string{"", "continue", "skip_remaining"} {
			f(onFailure(when(p("t.guard", "key", "a", "want", "1"), c), mode), agentv1.StatusCode_POLICY_ERROR, false)
		}
	}
	// A shadow entry whose condition fails is a shadow error: nothing fails.
	rq := req(shadowed(when(p("t.guard", "key", "a", "want", "1"), costly)), p("t.setHeader", "key", "x-after", "value", "1"))
	if r := e.Execute(context.Background(), rq); r.GetStatus().GetCode() != agentv1.StatusCode_OK || headersOf(r)["x-after"] != "1" {
		t.Fatalf("shadow: %v", r)
	}
}

// TestWhenOwnedHeadersStripped: the headers a policy owns are removed from the client's
// request whether its entry runs or is skipped, so that a skipped jwtValidation cannot let a
// client's own X-User-ID through; and the conditions see the request without them.
func TestWhenOwnedHeadersStripped(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	removals := []string{"remove X_USER_ID", "remove x-user-id", "remove x-user_id", "remove x_user_id"}
	r := e.Execute(context.Background(), spoofed(agentv1.PolicyPhase_REQUEST,
		when(p("t.owner", "key", "x-user-id", "value", "verified"), `request.method == "POST"`),
		when(p("t.setHeader", "key", "x-saw-spoof", "value", "1"), `request.headers.exists(k, k.matches("(?i)^x[-_]user[-_]id$"))`),
	))
	got := headerOps(r)
	slices.Sort(got)
	if r.GetStatus().GetCode() != agentv1.StatusCode_OK || !slices.Equal(got, removals) {
		t.Fatalf("status %v, instructions %q, want %q", r.GetStatus(), got, removals)
	}
}

// TestWhenShadow: a shadow entry whose condition is false is skipped like any other: no
// shadow decision is counted.
func TestWhenShadow(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	rq := routed("GET", shadowed(when(p("t.denyBare"), `request.method == "POST"`)))
	if r := e.Execute(context.Background(), rq); r.GetStatus().GetCode() != agentv1.StatusCode_OK {
		t.Fatalf("%v", r)
	}
	if got := metricValue(t, e, `policy_agent_shadow_decisions_total{policy="t.denyBare",route="orders",decision="deny"}`); got != 0 {
		t.Errorf("a skipped shadow entry counted a decision")
	}
	if got := metricValue(t, e, `policy_agent_entries_skipped_total{policy="t.denyBare",route="orders"}`); got != 1 {
		t.Errorf("skipped counted %v, want 1", got)
	}
}

// TestWhenObserver: an observer (auditLog) whose condition skipped it does not observe the
// chain; one the chain did not reach observes when its condition holds.
func TestWhenObserver(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	f := func(want bool, chain ...*agentv1.Policy) {
		t.Helper()
		e.Execute(context.Background(), routed("GET", chain...))
		select {
		case <-observed.seen:
			if !want {
				t.Fatal("observer called")
			}
		default:
			if want {
				t.Fatal("observer not called")
			}
		}
	}
	f(false, when(p("t.observer"), `request.method == "POST"`))
	f(true, when(p("t.observer"), `request.method == "GET"`))
	f(false, p("t.denyBare"), when(p("t.observer"), `request.method == "POST"`))
	f(true, p("t.denyBare"), when(p("t.observer"), `request.method == "GET"`))
}

// TestWhenAdvertisedAndValidated: the agent advertises the feature, and ValidateChains
// refuses an entry whose condition does not compile.
func TestWhenAdvertisedAndValidated(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	if got := e.Describe().GetAgentMetadata()["features"]; !slices.Contains(strings.Split(got, ","), "when") {
		t.Fatalf("features %q", got)
	}
	msgs := e.ValidateChains([]*agentv1.ChainEntry{
		{Policy: when(p("t.setHeader", "key", "x", "value", "1"), `request.method == "GET"`), Phase: agentv1.PolicyPhase_REQUEST},
		{Policy: when(p("t.setHeader", "key", "x", "value", "1"), `request.methd == "GET"`), Phase: agentv1.PolicyPhase_REQUEST},
	})
	if msgs[0] != "" || !strings.Contains(msgs[1], "invalid when condition") || !strings.Contains(msgs[1], "undeclared reference") {
		t.Fatalf("verdicts %q", msgs)
	}
}

// TestWhenResponse: a response chain's condition reads the response's status and headers; one
// that reads the response in the request phase fails its entry, and the agent refuses to build
// it.
func TestWhenResponse(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	resp := func(status int, h map[string]string) *agentv1.PolicyRequest {
		r := req(when(p("t.setHeader", "key", "x-alert", "value", "1"), `response.code >= 500 || "x-debug" in response.headers`))
		r.Phase = agentv1.PolicyPhase_RESPONSE
		r.Response = &agentv1.ResponseContext{StatusCode: int32(status), Headers: h}
		return r
	}
	for _, c := range []struct {
		status int
		h      map[string]string
		want   string
	}{{502, nil, "1"}, {200, map[string]string{"x-debug": "y"}, "1"}, {200, nil, ""}} {
		if got := headersOf(e.Execute(context.Background(), resp(c.status, c.h)))["x-alert"]; got != c.want {
			t.Errorf("%d %v: x-alert %q, want %q", c.status, c.h, got, c.want)
		}
	}
	r := e.Execute(context.Background(), req(when(p("t.setHeader", "key", "x", "value", "1"), `response.code == 200`)))
	if r.GetStatus().GetCode() != agentv1.StatusCode_POLICY_ERROR || !strings.Contains(r.GetMessage(), "reads the response in the request phase") {
		t.Errorf("request phase: %v", r)
	}
	msgs := e.ValidateChains([]*agentv1.ChainEntry{
		{Policy: when(p("t.setHeader", "key", "x", "value", "1"), `response.code == 200`), Phase: agentv1.PolicyPhase_REQUEST},
		{Policy: when(p("t.setHeader", "key", "x", "value", "1"), `response.code == 200`), Phase: agentv1.PolicyPhase_RESPONSE},
	})
	if !strings.Contains(msgs[0], "reads the response in the request phase") || msgs[1] != "" {
		t.Errorf("verdicts %q", msgs)
	}
}
