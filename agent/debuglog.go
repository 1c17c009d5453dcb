package agent

import (
	"strconv"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// The lines an operator turns on with log_level: debug. Every call site checks the level first
// (one atomic load), so that at info they cost nothing more. No value that may be a credential
// is written: context updates are written as names and sizes.

// debugOn reports whether the debug lines are written.
func (e *Executor) debugOn() bool { return e.log.Enabled(zerolog.DebugLevel) }

// logPolicy writes one policy's run: its outcome, its time, and the context updates it asked
// for.
func (e *Executor) logPolicy(pc *policy.Context, name string, r policy.Result, err error, d time.Duration) {
	ev := e.log.Debug()
	if ev == nil {
		return
	}
	ev = ev.Str("request_id", pc.RequestID).Str("route", pc.RouteName).Str("phase", strings.ToLower(pc.Phase.String())).
		Str("policy", name).Dur("duration", d)
	if err != nil {
		ev.Err(err).Msg("policy ran: failed")
		return
	}
	ev = ev.Str("status", r.Status.String())
	if r.Message != "" {
		ev = ev.Str("reason", r.Message)
	}
	if u := contextUpdates(r.Instructions); len(u) > 0 {
		ev = ev.Strs("updates", u)
	}
	ev.Msg("policy ran")
}

// logChain writes a chain's outcome.
func (e *Executor) logChain(req *agentv1.PolicyRequest, resp *agentv1.PolicyResponse, d time.Duration) {
	ev := e.log.Debug()
	if ev == nil {
		return
	}
	ev = ev.Str("request_id", req.GetRequestId()).Str("route", req.GetRouteName()).Str("phase", strings.ToLower(req.GetPhase().String())).
		Int("policies", len(req.GetPolicies())).Str("status", resp.GetStatus().GetCode().String()).Dur("duration", d)
	if p := resp.GetStatus().GetPolicyName(); p != "" {
		ev = ev.Str("decided_by", p)
	}
	ev.Msg("chain ran")
}

// contextUpdates describes instructions for the log: names and sizes, never a value. A value
// may be a credential whatever its name: a policy may copy a token into any header.
func contextUpdates(ins []*agentv1.Instruction) []string {
	var out []string
	for _, in := range ins {
		switch in.GetType() {
		case agentv1.InstructionType_SET_HEADER:
			h := in.GetHeader()
			verb := "set header "
			if h.GetAppend() {
				verb = "append header "
			}
			out = append(out, verb+h.GetKey()+" ("+strconv.Itoa(len(h.GetValue()))+" bytes)")
		case agentv1.InstructionType_REMOVE_HEADER:
			out = append(out, "remove header "+in.GetHeader().GetKey())
		case agentv1.InstructionType_SET_BODY:
			out = append(out, "set body ("+strconv.Itoa(len(in.GetBody().GetBody()))+" bytes)")
		case agentv1.InstructionType_SET_STATE:
			st := in.GetState()
			out = append(out, "set state "+st.GetKey()+" ("+strconv.Itoa(len(st.GetValue()))+" bytes)")
		case agentv1.InstructionType_IMMEDIATE_RESPONSE:
			out = append(out, "immediate response "+strconv.Itoa(int(in.GetImmediateResponse().GetStatusCode())))
		}
	}
	return out
}
