package kernel

import (
	"errors"
	"fmt"
	"strings"
	"sync"

	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/cond"
	"github.com/policy-engine/policy-engine/internal/headers"
)

// A chain entry's when condition (ChainEntry.When) is compiled once per config by ParseConfig
// and sent to the agent in Policy.when; the agent evaluates it before the entry runs. When
// every entry of a chain has a condition that does not read state, the kernel can evaluate
// them itself on the request it holds: if none is true, no entry would run, and the agent is
// not called at all (skipByConditions).

// featuresKey is the agent_metadata key of GetAgentConfig that lists, comma-separated, the
// chain-entry features the agent implements.
const featuresKey = "features"

// featureWhen is the feature of an agent that evaluates Policy.when.
const featureWhen = "when"

// hasFeature reports whether an agent's advertised config lists a chain-entry feature.
func hasFeature(info *agentv1.GetAgentConfigResponse, feature string) bool {
	for f := range strings.SplitSeq(info.GetAgentMetadata()[featuresKey], ",") {
		if strings.TrimSpace(f) == feature {
			return true
		}
	}
	return false
}

// attachConditions gives a compiled chain its entries' conditions: c.conds, by entry, when
// an entry has one, and c.kernelConds when the kernel may evaluate them all. An entry with a
// condition on an agent that does not advertise the when feature is a problem (the route is
// invalid): such an agent would run the entry on every request. src nil: the agent was never
// reached, and the route is not checked yet anyway. Called for a phase's chain after
// compileChecked, whose problems it extends.
func attachConditions(c *chain, cfg *KernelConfig, entries []ChainEntry, phase agentv1.PolicyPhase, agentName string, src *agentv1.GetAgentConfigResponse, key string, problems []problem) []problem {
	stateless := len(entries) > 0
	for i, e := range entries {
		if e.When == "" {
			stateless = false
			continue
		}
		x, err := cfg.condition(e.When)
		if err == nil && phase == agentv1.PolicyPhase_REQUEST && x.ReadsResponse() {
			err = errors.New("response.code and response.headers are only known in a response_policy_chain")
		}
		if err != nil {
			// ParseConfig refused it already; a config made otherwise is refused here.
			problems = append(problems, problem{fmt.Sprintf("%s[%d].when", key, i), "invalid condition: " + err.Error()})
			stateless = false
			continue
		}
		if c.conds == nil {
			c.conds = make([]*cond.Expr, len(entries))
		}
		c.conds[i] = x
		if x.ReadsState() {
			stateless = false
		}
		if src != nil && !hasFeature(src, featureWhen) {
			problems = append(problems, problem{fmt.Sprintf("%s[%d].when", key, i),
				fmt.Sprintf("agent %q does not evaluate when conditions (it does not advertise the %q feature): it would run the entry on every request; upgrade the agent or remove the condition", agentName, featureWhen)})
		}
	}
	if c.conds != nil && phase == agentv1.PolicyPhase_RESPONSE {
		// A condition reads the request: the response phase must send it.
		c.noRequest = false
	}
	c.kernelConds = stateless && c.conds != nil
	return problems
}

// usesWhen reports whether a chain has an entry with a condition.
func (c *chain) usesWhen() bool { return c.conds != nil }

// checkFeatures returns why the route cannot run on an agent that advertises src: an entry
// with a condition on an agent that does not evaluate them; "" when it can.
func (r *Route) checkFeatures(src *agentv1.GetAgentConfigResponse) string {
	if (r.request.usesWhen() || r.response.usesWhen()) && !hasFeature(src, featureWhen) {
		return fmt.Sprintf("agent %q no longer evaluates when conditions (it does not advertise the %q feature)", r.agent.cfg.Name, featureWhen)
	}
	return ""
}

// skipByConditions reports whether the kernel may let the phase's chain go without calling the
// agent: every entry has a condition that does not read state (chain.kernelConds), each is
// false on the request, and the request carries none of the headers the chain's policies own
// (the agent strips those before it evaluates the conditions, so the kernel would judge
// another request; such a request crosses to the agent, which strips and judges it). An
// evaluation error is not the kernel's to handle: the agent applies the entry's on_failure.
// The answer is the same as the agent's, which evaluates the same conditions on the same
// request and skips every entry. A chain without kernelConds costs one comparison.
func (s *Server) skipByConditions(st *stream, c *chain) bool {
	if !c.kernelConds || st.reqCtx == nil {
		return false
	}
	if st.route.stale() != "" {
		return false // the agent changed under the route: the call refuses it (staleRoute)
	}
	if st.phase == agentv1.PolicyPhase_REQUEST && ownedPresent(st.reqCtx.Headers, c.owned) {
		return false
	}
	rc := st.reqCtx
	in := condInputs.Get().(*cond.Input)
	*in = cond.Input{Method: rc.Method, Path: rc.Path, Host: rc.Authority, Scheme: rc.Scheme,
		SourceAddress: rc.ClientIp, Route: st.route.Name, Headers: rc.Headers}
	if st.phase == agentv1.PolicyPhase_RESPONSE {
		in.ResponseCode, in.ResponseHeaders = int(st.respStatus), st.respHeaders
	}
	defer func() {
		*in = cond.Input{}
		condInputs.Put(in)
	}()
	for _, x := range c.conds {
		ok, err := x.Condition(in)
		if err != nil || ok {
			return false
		}
	}
	i := 0
	if st.phase == agentv1.PolicyPhase_RESPONSE {
		i = 1
	}
	st.route.metrics.skipped[i].Inc()
	if ev := s.log.Debug(); ev != nil {
		ev.Str("request_id", st.requestID).Str("route", st.route.Name).Str("phase", strings.ToLower(st.phase.String())).
			Int("policies", len(c.policies)).Msg("chain skipped: every entry's when condition is false; the agent was not called")
	}
	if s.skipHook != nil {
		s.skipHook(st.route.Name, st.phase)
	}
	if st.explain != nil {
		st.explain.skip(st.phase)
	}
	return true
}

// condInputs are the inputs skipByConditions evaluates, pooled rather than kept on every
// stream: a held stream stays as small as before conditions existed.
var condInputs = sync.Pool{New: func() any { return new(cond.Input) }}

// SetSkipHook makes the server tell h of each chain it lets go without calling the agent
// because the when condition of every entry is false, on the goroutine that serves the stream.
// Call it before the server serves; nil turns it off. It is for tools that explain one request
// (policyctl explain).
func (s *Server) SetSkipHook(h func(route string, phase agentv1.PolicyPhase)) { s.skipHook = h }

// ownedPresent reports whether a request carries a header a policy of its chain owns, in any
// spelling that folds to its name; it allocates nothing.
func ownedPresent(h map[string]string, owned []string) bool {
	if len(owned) == 0 {
		return false
	}
	for k := range h {
		for _, o := range owned {
			if headers.SameName(k, o) {
				return true
			}
		}
	}
	return false
}

// skipMode is modeFor for a request whose request chain skipByConditions skipped: the request
// body that the chain would read is not asked for, since no entry runs. Should Envoy send it
// anyway (a mode override it does not honour), the body gets an empty reply: it is not awaited.
func (r *Route) skipMode(reqBody, respBody filterv3.ProcessingMode_BodySendMode) *filterv3.ProcessingMode {
	return r.skipModes[modeIndex(reqBody, respBody)]
}
