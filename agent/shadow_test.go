package agent

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

func shadowed(pol *agentv1.Policy) *agentv1.Policy { pol.Shadow = true; return pol }

// TestShadowEnforcesNothing checks that a shadow entry's denial, failure (of a policy that
// enforces too), header, body and state changes leave the chain as if the entry were not
// there, while each is counted by decision.
func TestShadowEnforcesNothing(t *testing.T) {
	e, logs := newTestExecutor(t, testCore())
	r := req(
		shadowed(p("t.guard", "key", "x-key", "want", "secret")),    // would deny 401
		shadowed(onFailure(p("t.guard", "want", "fail"), "deny")),   // would fail
		shadowed(p("t.setHeader", "key", "x-shadow", "value", "1")), // dropped
		shadowed(p("t.state", "key", "k", "value", "v")),            // dropped
		shadowed(p("t.body", "value", "replaced")),                  // dropped
		shadowed(p("t.status", "value", "POLICY_ERROR")),            // would fail
		shadowed(p("t.denyBare")),                                   // would deny 403
		p("t.requireHeader", "key", "x-shadow", "want", ""),         // sees no shadow header
		p("t.setHeader", "key", "x-real", "value", "1"),
	)
	r.RouteName = "r1"
	resp := e.Execute(context.Background(), r)
	if resp.GetStatus().GetCode() != agentv1.StatusCode_OK {
		t.Fatalf("status %v: %s", resp.GetStatus(), resp.GetMessage())
	}
	if len(resp.GetInstructions()) != 1 || resp.GetInstructions()[0].GetHeader().GetKey() != "x-real" {
		t.Fatalf("instructions %v, want only the enforcing entry's", resp.GetInstructions())
	}
	var b bytes.Buffer
	e.metrics.set.WritePrometheus(&b)
	for series, want := range map[string]float64{
		`policy_agent_shadow_decisions_total{policy="t.guard",route="r1",decision="deny"}`:      1,
		`policy_agent_shadow_decisions_total{policy="t.guard",route="r1",decision="error"}`:     1,
		`policy_agent_shadow_decisions_total{policy="t.setHeader",route="r1",decision="allow"}`: 1,
		`policy_agent_shadow_decisions_total{policy="t.status",route="r1",decision="error"}`:    1,
		`policy_agent_shadow_decisions_total{policy="t.denyBare",route="r1",decision="deny"}`:   1,
		`policy_agent_executions_total{policy="t.guard",status="denied"}`:                       0,
		`policy_agent_fail_closed_total{policy="t.guard"}`:                                      0,
	} {
		if got := testenv.Metric(b.String(), series); got != want {
			t.Errorf("%s = %v, want %v", series, got, want)
		}
	}
	if n := strings.Count(logs.String(), "shadow policy would have refused"); n != 4 {
		t.Errorf("%d shadow log lines, want 4:\n%s", n, logs)
	}
	if !strings.Contains(logs.String(), `"status":401`) || !strings.Contains(logs.String(), `"request_id":"r1"`) {
		t.Errorf("log lacks the status or the request id:\n%s", logs)
	}
}

// TestShadowDenialDoesNotEndChain checks that an entry after a shadow denial runs, and that
// the same chain without the flag denies: the switch is the flag alone.
func TestShadowDenialDoesNotEndChain(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	guard := p("t.guard", "key", "x-key", "want", "secret")
	after := p("t.setHeader", "key", "x-after", "value", "1")
	guard.Shadow = true
	if resp := e.Execute(context.Background(), req(guard, after)); resp.GetStatus().GetCode() != agentv1.StatusCode_OK || len(resp.GetInstructions()) != 1 {
		t.Fatalf("shadow: %v %v", resp.GetStatus(), resp.GetInstructions())
	}
	guard.Shadow = false
	resp := e.Execute(context.Background(), req(guard, after))
	if resp.GetStatus().GetCode() != agentv1.StatusCode_POLICY_DENIED || immediate(resp).GetStatusCode() != 401 {
		t.Fatalf("enforce: %v", resp.GetStatus())
	}
}

// TestShadowDeadline checks that a shadow entry still runs within the chain's deadline: one
// that overruns it times the chain out like any entry (the kernel stopped waiting), counted
// as a shadow error.
func TestShadowDeadline(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	r := req(shadowed(p("t.deaf", "sleep", "30ms")), p("t.setHeader", "key", "x", "value", "1"))
	r.RouteName = "slow"
	r.DeadlineMs = 5
	resp := e.Execute(context.Background(), r)
	if resp.GetStatus().GetCode() != agentv1.StatusCode_TIMEOUT || len(resp.GetInstructions()) != 0 {
		t.Fatalf("status %v, instructions %v", resp.GetStatus(), resp.GetInstructions())
	}
	var b bytes.Buffer
	e.metrics.set.WritePrometheus(&b)
	if got := testenv.Metric(b.String(), `policy_agent_shadow_decisions_total{policy="t.deaf",route="slow",decision="error"}`); got != 1 {
		t.Fatalf("shadow error count %v", got)
	}
}

// TestShadowObserved checks that the chain's observers get the shadow entries' would-be
// refusals with the chain's real outcome.
func TestShadowObserved(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	e.Execute(context.Background(), req(shadowed(p("t.guard", "key", "x-key", "want", "k")), p("t.observer")))
	got := <-observed.seen
	want := policy.Outcome{Status: agentv1.StatusCode_OK, Shadow: []policy.ShadowDecision{{Policy: "t.guard", Decision: "deny", HTTPStatus: 401, Message: "no"}}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("outcome %+v, want %+v", got, want)
	}
}

// TestShadowLogThrottled checks that a flood of shadow refusals writes at most
// shadowLogPerSecond lines a second, and that the next line written counts the others.
func TestShadowLogThrottled(t *testing.T) {
	var r rateLog
	r.perSecond = 3
	for i := range 10 {
		ok, _ := r.allow(100)
		if ok != (i < 3) {
			t.Fatalf("event %d: allowed %v", i, ok)
		}
	}
	if ok, n := r.allow(101); !ok || n != 7 {
		t.Fatalf("next second: %v, %d suppressed, want true, 7", ok, n)
	}
	if _, n := r.allow(101); n != 0 {
		t.Fatalf("suppressed count reported twice: %d", n)
	}
}

// TestShadowRouteLabelBounded checks that the route label takes at most maxShadowRoutes
// values, then "other".
func TestShadowRouteLabelBounded(t *testing.T) {
	m := newAgentMetrics()
	for i := range maxShadowRoutes + 5 {
		m.shadow("p", fmt.Sprint("r", i), shadowDeny)
	}
	var b bytes.Buffer
	m.set.WritePrometheus(&b)
	if got := testenv.Metric(b.String(), `policy_agent_shadow_decisions_total{policy="p",route="other",decision="deny"}`); got != 5 {
		t.Fatalf("other = %v, want 5", got)
	}
	if n := strings.Count(b.String(), `decision="deny"`); n != maxShadowRoutes+1 {
		t.Fatalf("%d deny series, want %d", n, maxShadowRoutes+1)
	}
}
