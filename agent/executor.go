package agent

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"maps"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/puzpuzpuz/xsync/v4"
	"github.com/rs/zerolog"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/cond"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/tracing"
)

// maxCachedInstances bounds the compiled-policy cache. The kernel sends only the chains of its
// config, so a real deployment stays far below it; past it, policies are built per request.
const maxCachedInstances = 10000

// Executor runs policy chains against the snapshot of the agent's config it holds.
type Executor struct {
	snap    atomic.Pointer[execSnapshot]
	log     *logging.Logger
	metrics *agentMetrics
	// meta are the files compiled chain entries name, followed across reloads.
	meta *metaFiles
	// shared outlives snapshots: policies keep clients there that a reload must not drop.
	shared sync.Map
	panicT *logging.Throttle
	// unknownT throttles the log of chains naming a policy the agent does not have.
	unknownT *logging.Throttle
	// failT throttles the log of policy failures, which a broken chain entry has on every
	// request.
	failT *logging.Throttle
	// shadowLog throttles the log of what shadow entries would have refused.
	shadowLog rateLog
	// maxChain is server.max_chain_duration_ms of the config in force, in nanoseconds.
	maxChain atomic.Int64
	// tracer is nil while tracing is off.
	tracer atomic.Pointer[tracing.Tracer]
	// entryHook is told each chain entry's outcome (policyctl explain); nil: nothing is told.
	// runChain traces an entry when the hook is set or the request asks for its entries
	// (PolicyRequest.explain, the kernel's /debug/explain): off, each entry pays that nil
	// check and one bool check, and allocates nothing.
	entryHook func(EntryTrace)
}

// execSnapshot is one immutable state of the agent's config with the factories made from it.
type execSnapshot struct {
	cfg       *CoreConfig
	version   string
	loaded    time.Time
	factories map[string]*factoryEntry
	seed      maphash.Seed
	cache     *xsync.Map[uint64, []*instance]
	cached    atomic.Int64
	// conds are the chain entries' when conditions, compiled once each (see when.go).
	conds     *xsync.Map[string, compiledCond]
	condCount atomic.Int64
	// meta records the files the compiled entries' metadata names (the Executor's, shared).
	meta *metaFiles
	// caches are the chain entries' cached results (cache.go); a reload starts with none.
	caches *resultCaches
	// creds holds the credential names of every policy compiled so far (CredentialReader),
	// replaced under credsMu when a compiled policy adds one.
	creds   atomic.Pointer[policy.CredentialSet]
	credsMu sync.Mutex

	// refs counts the chains running on the snapshot; once a newer snapshot replaced it
	// (retired) and none runs, its factories are closed, so a reload never closes a client
	// under a running policy.
	refs      atomic.Int64
	retired   atomic.Bool
	closeOnce sync.Once
}

// retire marks a replaced snapshot and closes it when no chain runs on it.
func (s *execSnapshot) retire() {
	s.retired.Store(true)
	if s.caches != nil {
		s.caches.retire()
	}
	if s.refs.Load() == 0 {
		s.closeOnce.Do(func() { closeFactories(s) })
	}
}

func (s *execSnapshot) release() {
	if s.refs.Add(-1) == 0 && s.retired.Load() {
		s.closeOnce.Do(func() { closeFactories(s) })
	}
}

// acquire returns the current snapshot, counted as in use until release.
func (e *Executor) acquire() *execSnapshot {
	for {
		s := e.snap.Load()
		if s == nil {
			return nil
		}
		s.refs.Add(1)
		if e.snap.Load() == s {
			return s
		}
		s.release() // replaced meanwhile: it may be closing; take the new one
	}
}

type factoryEntry struct {
	module  policy.Module
	factory policy.Factory
	// ignoredLogged records that a chain entry setting on_failure continue ([0]) or
	// skip_remaining ([1]) on this enforcing policy was logged, once per config.
	ignoredLogged [2]atomic.Bool
}

// instance is a policy compiled from one metadata map.
type instance struct {
	metadata map[string]string
	policy   policy.Policy
	err      error
}

// NewExecutor returns an executor with no config; Load gives it one.
func NewExecutor(log *logging.Logger) *Executor {
	e := &Executor{log: log, metrics: newAgentMetrics(), panicT: logging.NewThrottle(10 * time.Second),
		unknownT:  logging.NewThrottle(10 * time.Second),
		failT:     logging.NewThrottle(time.Second),
		shadowLog: rateLog{perSecond: shadowLogPerSecond}, meta: newMetaFiles()}
	e.cacheGauges()
	return e
}

