package agent

import (
	"fmt"
	"sync/atomic"
	"time"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// Shadow decisions, the decision label of policy_agent_shadow_decisions_total.
const (
	shadowAllow = "allow"
	shadowDeny  = "deny"
	shadowError = "error"
)

// shadowLogPerSecond caps the log lines of shadow entries that would have refused: a shadow
// rule that refuses most traffic must not fill the disk. The next line allowed says how many
// were left out.
const shadowLogPerSecond = 20

// shadowRun records what a shadow entry would have done had it enforced: allow, deny (a
// denial or an immediate response, with its status) or error (a failure: an error, a panic,
// POLICY_ERROR or TIMEOUT, an unknown status, an invalid instruction, or an answer after the
// chain's deadline). It reports false when the entry returned after the chain's deadline,
// which ends the chain as it would for any entry: the kernel has stopped waiting.
func (e *Executor) shadowRun(req *agentv1.PolicyRequest, name string, result policy.Result, err error, late bool, took time.Duration, now time.Time, out *[]policy.ShadowDecision) bool {
	e.metrics.forPolicy(name).duration.Update(took.Seconds())
	decision, status, msg := shadowAllow, 0, ""
	switch {
	case err != nil:
		decision, msg = shadowError, err.Error()
	case result.Status == agentv1.StatusCode_OK || result.Status == agentv1.StatusCode_POLICY_DENIED:
		// The instructions are checked as an enforcing entry's are, never applied.
		if cerr := applyInstructions(nil, result.Instructions, 0); cerr != nil {
			decision, msg = shadowError, fmt.Sprintf("policy %q: %v", name, cerr)
		} else if terminal(result) {
			decision, status, msg = shadowDeny, immediateStatus(result), result.Message
		}
	default: // TIMEOUT, POLICY_ERROR, or a code this agent does not know
		decision, msg = shadowError, fmt.Sprintf("policy %q returned status %s: %s", name, result.Status, result.Message)
	}
	if late && decision == shadowAllow {
		// A late allow is no decision, as for an enforcing entry; a late denial is a denial.
		decision, msg = shadowError, fmt.Sprintf("policy %q returned after the chain's deadline", name)
	}
	e.metrics.shadow(name, req.GetRouteName(), decision)
	if decision != shadowAllow {
		*out = append(*out, policy.ShadowDecision{Policy: name, Decision: decision, HTTPStatus: status, Message: msg})
		e.logShadow(req, name, decision, status, msg, now)
	}
	return !late
}

// immediateStatus is the HTTP status a terminal result answers: its immediate response's, or
// the 403 the agent gives a denial without one (finish).
func immediateStatus(r policy.Result) int {
	for _, in := range r.Instructions {
		if ir := in.GetImmediateResponse(); ir != nil && in.GetType() == agentv1.InstructionType_IMMEDIATE_RESPONSE {
			return int(ir.GetStatusCode())
		}
	}
	return 403
}

// logShadow logs what a shadow entry would have refused, at most shadowLogPerSecond lines a
// second; a line written after some were left out carries their count (suppressed).
func (e *Executor) logShadow(req *agentv1.PolicyRequest, name, decision string, status int, msg string, now time.Time) {
	ok, suppressed := e.shadowLog.allow(now.Unix())
	if !ok {
		return
	}
	if ev := e.log.Warn(); ev != nil {
		ev = ev.Str("request_id", req.GetRequestId()).Str("route", req.GetRouteName()).Str("policy", name).
			Str("phase", phaseName(req.GetPhase())).Str("decision", decision).Str("reason", msg)
		if status != 0 {
			ev = ev.Int("status", status)
		}
		if suppressed > 0 {
			ev = ev.Int64("suppressed", suppressed)
		}
		ev.Msg("shadow policy would have refused; not enforced")
	} else if suppressed > 0 {
		e.shadowLog.suppressed.Add(suppressed) // keep the count for a line that is written
	}
}

func phaseName(p agentv1.PolicyPhase) string {
	if p == agentv1.PolicyPhase_RESPONSE {
		return "response"
	}
	return "request"
}

// rateLog lets through at most perSecond events per wall-clock second and counts the others.
// Its races are benign: two goroutines starting a second at once may let a few more through.
type rateLog struct {
	perSecond  int64
	second     atomic.Int64
	n          atomic.Int64
	suppressed atomic.Int64
}

// allow reports whether an event of the given second may be logged and, when it may, how
// many events were left out since the last one logged.
func (r *rateLog) allow(second int64) (bool, int64) {
	if cur := r.second.Load(); cur != second && r.second.CompareAndSwap(cur, second) {
		r.n.Store(0)
	}
	if r.n.Add(1) > r.perSecond {
		r.suppressed.Add(1)
		return false, 0
	}
	return true, r.suppressed.Swap(0)
}
