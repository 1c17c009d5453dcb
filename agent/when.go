package agent

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/VictoriaMetrics/metrics"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/cond"
	"github.com/policy-engine/policy-engine/internal/obs"
)

// features are the chain-entry features this agent implements, advertised comma-separated in
// GetAgentConfig's agent_metadata under featuresKey: the kernel refuses a route whose entries
// use a feature its agent does not list, since an agent that does not know a Policy field
// ignores it (for when: it would run the entry on every request).
var features = []string{featureWhen, cacheFeature}

const (
	featuresKey = "features"
	featureWhen = "when"
)

// WithoutFeature stops the agent from advertising (and so from being sent) a chain-entry
// feature. It is for test agents that stand in for an older build; call it before Main.
func WithoutFeature(name string) {
	features = slices.DeleteFunc(slices.Clone(features), func(f string) bool { return f == name })
}

// advertiseFeatures adds the features to GetAgentConfig's agent_metadata.
func advertiseFeatures(md map[string]string) {
	md[featuresKey] = strings.Join(features, ",")
}

// maxCachedConditions bounds the compiled conditions a snapshot keeps. The kernel sends only
// the conditions of its config; past the bound, a condition is compiled on every use.
const maxCachedConditions = 10000

// compiledCond is a when condition compiled once per snapshot, or why it does not compile.
type compiledCond struct {
	expr *cond.Expr
	err  error
}

// conditionFor returns the compiled condition src, compiling it on first use.
func (s *execSnapshot) conditionFor(src string) (*cond.Expr, error) {
	if c, ok := s.conds.Load(src); ok {
		return c.expr, c.err
	}
	x, err := cond.CompileCondition(src)
	if err != nil {
		err = fmt.Errorf("invalid when condition: %w", err)
	}
	if s.condCount.Load() < maxCachedConditions {
		if _, loaded := s.conds.LoadOrStore(src, compiledCond{x, err}); !loaded {
			s.condCount.Add(1)
		}
	}
	return x, err
}

// requestInput is what a condition or a cache key reads of the request in pc, with the state
// as the chain left it so far. The query is the context's, parsed once per request.
func requestInput(pc *policy.Context) cond.Input {
	in := cond.Input{Method: pc.Method, Path: pc.Path, Host: pc.Authority, Scheme: pc.Scheme,
		SourceAddress: pc.ClientIP, Route: pc.RouteName, Headers: pc.Headers, State: pc.State}
	if strings.IndexByte(pc.Path, '?') >= 0 {
		in.Query = pc.QueryParams()
	}
	return in
}

// condInput is the input of the conditions of one chain run, allocated on the first entry
// that has a condition.
type condInput struct{ in *cond.Input }

// entryCondition reports whether chain entry i runs: true when it has no condition or its
// condition is true on the request and the state as the earlier entries of the chain left
// them. An error (a condition that does not compile, a missing map key, the cost limit) is
// returned with true: the entry fails, and its on_failure decides, as for a policy error; an
// enforcing entry denies.
func (e *Executor) entryCondition(r *resolved, entry *agentv1.Policy, pc *policy.Context, ci *condInput) (bool, error) {
	if entry.GetWhen() == "" {
		return true, nil
	}
	if r.whenErr != nil {
		return true, r.whenErr
	}
	if ci.in == nil {
		ci.in = &cond.Input{}
	}
	in := ci.in
	*in = requestInput(pc)
	if pc.Response != nil {
		in.ResponseCode, in.ResponseHeaders = pc.Response.Status, pc.Response.Headers
	} else if r.when.ReadsResponse() {
		return true, errors.New("when condition reads the response in the request phase")
	}
	ok, err := r.when.Condition(in)
	if err != nil {
		return true, fmt.Errorf("when condition: %w", err)
	}
	return ok, nil
}

// skipEntry records an entry whose condition is false: counted, told to the entry hook, and in
// the debug log. It sets nothing: the request headers its policy owns were removed before the
// chain ran, whether it runs or not (removeOwned).
func (e *Executor) skipEntry(req *agentv1.PolicyRequest, resp *agentv1.PolicyResponse, i int, name string) {
	e.metrics.skipped(name, req.GetRouteName())
	if e.entryHook != nil || req.GetExplain() {
		e.traceEntry(req, resp, i, "skipped", 0, policy.Result{Message: "when condition is false"}, nil)
	}
	if ev := e.log.Debug(); ev != nil {
		ev.Str("request_id", req.GetRequestId()).Str("route", req.GetRouteName()).Str("phase", strings.ToLower(req.GetPhase().String())).
			Str("policy", name).Msg("policy skipped: its when condition is false")
	}
}

// maxSkipRoutes bounds the route label of policy_agent_entries_skipped_total, as
// maxShadowRoutes does for the shadow series: past it, a new route is counted as "other".
const maxSkipRoutes = 1000

// skipped counts one entry skipped by its condition.
func (m *agentMetrics) skipped(policyName, route string) { m.skips.get(policyName, route).Inc() }

func (m *agentMetrics) newSkipCounter(policyName, route string) *metrics.Counter {
	return m.set.GetOrCreateCounter(`policy_agent_entries_skipped_total{policy=` + obs.Label(policyName) + `,route=` + obs.Label(route) + `}`)
}

// observes reports whether an entry that observes the chain's outcome (policy.ChainObserver:
// auditLog) sees this run's: not when its condition skipped it. An entry the run did not reach
// (an earlier one ended the chain) is judged by its condition on the request and state as the
// chain left them; one whose condition fails to evaluate observes, since an audit record too
// many is the safer error.
func (e *Executor) observes(r *resolved, entry *agentv1.Policy, pc *policy.Context) bool {
	if r.skipped {
		return false
	}
	if r.reached || entry.GetWhen() == "" || r.whenErr != nil {
		return true
	}
	var ci condInput
	runs, _ := e.entryCondition(r, entry, pc, &ci)
	return runs
}