// deadlineOf is the deadline of req's chain under the config in force; see deadlineOf.
func (e *Executor) deadlineOf(req interface{ GetDeadlineMs() int64 }) time.Time {
	limit := time.Duration(e.maxChain.Load())
	if limit <= 0 {
		limit = DefaultMaxChainDurationMS * time.Millisecond
	}
	return deadlineOf(req, limit)
}

// Load builds factories for every registered policy from cfg and swaps them in. On error the
// previous snapshot stays. Factories of the replaced snapshot that hold resources are closed.
func (e *Executor) Load(cfg *CoreConfig, version string) error {
	s := &execSnapshot{
		cfg:       cfg,
		version:   version,
		loaded:    time.Now(),
		factories: map[string]*factoryEntry{},
		seed:      maphash.MakeSeed(),
		cache:     xsync.NewMap[uint64, []*instance](),
		conds:     xsync.NewMap[string, compiledCond](),
		meta:      e.meta,
		caches:    newResultCaches(cfg.ResourceLimits.MaxCacheBytes, e.metrics),
	}
	var errs []error
	for name := range cfg.Policies.Config {
		if _, ok := policy.Lookup(name); !ok {
			errs = append(errs, &policyConfigError{policy: name, err: errors.New("no such policy is compiled in")})
		}
	}
	for _, m := range policy.Modules() {
		f, err := m.New(policy.Config{Raw: []byte(cfg.Policies.Config[m.Name]), Unresolved: []byte(cfg.Policies.written[m.Name]), Shared: &e.shared, Log: e.log})
		if err != nil {
			errs = append(errs, &policyConfigError{policy: m.Name, err: err})
			continue
		}
		s.factories[m.Name] = &factoryEntry{module: m, factory: f}
		if m.Enforces {
			e.metrics.failClosedCounter(m.Name)
		}
	}
	if len(errs) > 0 {
		closeFactories(s)
		return errors.Join(errs...)
	}
	if cfg.Policies.FailOnUnknown != nil {
		e.log.Audit(zerolog.WarnLevel).Bool("fail_on_unknown", *cfg.Policies.FailOnUnknown).
			Msg("agent_core.policies.fail_on_unknown is deprecated and ignored: a chain naming a policy this agent does not have always fails")
	}
	e.maxChain.Store(int64(time.Duration(cfg.Server.MaxChainDurationMS) * time.Millisecond))
	if old := e.snap.Swap(s); old != nil {
		old.retire()
	}
	return nil
}

// Close releases the resources of the current snapshot's factories.
func (e *Executor) Close() {
	if old := e.snap.Swap(nil); old != nil {
		old.retire()
	}
}

func closeFactories(s *execSnapshot) {
	for _, f := range s.factories {
		if c, ok := f.factory.(io.Closer); ok {
			_ = c.Close()
		}
	}
}

// HealthCheck checks every factory that can fail.
func (e *Executor) HealthCheck(ctx context.Context) error {
	s := e.snap.Load()
	if s == nil {
		return errors.New("no config loaded")
	}
	var errs []error
	for name, f := range s.factories {
		if h, ok := f.factory.(policy.HealthChecker); ok {
			if err := h.HealthCheck(ctx); err != nil {
				errs = append(errs, fmt.Errorf("policy %q: %w", name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// Describe returns the agent's config for GetAgentConfig.
func (e *Executor) Describe() *agentv1.GetAgentConfigResponse {
	s := e.snap.Load()
	resp := &agentv1.GetAgentConfigResponse{AgentVersion: Version, AgentMetadata: map[string]string{}}
	if s != nil {
		resp.AgentName = s.cfg.Name
		resp.ConfigVersion = s.version
		resp.AgentMetadata["max_body_size_bytes"] = fmt.Sprint(s.cfg.ResourceLimits.MaxBodySizeBytes)
		resp.AgentMetadata["max_state_size_bytes"] = fmt.Sprint(s.cfg.ResourceLimits.MaxStateSizeBytes)
	}
	var enforcing []string
	for _, m := range policy.Modules() {
		if m.Enforces {
			enforcing = append(enforcing, m.Name)
		}
		info := &agentv1.PolicyInfo{
			Name:                   m.Name,
			Version:                m.Version,
			Description:            m.Description,
			MetadataSchema:         m.MetadataSchema,
			RequiresRequestBody:    m.RequestBody,
			RequiresResponseBody:   m.ResponseBody,
			ResponseIgnoresRequest: m.ResponseIgnoresRequest,
			StaticEntries:          m.StaticEntries,
		}
		if m.Phases&policy.Request != 0 {
			info.SupportedPhases = append(info.SupportedPhases, agentv1.PolicyPhase_REQUEST)
		}
		if m.Phases&policy.Response != 0 {
			info.SupportedPhases = append(info.SupportedPhases, agentv1.PolicyPhase_RESPONSE)
		}
		resp.SupportedPolicies = append(resp.SupportedPolicies, info)
	}
	// The policies whose failures deny whatever on_failure says, comma-separated: the kernel
	// warns of chain entries that set continue or skip_remaining on one of them.
	resp.AgentMetadata[enforcingPoliciesKey] = strings.Join(enforcing, ",")
	// The chain-entry features this agent implements: the kernel refuses a route whose
	// entries use one the agent does not list.
	advertiseFeatures(resp.AgentMetadata)
	return resp
}

// ValidateChains checks chain entries the way Execute will run them: the policy is compiled in,
// runs in the entry's phase, and its factory builds the entry's metadata (the compiled policy
// is cached, as a first request would). It returns one message per entry, in order, empty when
// the entry can run.
func (e *Executor) ValidateChains(entries []*agentv1.ChainEntry) []string {
	out := make([]string, len(entries))
	s := e.acquire()
	if s == nil {
		for i := range out {
			out[i] = "agent has no config loaded"
		}
		return out
	}
	defer s.release()
	for i, ce := range entries {
		name := ce.GetPolicy().GetName()
		f, ok := s.factories[name]
		switch {
		case !ok:
			out[i] = fmt.Sprintf("unknown policy %q", name)
		case !f.module.Phases.Has(ce.GetPhase()):
			out[i] = fmt.Sprintf("policy %q does not run in the %s phase", name, strings.ToLower(ce.GetPhase().String()))
		default:
			if _, err := s.instanceFor(f, name, ce.GetPolicy().GetMetadata()); err != nil {
				out[i] = err.Error()
			} else if w := ce.GetPolicy().GetWhen(); w != "" {
				if x, err := s.conditionFor(w); err != nil {
					out[i] = err.Error()
				} else if ce.GetPhase() == agentv1.PolicyPhase_REQUEST && x.ReadsResponse() {
					out[i] = "invalid when condition: it reads the response in the request phase"
				}
			}
			if c := ce.GetPolicy().GetCache(); c != nil && out[i] == "" {
				out[i] = checkCacheEntry(f.module, c)
			}
		}
	}
	return out
}

// EntryFacts tells, for each chain entry that builds, what the kernel must know of it to act
// for it when the agent cannot: the request headers it owns (policy.HeaderOwner), which the
// kernel removes itself when it lets a request through without the agent (fail_open); and its
// answer when it answers every request of its phase alike (policy.Static), which the kernel
// applies itself. An entry that does not build gets empty facts.
func (e *Executor) EntryFacts(entries []*agentv1.ChainEntry) []*agentv1.EntryFacts {
	out := make([]*agentv1.EntryFacts, len(entries))
	s := e.acquire()
	if s != nil {
		defer s.release()
	}
	for i, ce := range entries {
		out[i] = &agentv1.EntryFacts{}
		if s == nil {
			continue
		}
		name := ce.GetPolicy().GetName()
		f, ok := s.factories[name]
		if !ok {
			continue
		}
		p, err := s.instanceFor(f, name, ce.GetPolicy().GetMetadata())
		if err != nil {
			continue
		}
		if o, isOwner := p.(policy.HeaderOwner); isOwner && ce.GetPhase() == agentv1.PolicyPhase_REQUEST {
			for _, h := range o.OwnedRequestHeaders() {
				out[i].OwnedRequestHeaders = append(out[i].OwnedRequestHeaders, strings.ToLower(h))
			}
		}
		out[i].StaticOutcome = staticOutcome(f, p, ce)
	}
	return out
}

// staticOutcome is the entry's answer on every request of its phase when it has one
// (policy.Static), else nil. An entry in shadow mode, with a condition or a cache, a policy
// that observes outcomes or owns request headers, and an answer that is not OK with header
// changes only are never static: the agent must run those.
func staticOutcome(f *factoryEntry, p policy.Policy, ce *agentv1.ChainEntry) *agentv1.StaticOutcome {
	pol := ce.GetPolicy()
	if pol.GetShadow() || pol.GetWhen() != "" || pol.GetCache() != nil || !f.module.Phases.Has(ce.GetPhase()) {
		return nil
	}
	sp, ok := p.(policy.Static)
	if !ok {
		return nil
	}
	if _, observes := p.(policy.ChainObserver); observes {
		return nil
	}
	if _, owns := p.(policy.HeaderOwner); owns {
		return nil
	}
	r, ok := sp.StaticResult(ce.GetPhase())
	if !ok || r.Status != agentv1.StatusCode_OK || len(r.Metadata) > 0 || terminal(r) {
		return nil
	}
	for _, in := range r.Instructions {
		switch in.GetType() {
		case agentv1.InstructionType_SET_HEADER, agentv1.InstructionType_REMOVE_HEADER:
		default:
			return nil
		}
	}
	if applyInstructions(nil, r.Instructions, 0) != nil {
		return nil
	}
	return &agentv1.StaticOutcome{Instructions: r.Instructions}
}

// enforcingPoliciesKey is the agent_metadata key of GetAgentConfig that lists the policies
// that enforce (policy.Module.Enforces).
const enforcingPoliciesKey = "enforcing_policies"

// instanceFor returns the policy compiled from (name, metadata), building it on first use.
func (s *execSnapshot) instanceFor(f *factoryEntry, name string, md map[string]string) (policy.Policy, error) {
	h := s.metadataHash(name, md)
	if list, ok := s.cache.Load(h); ok {
		for _, in := range list {
			if maps.Equal(in.metadata, md) {
				return in.policy, in.err
			}
		}
	}
	if s.meta != nil {
		s.meta.record(md)
	}
	p, err := f.factory.Build(md)
	if err != nil {
		err = fmt.Errorf("policy %q: invalid metadata: %w", name, err)
	} else if cr, ok := p.(policy.CredentialReader); ok {
		s.addCredentials(cr.CredentialNames())
	}
	if s.cached.Load() >= maxCachedInstances {
		return p, err
	}
	in := &instance{metadata: maps.Clone(md), policy: p, err: err}
	s.cache.Compute(h, func(old []*instance, loaded bool) ([]*instance, xsync.ComputeOp) {
		for _, o := range old {
			if maps.Equal(o.metadata, md) {
				return old, xsync.CancelOp
			}
		}
		s.cached.Add(1)
		return append(old[:len(old):len(old)], in), xsync.UpdateOp
	})
	return p, err
}

// addCredentials adds a compiled policy's credential names to the snapshot's set. It runs when a
// policy is compiled, not per request; a chain run reads the set with one atomic load.
func (s *execSnapshot) addCredentials(c policy.Credentials) {
	if s.creds.Load().Has(c) {
		return
	}
	s.credsMu.Lock()
	s.creds.Store(s.creds.Load().With(c))
	s.credsMu.Unlock()
}

// metadataHash hashes a policy name and its metadata independently of map order, without
// allocating: each entry is hashed on its own and the hashes are summed.
func (s *execSnapshot) metadataHash(name string, md map[string]string) uint64 {
	sum := maphash.String(s.seed, name)
	for k, v := range md {
		var h maphash.Hash
		h.SetSeed(s.seed)
		h.WriteString(k)
		h.WriteByte(0)
		h.WriteString(v)
		sum += h.Sum64()
	}
	return sum
}

// Version of the agent binary; set by the linker.
var Version = "dev"

var errStateTooLarge = errors.New("state exceeds max_state_size_bytes")

// Execute runs req's chain and returns the agent's answer. It never returns nil.
func (e *Executor) Execute(ctx context.Context, req *agentv1.PolicyRequest) *agentv1.PolicyResponse {
	cc := newChainCtx(ctx, e.deadlineOf(req))
	defer cc.release()
	return e.execute(cc, req)
}

// execute runs req's chain in cc, which holds the request's deadline.
func (e *Executor) execute(cc *chainCtx, req *agentv1.PolicyRequest) *agentv1.PolicyResponse {
	var ctx context.Context = cc
	resp := &agentv1.PolicyResponse{RequestId: req.GetRequestId(), CallId: req.GetCallId()}
	s := e.acquire()
	if s == nil {
		return fail(resp, agentv1.StatusCode_POLICY_ERROR, "", "agent has no config loaded")
	}
	defer s.release()
	if req.GetPhase() != agentv1.PolicyPhase_REQUEST && req.GetPhase() != agentv1.PolicyPhase_RESPONSE {
		return fail(resp, agentv1.StatusCode_POLICY_ERROR, "", fmt.Sprintf("unknown phase %d", req.GetPhase()))
	}
	limits := s.cfg.ResourceLimits
	e.metrics.observeContext(req)
	pc := newPolicyContext(req)
	if pc.Response == nil && len(pc.Body) > limits.MaxBodySizeBytes {
		r := policy.Deny(413, "payload_too_large", fmt.Sprintf("request body of %d bytes exceeds the limit of %d bytes", len(pc.Body), limits.MaxBodySizeBytes), nil)
		resp.Instructions = r.Instructions
		return finish(resp, r, "agent")
	}
	if pc.Response != nil && len(pc.Response.Body) > limits.MaxBodySizeBytes {
		return fail(resp, agentv1.StatusCode_POLICY_ERROR, "agent", fmt.Sprintf("response body of %d bytes exceeds the limit of %d bytes", len(pc.Response.Body), limits.MaxBodySizeBytes))
	}
	if stateSize(pc.State) > limits.MaxStateSizeBytes {
		return fail(resp, agentv1.StatusCode_POLICY_ERROR, "agent", errStateTooLarge.Error())
	}
	if dl, ok := ctx.Deadline(); ok {
		pc.Deadline = dl
	}
	var buf [8]resolved
	chain := s.resolve(req.GetPolicies(), buf[:0])
	pc.Credentials = s.creds.Load() // after resolve: it holds the names of this chain's policies
	resp.Instructions = e.removeOwned(req, chain, pc, resp.Instructions)
	var start time.Time
	debug := e.debugOn()
	if debug {
		start = time.Now()
	}
	var shadow []policy.ShadowDecision
	resp = e.runChain(cc, s, req, chain, pc, resp, &shadow)
	if debug {
		e.logChain(req, resp, time.Since(start))
	}
	// Every policy of the chain that observes outcomes sees this one, also when an earlier
	// policy ended the chain before it ran.
	for i, r := range chain {
		if o, ok := r.policy.(policy.ChainObserver); ok && e.observes(&chain[i], req.GetPolicies()[i], pc) {
			out := outcomeOf(resp)
			out.Shadow = shadow
			o.ObserveChain(pc, out)
		}
	}
	return resp
}

// resolved is one chain entry with its factory (nil: unknown policy) and compiled policy.
type resolved struct {
	factory *factoryEntry
	policy  policy.Policy
	err     error
	// when is the entry's compiled condition (nil: none, or whenErr says why it does not
	// compile).
	when    *cond.Expr
	whenErr error
	// skipped says that the run skipped the entry by its condition; reached that it came to
	// the entry and did not skip it.
	skipped, reached bool
}

// resolve looks up the compiled policy of every chain entry once, appending to out.
func (s *execSnapshot) resolve(entries []*agentv1.Policy, out []resolved) []resolved {
	for _, entry := range entries {
		var r resolved
		if f, ok := s.factories[entry.GetName()]; ok {
			r.factory = f
			r.policy, r.err = s.instanceFor(f, entry.GetName(), entry.GetMetadata())
		}
		if w := entry.GetWhen(); w != "" {
			r.when, r.whenErr = s.conditionFor(w)
		}
		out = append(out, r)
	}
	return out
}

func outcomeOf(resp *agentv1.PolicyResponse) policy.Outcome {
	o := policy.Outcome{Status: resp.GetStatus().GetCode(), Message: resp.GetMessage()}
	if o.Status != agentv1.StatusCode_OK {
		o.DecidedBy = resp.GetStatus().GetPolicyName()
	}
	for _, in := range resp.GetInstructions() {
		if ir := in.GetImmediateResponse(); ir != nil {
			o.HTTPStatus = int(ir.GetStatusCode())
		}
	}
	return o
}

// runChain runs the chain's policies in order on pc.
//
// A policy fails when it returns an error, panics, or returns POLICY_ERROR or a status code
// the agent does not know; the entry's on_failure then decides (deny, continue, or
// skip_remaining, which skips the later entries that do not enforce). An entry whose policy
// enforces (policy.Module.Enforces) always fails closed, whatever its on_failure says, and is
// never skipped: a broken authentication entry must not open the route. A policy that returns
// TIMEOUT, or returns anything after the chain's deadline, ends the chain with TIMEOUT: the
// kernel has stopped waiting, and a late allow is no decision; a late denial still denies.
//
// An entry in shadow (Policy.shadow) runs as any other, but nothing it decides is enforced:
// its denial or immediate response does not end the chain, its instructions (headers, body,
// state) and metadata are dropped, and its failure, whatever its on_failure or whether it
// enforces, does not fail the chain. What it would have refused is counted, logged (throttled)
// and appended to shadow, for the chain's observers. The chain's deadline is shared: a shadow
// entry that overruns it times the chain out like any other.
func (e *Executor) runChain(cc *chainCtx, s *execSnapshot, req *agentv1.PolicyRequest, chain []resolved, pc *policy.Context, resp *agentv1.PolicyResponse, shadow *[]policy.ShadowDecision) *agentv1.PolicyResponse {
	var ctx context.Context = cc
	limits := s.cfg.ResourceLimits
	trace := e.traceChain(ctx, req)
	// skippedBy is the entry that failed with skip_remaining; later entries run only if
	// they enforce.
	skippedBy := ""
	var ci condInput
	for i, entry := range req.GetPolicies() {
		// The context is checked before the first policy and after every policy that ran
		// (below), so that a chain whose deadline passed runs nothing more.
		if i == 0 && ctx.Err() != nil {
			e.metrics.failure(entry.GetName(), "timeout")
			return fail(resp, agentv1.StatusCode_TIMEOUT, entry.GetName(), "deadline exceeded before policy "+entry.GetName())
		}
		name := entry.GetName()
		f := chain[i].factory
		if f == nil {
			// Whatever on_failure says: a chain missing one of its entries never serves.
			e.metrics.failure(name, "unknown_policy")
			e.logUnknown(req, name)
			if e.entryHook != nil || req.GetExplain() {
				e.traceEntry(req, resp, i, "error", 0, policy.Result{}, fmt.Errorf("unknown policy %q", name))
			}
			resp.Instructions = nil
			return fail(resp, agentv1.StatusCode_POLICY_ERROR, name, fmt.Sprintf("unknown policy %q", name))
		}
		enforces := f.module.Enforces
		if skippedBy != "" && !enforces {
			if e.entryHook != nil || req.GetExplain() {
				e.traceEntry(req, resp, i, "skipped", 0, policy.Result{}, nil)
			}
			continue
		}
		// The entry's when condition (when.go): false skips it; an error fails it.
		runs, condErr := true, error(nil)
		if entry.GetWhen() != "" {
			runs, condErr = e.entryCondition(&chain[i], entry, pc, &ci)
		}
		if !runs {
			chain[i].skipped = true
			e.skipEntry(req, resp, i, name)
			continue
		}
		chain[i].reached = true
		inShadow := entry.GetShadow()
		onFailure := entry.GetOnFailure()
		if enforces && !inShadow && (onFailure == "continue" || onFailure == "skip_remaining") {
			e.logIgnored(f, req, name, onFailure)
		}
		var (
			result policy.Result
			err    error
		)
		start := time.Now()
		span := trace.policy(name)
		if condErr != nil {
			err = condErr
		} else if !f.module.Phases.Has(req.GetPhase()) {
			err = fmt.Errorf("policy %q does not run in the %s phase", name, strings.ToLower(req.GetPhase().String()))
		} else {
			err = chain[i].err
			if err == nil {
				result, err = e.runCached(cc, s, req, entry, f, chain[i].policy, pc, name)
			}
		}
		// Checked after the policy returned, whatever it returned: a policy that ignores its
		// context overruns the deadline, and its late answer must not count as a decision.
		// The clock read serves the duration metric too: reading it costs more than the rest.
		end := time.Now()
		late := cc.stoppedAt(end)
		timedOut := late
		if inShadow {
			ok := e.shadowRun(req, name, result, err, late, end.Sub(start), end, shadow)
			if e.entryHook != nil || req.GetExplain() {
				e.traceEntry(req, resp, i, "shadow", end.Sub(start), result, err)
			}
			endPolicySpan(span, result.Status, err)
			if ok {
				continue
			}
			resp.Instructions = nil
			return fail(resp, agentv1.StatusCode_TIMEOUT, name, fmt.Sprintf("policy %q (shadow): %v", name, context.DeadlineExceeded))
		}
		if err == nil {
			switch result.Status {
			case agentv1.StatusCode_OK, agentv1.StatusCode_POLICY_DENIED:
				err = applyInstructions(pc, result.Instructions, limits.MaxStateSizeBytes)
				// A late denial still denies: refusing is never less safe than the timeout
				// answer, which the kernel turns into a pass for a fail-open agent.
				if late && err == nil && terminal(result) {
					timedOut = false
				}
			case agentv1.StatusCode_TIMEOUT:
				timedOut = true
			default: // POLICY_ERROR, or a code this agent does not know: a failure either way
				err = fmt.Errorf("policy %q returned status %s: %s", name, result.Status, result.Message)
			}
		}
		e.metrics.observe(name, end.Sub(start), result.Status, err, late || timedOut)
		if timedOut && err == nil {
			err = fmt.Errorf("policy %q: %w", name, context.DeadlineExceeded)
		}
		endPolicySpan(span, result.Status, err)
		if e.entryHook != nil || req.GetExplain() {
			e.traceEntry(req, resp, i, "", end.Sub(start), result, err)
		}
		if timedOut {
			resp.Instructions = nil
			return fail(resp, agentv1.StatusCode_TIMEOUT, name, err.Error())
		}
		if err != nil {
			switch {
			case enforces:
				if onFailure == "continue" || onFailure == "skip_remaining" {
					e.metrics.failClosed(name)
				}
			case onFailure == "continue":
				e.logFailure(req, name, err, "continue")
				continue
			case onFailure == "skip_remaining":
				e.logFailure(req, name, err, "skip_remaining")
				if skippedBy == "" {
					skippedBy = name
				}
				continue
			}
			e.logFailure(req, name, err, "deny")
			resp.Instructions = nil
			return fail(resp, agentv1.StatusCode_POLICY_ERROR, name, err.Error())
		}
		resp.Instructions = append(resp.Instructions, result.Instructions...)
		for k, v := range result.Metadata {
			if resp.Metadata == nil {
				resp.Metadata = map[string]string{}
			}
			resp.Metadata[k] = v
		}
		if terminal(result) {
			return finish(resp, result, name)
		}
	}
	// After a skip_remaining, the status names the entry whose failure skipped the rest.
	resp.Status = &agentv1.ResponseStatus{Code: agentv1.StatusCode_OK, PolicyName: skippedBy}
	return resp
}

// run executes one policy and turns a panic into an error, so that one faulty policy cannot
// take the agent down.
func (e *Executor) run(ctx context.Context, p policy.Policy, pc *policy.Context, name string) (r policy.Result, err error) {
	var start time.Time
	debug := e.debugOn()
	if debug {
		start = time.Now()
	}
	defer func() {
		if v := recover(); v != nil {
			err = fmt.Errorf("policy %q panicked: %v", name, v)
			if e.panicT.Allow() {
				e.log.Error().Str("policy", name).Str("panic", fmt.Sprint(v)).Msg("policy panicked")
			}
		}
		if debug {
			e.logPolicy(pc, name, r, err, time.Since(start))
		}
	}()
	return p.Execute(ctx, pc)
}

// logUnknown logs, throttled, a chain that names a policy the agent does not have.
func (e *Executor) logUnknown(req *agentv1.PolicyRequest, name string) {
	if !e.unknownT.Allow() {
		return
	}
	if ev := e.log.Error(); ev != nil {
		ev.Str("request_id", req.GetRequestId()).Str("route", req.GetRouteName()).Str("policy", name).
			Msg("chain names a policy this agent does not have; request failed")
	}
}

// logFailure logs a policy failure and what the chain did about it, at most once a second.
func (e *Executor) logFailure(req *agentv1.PolicyRequest, name string, err error, action string) {
	if ev := e.log.Error(); ev != nil && e.failT.Allow() {
		ev.Str("request_id", req.GetRequestId()).Str("route", req.GetRouteName()).Str("policy", name).
			Str("on_failure", action).Str("error", err.Error()).Msg("policy failed")
	}
}

// logIgnored warns, once per config and value, that a chain entry sets on_failure continue or
// skip_remaining on a policy that enforces, where it is ignored.
func (e *Executor) logIgnored(f *factoryEntry, req *agentv1.PolicyRequest, name, onFailure string) {
	flag := &f.ignoredLogged[0]
	if onFailure == "skip_remaining" {
		flag = &f.ignoredLogged[1]
	}
	if flag.Load() || !flag.CompareAndSwap(false, true) {
		return
	}
	if ev := e.log.Warn(); ev != nil {
		ev.Str("route", req.GetRouteName()).Str("policy", name).Str("on_failure", onFailure).
			Msg("on_failure " + onFailure + " is ignored: the policy enforces, so its failures deny and it is never skipped (logged once per policy and value)")
	}
}

// terminal reports whether a result ends the chain: a denial or an immediate response.
func terminal(r policy.Result) bool {
	if r.Status == agentv1.StatusCode_POLICY_DENIED {
		return true
	}
	for _, in := range r.Instructions {
		if in.GetType() == agentv1.InstructionType_IMMEDIATE_RESPONSE {
			return true
		}
	}
	return false
}

// finish ends the chain on a terminal result whose instructions resp already holds. A denial
// without an immediate response gets a plain 403, so that the kernel always has an answer.
func finish(resp *agentv1.PolicyResponse, r policy.Result, name string) *agentv1.PolicyResponse {
	code := r.Status
	if code == agentv1.StatusCode_OK {
		code = agentv1.StatusCode_POLICY_DENIED
	}
	hasImmediate := false
	for _, in := range resp.Instructions {
		if in.GetType() == agentv1.InstructionType_IMMEDIATE_RESPONSE {
			hasImmediate = true
		}
	}
	if !hasImmediate {
		resp.Instructions = append(resp.Instructions, policy.Deny(403, "forbidden", r.Message, nil).Instructions...)
	}
	resp.Status = &agentv1.ResponseStatus{Code: code, PolicyName: name}
	resp.Message = r.Message
	return resp
}

func fail(resp *agentv1.PolicyResponse, code agentv1.StatusCode, name, msg string) *agentv1.PolicyResponse {
	resp.Status = &agentv1.ResponseStatus{Code: code, PolicyName: name}
	resp.Message = msg
	return resp
}

func newPolicyContext(req *agentv1.PolicyRequest) *policy.Context {
	rc := req.GetContext()
	pc := &policy.Context{
		Phase:     req.GetPhase(),
		RequestID: req.GetRequestId(),
		RouteName: req.GetRouteName(),
		Method:    rc.GetMethod(),
		Path:      rc.GetPath(),
		Scheme:    rc.GetScheme(),
		Authority: rc.GetAuthority(),
		ClientIP:  rc.GetClientIp(),
		Headers:   rc.GetHeaders(),
		Body:      rc.GetBody(),
		State:     req.GetState(),
	}
	if pc.Headers == nil {
		pc.Headers = map[string]string{}
	}
	if qp := rc.GetQueryParams(); len(qp) > 0 {
		pc.SetQueryParams(qp)
	}
	if req.GetPhase() == agentv1.PolicyPhase_RESPONSE {
		r := req.GetResponse()
		pc.Response = &policy.ResponseContext{Status: int(r.GetStatusCode()), Headers: r.GetHeaders(), Body: r.GetBody()}
		if pc.Response.Headers == nil {
			pc.Response.Headers = map[string]string{}
		}
	}
	return pc
}

func stateSize(m map[string]string) int {
	n := 0
	for k, v := range m {
		n += len(k) + len(v)
	}
	return n
}

// applyInstructions updates the context with a policy's instructions (§4.1.4), so that the
// next policy sees them. With a nil pc it only checks them (a shadow entry's).
func applyInstructions(pc *policy.Context, ins []*agentv1.Instruction, maxState int) error {
	for _, in := range ins {
		switch in.GetType() {
		case agentv1.InstructionType_SET_HEADER, agentv1.InstructionType_REMOVE_HEADER:
			h := in.GetHeader()
			if h == nil || h.GetKey() == "" {
				return fmt.Errorf("%s instruction without a header name", in.GetType())
			}
			if pc == nil {
				continue
			}
			headers := pc.Headers
			if pc.Response != nil {
				headers = pc.Response.Headers
			}
			key := strings.ToLower(h.GetKey())
			switch {
			case in.GetType() == agentv1.InstructionType_REMOVE_HEADER:
				delete(headers, key)
			case h.GetAppend() && headers[key] != "":
				headers[key] += ", " + h.GetValue()
			default:
				headers[key] = h.GetValue()
			}
		case agentv1.InstructionType_SET_BODY:
			if pc == nil {
				continue
			}
			if pc.Response != nil {
				pc.Response.Body = in.GetBody().GetBody()
			} else {
				pc.Body = in.GetBody().GetBody()
			}
		case agentv1.InstructionType_SET_STATE:
			st := in.GetState()
			if st == nil || st.GetKey() == "" {
				return errors.New("SET_STATE instruction without a key")
			}
			if pc == nil {
				continue
			}
			if pc.State == nil {
				pc.State = map[string]string{}
			}
			pc.State[st.GetKey()] = st.GetValue()
			if stateSize(pc.State) > maxState {
				return errStateTooLarge
			}
		case agentv1.InstructionType_IMMEDIATE_RESPONSE:
			if in.GetImmediateResponse() == nil {
				return errors.New("IMMEDIATE_RESPONSE instruction without a response")
			}
		case agentv1.InstructionType_CONTINUE:
		default:
			return fmt.Errorf("unknown instruction type %d", in.GetType())
		}
	}
	return nil
}
