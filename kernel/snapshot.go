package kernel

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/cond"
	"github.com/policy-engine/policy-engine/internal/routetable"
)

// Snapshot is one immutable state of the kernel's config: the route table with each route's
// compiled chains and the agents that run them. The server holds the current one in an
// atomic.Pointer; a stream loads it once and keeps it for its whole life, so its request and
// response phases see the same config.
type Snapshot struct {
	Version string
	Config  *KernelConfig
	// Loaded is when the snapshot was built.
	Loaded time.Time
	// ConfigLoaded is when its config was loaded: a snapshot rebuilt from the same config
	// keeps its predecessor's (set by Server.Store).
	ConfigLoaded time.Time

	routes       *routetable.Table[*Route]
	defaultRoute *Route // nil: unknown routes pass unchanged
	agents       map[string]*agentState
	// invalid lists why routes were marked invalid, for logs and readiness.
	invalid []string
	// unvalidated lists why routes could not be checked against their agent, for logs and
	// readiness; their requests are refused until a rebuild checks them.
	unvalidated []string
	// unvalidatedAgents names the agents of the unvalidated routes.
	unvalidatedAgents map[string]bool
	// problems are the same problems with the config key each is about, for file:line
	// reports (reload, --validate).
	problems []problem
	// warnings are settings that have no effect, such as on_failure continue on a policy that
	// enforces; logged when the snapshot is installed and printed by --validate.
	warnings []problem
	// metricKeys are the route series the snapshot uses; installing it drops the others.
	metricKeys map[string]bool
	// defaults counts the requests that route gives the default policy.
	defaults *defaultRoutes
}

// The error codes of a refused route.
const (
	codeInvalidRoute = "invalid_route"
	codeNotValidated = "route_not_validated"
)

// problem is something wrong with a config that only the agents' advertised policies reveal.
type problem struct {
	key string // dotted config key, e.g. policy_kernel.route_policies[0].request_policy_chain[1]
	msg string
}

// Route is a route's compiled chains.
type Route struct {
	Name     string
	agent    *agentState
	request  chain
	response chain
	// invalid is why requests on the route are refused: a policy its agent does not have or
	// refuses, or chains that could not be checked against the agent (refuseCode says which).
	invalid string
	// refuseCode is the error code of the refusal: invalid_route or route_not_validated.
	refuseCode string
	// checkedWith is the agent's policy set the chains were compiled against. A call whose
	// agent has learned another set since is checked against that one (see stale).
	checkedWith *agentv1.GetAgentConfigResponse
	// recheck caches the last check against another policy set.
	recheck atomic.Pointer[recheck]
	metrics *routeMetrics
	// procModes are the mode overrides the route needs, by whether Envoy streams the request
	// body (bit 0) and the response body (bit 1) of a chain that reads it; see modeFor.
	procModes [4]*filterv3.ProcessingMode
	// skipModes are procModes for a request whose request chain the kernel found wholly
	// skipped by its when conditions: its body is not asked for (see skipMode).
	skipModes [4]*filterv3.ProcessingMode
	// droppedLogged makes the first dropped mutation of a route the only one logged.
	droppedLogged atomic.Bool
}

// chain is a phase's policies, ready to go into a PolicyRequest as they are.
type chain struct {
	policies []*agentv1.Policy
	// body says that a policy of the chain reads the body of its phase.
	body bool
	// noRequest says that no policy of a response chain reads the request: it is not sent.
	noRequest bool
	// owned are the request headers the chain's policies set from what they verified, as the
	// agent reported them (lowercase): when the kernel lets a request through without the agent
	// (fail_open), it removes the client's own copies, as the agent would have.
	owned []string
	// early and late split a chain that reads the body, for when Envoy sends the headers on
	// before the body, or may send no body at all: early, the entries before the first one
	// that reads the body, runs when the headers arrive; late, the rest, on the whole body. The
	// entries run in the chain's order, each seeing what the ones before it did, as in one run.
	early, late []*agentv1.Policy
	// conds are the entries' when conditions, by entry (nil: no entry has one); kernelConds
	// says that every entry has one that does not read state, so that the kernel can tell
	// that the whole chain would be skipped (see skipByConditions in when.go).
	conds       []*cond.Expr
	kernelConds bool
	// ids are the chain ids of the parts (partAll, partEarly, partLate); 0: sent in full.
	ids [3]uint64
	// static is the chain's answer when every entry answers every request alike (the agent
	// reported its static_outcome, and the entry is not in shadow and has no condition or
	// cache): the kernel answers with it and does not call the agent. nil: the agent runs it.
	static *staticChain
}

// staticChain is a chain's fixed answer, built once per snapshot and shared read-only by every
// stream of the route.
type staticChain struct {
	// common is the reply's mutation; nil when the chain changes nothing.
	common *extprocv3.CommonResponse
	// dropped are the mutations Envoy would reject, counted per request as the agent's are.
	dropped []string
}

// chain parts: which of a chain's policies a run sends.
const (
	partAll uint8 = iota
	partEarly
	partLate
)

// part returns the policies of a part of the chain.
func (c *chain) part(p uint8) []*agentv1.Policy {
	switch p {
	case partEarly:
		return c.early
	case partLate:
		return c.late
	}
	return c.policies
}

func (c *chain) empty() bool { return len(c.policies) == 0 }

// agentState is an agent as the kernel knows it across snapshots: its connections, what it
// advertised, and whether it is healthy. Reloads reuse it while the socket path and pool size
// stay the same.
type agentState struct {
	cfg     AgentConfig
	client  AgentClient
	info    atomic.Pointer[agentv1.GetAgentConfigResponse]
	healthy atomic.Bool
	metrics *agentMetrics
	// learned is the policy set the client learned last, shared by every agentState of the
	// client; nil for a client that does not learn (test fakes): info is used instead.
	learned *atomic.Pointer[agentv1.GetAgentConfigResponse]
	// verdicts are the agent's own checks of the chain entries (ValidateChains); nil when
	// the kernel never asked (the schema checks alone apply).
	verdicts atomic.Pointer[entryVerdicts]
}

// policySource returns the advertised config that chains are compiled against: the policy
// set the client learned last, else the last GetAgentConfig answer; nil when the agent was
// never reached.
func (a *agentState) policySource() *agentv1.GetAgentConfigResponse {
	if a.learned != nil {
		if l := a.learned.Load(); l != nil {
			return l
		}
	}
	return a.info.Load()
}

// policiesOf returns advertised policies by name, or nil for a nil config.
func policiesOf(info *agentv1.GetAgentConfigResponse) map[string]*agentv1.PolicyInfo {
	if info == nil {
		return nil
	}
	m := make(map[string]*agentv1.PolicyInfo, len(info.GetSupportedPolicies()))
	for _, p := range info.GetSupportedPolicies() {
		m[p.GetName()] = p
	}
	return m
}

// entryVerdicts is what an agent said of chain entries when asked to build them, for one
// policy set and agent config version.
type entryVerdicts struct {
	source        *agentv1.GetAgentConfigResponse
	configVersion string
	// unsupported says that the agent has no ValidateChains (an older build): the kernel's
	// schema checks alone apply.
	unsupported bool
	// byEntry holds, by entryKey, "" for an entry that builds, else the agent's error. An
	// entry missing from it was not checked (the agent could not be asked).
	byEntry map[string]string
	// owned holds, by entryKey, the request headers an entry owns (EntryFacts), for the entries
	// that own any.
	owned map[string][]string
	// static holds, by entryKey, the answer of the entries that answer every request of their
	// phase alike (EntryFacts.static_outcome), for the entries the agent reported one for.
	static map[string]*agentv1.StaticOutcome
}

// current reports whether the verdicts were given for src and the agent's config version.
func (v *entryVerdicts) current(src *agentv1.GetAgentConfigResponse, configVersion string) bool {
	return v != nil && v.source == src && v.configVersion == configVersion
}

// entryKey identifies a chain entry for the agent's verdict: policy, phase and metadata.
func entryKey(p *agentv1.Policy, phase agentv1.PolicyPhase) string {
	keys := make([]string, 0, len(p.GetMetadata()))
	for k := range p.GetMetadata() {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	b.WriteString(p.GetName())
	b.WriteByte(0)
	b.WriteString(phase.String())
	for _, k := range keys {
		b.WriteByte(0)
		b.WriteString(k)
		b.WriteByte(0)
		b.WriteString(p.GetMetadata()[k])
	}
	if p.GetWhen() != "" {
		// The agent compiles the condition too: an entry is checked with its condition.
		b.WriteString("\x00\x00when\x00")
		b.WriteString(p.GetWhen())
	}
	b.WriteString(cacheEntryKey(p.GetCache()))
	return b.String()
}

// configVersion is a config's user-set version (if any) joined to a hash of its bytes.
func configVersion(user string, data []byte) string {
	sum := sha256.Sum256(data)
	h := hex.EncodeToString(sum[:6])
	if user != "" {
		return user + "-" + h
	}
	return h
}

// buildSnapshot compiles cfg against the agents' advertised policies. A chain that names a
// policy its agent does not have makes its route invalid; everything else keeps working.
func buildSnapshot(cfg *KernelConfig, version string, agents map[string]*agentState, m *kernelMetrics) *Snapshot {
	s := &Snapshot{Version: version, Config: cfg, Loaded: time.Now(), agents: agents, defaults: m.defaults}
	type agentView struct {
		src      *agentv1.GetAgentConfigResponse
		adv      map[string]*agentv1.PolicyInfo
		verdicts *entryVerdicts // nil: the schema checks alone
	}
	views := map[string]agentView{}
	for name, a := range agents {
		v := agentView{src: a.policySource()}
		v.adv = policiesOf(v.src)
		if vd := a.verdicts.Load(); vd != nil && !vd.unsupported {
			v.verdicts = vd
			if !vd.current(v.src, a.info.Load().GetConfigVersion()) {
				// Given for another policy set or agent config: nothing is checked.
				v.verdicts = &entryVerdicts{}
			}
		}
		views[name] = v
	}
	first := cfg.Agents[0].Name
	routes := map[string]*Route{}
	keepRoutes := map[string]bool{}
	compile := func(name, key, agentName, mode string, reqChain, respChain []ChainEntry) *Route {
		shadowAll := cfg.Shadow || mode == ModeShadow
		if agentName == "" {
			agentName = first
		}
		view := views[agentName]
		r := &Route{Name: name, agent: agents[agentName], checkedWith: view.src}
		var problems []problem
		var unchecked int
		r.request, problems, unchecked = compileChecked(reqChain, agentv1.PolicyPhase_REQUEST, agentName, view.adv, view.verdicts, shadowAll, key+".request_policy_chain", problems, unchecked)
		r.response, problems, unchecked = compileChecked(respChain, agentv1.PolicyPhase_RESPONSE, agentName, view.adv, view.verdicts, shadowAll, key+".response_policy_chain", problems, unchecked)
		problems = attachConditions(&r.request, cfg, reqChain, agentv1.PolicyPhase_REQUEST, agentName, view.src, key+".request_policy_chain", problems)
		problems = attachConditions(&r.response, cfg, respChain, agentv1.PolicyPhase_RESPONSE, agentName, view.src, key+".response_policy_chain", problems)
		problems = cacheProblems(reqChain, view.src, agentName, key+".request_policy_chain", problems)
		problems = cacheProblems(respChain, view.src, agentName, key+".response_policy_chain", problems)
		scopeCaches(name, agentv1.PolicyPhase_REQUEST, r.request.policies)
		scopeCaches(name, agentv1.PolicyPhase_RESPONSE, r.response.policies)
		// Named once every field of their policies is set, the scopes included.
		r.request.assignIDs()
		r.response.assignIDs()
		if a := agents[agentName]; a != nil {
			s.warnings = ignoredOnFailure(reqChain, a.enforcing(), key+".request_policy_chain", s.warnings)
			s.warnings = ignoredOnFailure(respChain, a.enforcing(), key+".response_policy_chain", s.warnings)
		}
		switch {
		case len(problems) > 0:
			msgs := make([]string, len(problems))
			for i, p := range problems {
				msgs[i] = p.msg
			}
			r.invalid, r.refuseCode = strings.Join(msgs, "; "), codeInvalidRoute
			s.invalid = append(s.invalid, fmt.Sprintf("route %q: %s", name, r.invalid))
			s.problems = append(s.problems, problems...)
		case view.adv == nil && len(reqChain)+len(respChain) > 0:
			r.invalid, r.refuseCode = fmt.Sprintf("agent %q was never reached: the chains are not checked", agentName), codeNotValidated
		case unchecked > 0:
			r.invalid, r.refuseCode = fmt.Sprintf("agent %q has not built %d chain entries yet", agentName, unchecked), codeNotValidated
		}
		if r.refuseCode == codeNotValidated {
			s.unvalidated = append(s.unvalidated, fmt.Sprintf("route %q: %s", name, r.invalid))
			if s.unvalidatedAgents == nil {
				s.unvalidatedAgents = map[string]bool{}
			}
			s.unvalidatedAgents[agentName] = true
		}
		r.metrics = m.forRoute(name, agentName)
		for i := range r.procModes {
			r.procModes[i] = computeMode(r, i&1 != 0, i&2 != 0)
		}
		if r.request.kernelConds {
			for i := range r.skipModes {
				r.skipModes[i] = computeModeBody(r, false, i&1 != 0, i&2 != 0)
			}
		}
		keepRoutes[name+"\x00"+agentName] = true
		return r
	}
	for i, rp := range cfg.RoutePolicies {
		routes[rp.RouteName] = compile(rp.RouteName, fmt.Sprintf("policy_kernel.route_policies[%d]", i), rp.Agent, rp.Mode, rp.RequestPolicyChain, rp.ResponsePolicyChain)
	}
	if d := cfg.DefaultPolicy; d != nil {
		s.defaultRoute = compile("default", "policy_kernel.default_policy", d.Agent, d.Mode, d.RequestPolicyChain, d.ResponsePolicyChain)
	}
	s.routes = routetable.New(routes)
	sort.Strings(s.invalid)
	sort.Strings(s.unvalidated)
	s.metricKeys = keepRoutes
	return s
}

// unvalidatedOn reports whether a route on agent a is not checked against it yet.
func (s *Snapshot) unvalidatedOn(a *agentState) bool {
	return s != nil && s.unvalidatedAgents[a.cfg.Name]
}

// refusedRoutes is how many routes of the snapshot cannot serve: invalid or not checked.
func (s *Snapshot) refusedRoutes() int {
	if s == nil {
		return 0
	}
	return len(s.invalid) + len(s.unvalidated)
}

// retainMetrics drops the series of the routes and agents that the snapshot no longer has;
// it is called when the snapshot is installed, so that a rejected snapshot changes nothing.
func (s *Snapshot) retainMetrics(m *kernelMetrics) {
	keepAgents := make(map[string]bool, len(s.agents))
	for name := range s.agents {
		keepAgents[name] = true
	}
	m.retain(s.metricKeys, keepAgents)
}

// compileChain turns a config chain into the policies sent to the agent, checking each against
// what the agent advertises (when it has been reached): that it has the policy, that the
// policy runs in the phase, and that the metadata satisfies the policy's metadata schema.
// key is the chain's config key.
func compileChain(entries []ChainEntry, phase agentv1.PolicyPhase, agentName string, adv map[string]*agentv1.PolicyInfo, key string, problems []problem) (chain, []problem) {
	c, problems, _ := compileChecked(entries, phase, agentName, adv, nil, false, key, problems, 0)
	c.assignIDs()
	return c, problems
}

// compileChecked is compileChain that also checks each entry against what the agent said
// when it built it (verdicts, unless nil): an entry the agent refused is a problem, one it was
// not asked about is counted in unchecked. shadowAll puts every entry in shadow (the route's or
// the kernel's mode); otherwise each entry's own mode applies.
func compileChecked(entries []ChainEntry, phase agentv1.PolicyPhase, agentName string, adv map[string]*agentv1.PolicyInfo, verdicts *entryVerdicts, shadowAll bool, key string, problems []problem, unchecked int) (chain, []problem, int) {
	var c chain
	// Without the agent's word, the request is sent.
	readsRequest := false
	var readsBody []bool
	// static gathers the entries' fixed answers while every entry has one.
	static, allStatic := []*agentv1.Instruction(nil), verdicts != nil
	for i, e := range entries {
		pol := &agentv1.Policy{Name: e.Policy, Metadata: e.Metadata, OnFailure: e.OnFailure, Shadow: shadowAll || e.Mode == ModeShadow, When: e.When}
		pol.Cache = e.Cache.spec()
		c.policies = append(c.policies, pol)
		if allStatic {
			so := verdicts.static[entryKey(pol, phase)]
			if so == nil || pol.GetShadow() || pol.GetWhen() != "" || pol.GetCache() != nil {
				allStatic = false
			} else {
				static = append(static, so.GetInstructions()...)
			}
		}
		readsBody = append(readsBody, false)
		if adv == nil {
			readsRequest = true
			continue // the agent was not reached yet; it is checked again when it is
		}
		ekey := fmt.Sprintf("%s[%d]", key, i)
		info, ok := adv[e.Policy]
		if !ok {
			readsRequest = true
			problems = append(problems, problem{ekey + ".policy", unsupportedPolicy(e.Policy, agentName, adv)})
			continue
		}
		before := len(problems)
		if !phaseSupported(info, phase) {
			problems = append(problems, problem{ekey + ".policy", fmt.Sprintf("policy %q does not run in the %s phase", e.Policy, strings.ToLower(phase.String()))})
		}
		for _, mp := range checkMetadata(info.GetMetadataSchema(), e.Metadata) {
			k, where := ekey+".metadata", "metadata"
			if mp.key != "" {
				k, where = k+"."+mp.key, where+"."+mp.key
			}
			problems = append(problems, problem{k, fmt.Sprintf("policy %q: %s: %s", e.Policy, where, mp.msg)})
		}
		if verdicts != nil && len(problems) == before {
			// The schema cannot tell everything a policy refuses (a setting out of its
			// range, a key source the agent lacks): the agent built the entry.
			switch msg, asked := verdicts.byEntry[entryKey(pol, phase)]; {
			case !asked:
				unchecked++
			case msg != "":
				problems = append(problems, problem{ekey, fmt.Sprintf("agent %q cannot run this entry: %s", agentName, msg)})
			}
			for _, h := range verdicts.owned[entryKey(pol, phase)] {
				if !slices.Contains(c.owned, h) {
					c.owned = append(c.owned, h)
				}
			}
		}
		if phase == agentv1.PolicyPhase_REQUEST && info.GetRequiresRequestBody() ||
			phase == agentv1.PolicyPhase_RESPONSE && info.GetRequiresResponseBody() {
			c.body = true
			readsBody[i] = true
		}
		if phase == agentv1.PolicyPhase_RESPONSE && !info.GetResponseIgnoresRequest() {
			readsRequest = true
		}
	}
	c.noRequest = phase == agentv1.PolicyPhase_RESPONSE && len(c.policies) > 0 && !readsRequest
	if allStatic && len(problems) == 0 && len(c.policies) > 0 && !c.body && len(c.owned) == 0 {
		c.static = newStaticChain(phase, static)
	}
	if c.body {
		for i, p := range c.policies {
			if readsBody[i] || len(c.late) > 0 {
				c.late = append(c.late, p)
			} else {
				c.early = append(c.early, p)
			}
		}
	}
	return c, problems, unchecked
}

// assignIDs names the chain and its parts (chainIDOf) by their policies as they will be sent,
// so after every field of them is set: the agent keeps a chain by id with the policies it
// first came with.
func (c *chain) assignIDs() {
	c.ids = [3]uint64{chainIDOf(c.policies), chainIDOf(c.early), chainIDOf(c.late)}
}

// newStaticChain builds a chain's fixed answer from its entries' instructions, as the kernel
// would from the agent's reply; nil when they are not header changes only (the agent then runs
// the chain, and its reply is judged as any other).
func newStaticChain(phase agentv1.PolicyPhase, ins []*agentv1.Instruction) *staticChain {
	m, err := buildMutation(phase, ins, nil)
	if err != nil || m.immediate != nil || m.bodySet {
		return nil
	}
	return &staticChain{common: m.common(false), dropped: m.dropped}
}

// recheck is a route checked against a policy set other than the one it was compiled with.
type recheck struct {
	src *agentv1.GetAgentConfigResponse
	msg string // why the route cannot run on that set; "" when it can
}

// stale returns why the route's chain of phase must not be served by its agent: "" while the
// agent's client has learned no other policy set than the one the route was compiled
// against, which is the hot path's case (one atomic load). Once the agent was replaced by a
// build with another set, and until the snapshot is rebuilt, every call is checked against
// the new set: a policy it lacks, a phase it does not run in, or a body it reads that the
// route does not ask Envoy for makes the call's answer unusable.
func (r *Route) stale() string {
	if r.agent == nil || r.agent.learned == nil {
		return ""
	}
	src := r.agent.learned.Load()
	if src == nil || src == r.checkedWith {
		return ""
	}
	rc := r.recheck.Load()
	if rc == nil || rc.src != src {
		rc = &recheck{src: src, msg: r.checkAgainst(policiesOf(src))}
		if rc.msg == "" {
			rc.msg = r.checkFeatures(src)
		}
		r.recheck.Store(rc)
	}
	return rc.msg
}

// checkAgainst checks both chains of the route against an advertised policy set.
func (r *Route) checkAgainst(adv map[string]*agentv1.PolicyInfo) string {
	for _, ph := range []agentv1.PolicyPhase{agentv1.PolicyPhase_REQUEST, agentv1.PolicyPhase_RESPONSE} {
		ch := &r.request
		if ph == agentv1.PolicyPhase_RESPONSE {
			ch = &r.response
		}
		for _, p := range ch.policies {
			info, ok := adv[p.GetName()]
			switch {
			case !ok:
				return unsupportedPolicy(p.GetName(), r.agent.cfg.Name, adv)
			case !phaseSupported(info, ph):
				return fmt.Sprintf("policy %q does not run in the %s phase", p.GetName(), strings.ToLower(ph.String()))
			case ph == agentv1.PolicyPhase_REQUEST && info.GetRequiresRequestBody() && !ch.body,
				ph == agentv1.PolicyPhase_RESPONSE && info.GetRequiresResponseBody() && !ch.body:
				return fmt.Sprintf("policy %q now reads the body, which the route does not ask for", p.GetName())
			case ph == agentv1.PolicyPhase_RESPONSE && !info.GetResponseIgnoresRequest() && ch.noRequest:
				return fmt.Sprintf("policy %q now reads the request in the response phase, which the route does not send", p.GetName())
			}
		}
	}
	return ""
}

// enforcing returns the policies the agent says enforce (agent_metadata enforcing_policies):
// their failures deny whatever on_failure says.
func (a *agentState) enforcing() []string {
	return strings.Split(a.info.Load().GetAgentMetadata()["enforcing_policies"], ",")
}

// ignoredOnFailure warns of chain entries whose on_failure the agent ignores: continue or
// skip_remaining on a policy that enforces, whose failures deny and which is never skipped.
func ignoredOnFailure(entries []ChainEntry, enforcing []string, key string, warnings []problem) []problem {
	for i, e := range entries {
		if (e.OnFailure == "continue" || e.OnFailure == "skip_remaining") && slices.Contains(enforcing, e.Policy) {
			warnings = append(warnings, problem{fmt.Sprintf("%s[%d].on_failure", key, i),
				fmt.Sprintf("on_failure %s is ignored: policy %q enforces, so its failures deny and it is never skipped", e.OnFailure, e.Policy)})
		}
	}
	return warnings
}

func phaseSupported(info *agentv1.PolicyInfo, phase agentv1.PolicyPhase) bool {
	for _, p := range info.GetSupportedPhases() {
		if p == phase {
			return true
		}
	}
	return false
}

// route picks the route of a request: the xds.route_name attribute when it names a configured
// route, else the longest route name that is a path prefix of :path (both normalised and
// compared case-insensitively, see routetable.ByPath), else the default policy, counted and
// logged by route name.
func (s *Snapshot) route(routeName, path string) *Route {
	if routeName != "" {
		if r, ok := s.routes.ByName(routeName); ok {
			return r
		}
	}
	if r, ok := s.routes.ByPath(path); ok {
		return r
	}
	if s.defaults != nil {
		s.defaults.observe(routeName, s.defaultRoute != nil)
	}
	return s.defaultRoute
}

// agentPool owns the agents' connections across snapshots.
type agentPool struct {
	mu      sync.Mutex
	byName  map[string]*agentState
	maxMsg  int
	metrics *kernelMetrics
	// onLearn is called when a client learns that its agent has another policy set, before
	// the client sends a call on the new connection; nil: nothing to do.
	onLearn func(AgentClient, *agentv1.GetAgentConfigResponse)
}

// agentsFor returns the agent states for cfg, reusing the connections of agents whose socket
// and pool size did not change.
func (p *agentPool) agentsFor(cfg *KernelConfig) (map[string]*agentState, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[string]*agentState{}
	for _, ac := range cfg.Agents {
		if old, ok := p.byName[ac.Name]; ok && old.cfg.SocketPath == ac.SocketPath && old.cfg.Connections == ac.Connections {
			st := &agentState{cfg: ac, client: old.client, metrics: old.metrics, learned: old.learned}
			st.info.Store(old.info.Load())
			st.verdicts.Store(old.verdicts.Load())
			st.healthy.Store(old.healthy.Load())
			out[ac.Name] = st
			continue
		}
		client, err := dialStreamAgent(ac, p.maxMsg, p.onLearn)
		if err != nil {
			for _, st := range out {
				if !p.owns(st.client) {
					st.client.Close()
				}
			}
			return nil, err
		}
		out[ac.Name] = &agentState{cfg: ac, client: client, metrics: p.metrics.forAgent(ac.Name), learned: &client.learned}
	}
	return out, nil
}

// discard closes the clients of agents that agentsFor opened but that were never committed,
// because the snapshot that needed them was rejected.
func (p *agentPool) discard(agents map[string]*agentState) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, st := range agents {
		if !p.owns(st.client) {
			st.client.Close()
		}
	}
}

func (p *agentPool) owns(c AgentClient) bool {
	for _, st := range p.byName {
		if st.client == c {
			return true
		}
	}
	return false
}

// commit makes agents the pool's current set and closes, after grace, the clients no longer
// used, so that streams still pinned to an older snapshot can finish their calls.
func (p *agentPool) commit(agents map[string]*agentState, grace time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	used := map[AgentClient]bool{}
	for _, st := range agents {
		used[st.client] = true
	}
	for _, old := range p.byName {
		if !used[old.client] {
			c := old.client
			time.AfterFunc(grace, func() { c.Close() })
		}
	}
	p.byName = agents
}

// closeAll closes every client.
func (p *agentPool) closeAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, st := range p.byName {
		st.client.Close()
	}
	p.byName = nil
}

// unsupportedPolicy is the problem of a chain that names a policy its agent does not advertise,
// with the closest advertised name when one is near enough to be a slip of the keyboard.
func unsupportedPolicy(name, agentName string, adv map[string]*agentv1.PolicyInfo) string {
	msg := fmt.Sprintf("policy %q is not supported by agent %q", name, agentName)
	if s := closestPolicy(name, adv); s != "" {
		msg += fmt.Sprintf(" (did you mean %q?)", s)
	}
	return msg
}

// closestPolicy returns the advertised policy name that name most likely misspells: one that
// differs only in case first, otherwise the nearest by edit distance (ignoring case) if at most
// a third of name's letters (at least one) are off; ties go to the first in sorted order. It
// returns "" when no name is that close.
func closestPolicy(name string, adv map[string]*agentv1.PolicyInfo) string {
	names := sortedKeys(adv)
	for _, n := range names {
		if strings.EqualFold(n, name) {
			return n
		}
	}
	a := []rune(strings.ToLower(name))
	limit := max(1, len(a)/3)
	best, bestDist := "", limit+1
	for _, n := range names {
		b := []rune(strings.ToLower(n))
		if d := len(a) - len(b); d > limit || -d > limit {
			continue // the lengths alone put it too far; this also bounds the work on long input
		}
		if d := editDistance(a, b); d < bestDist {
			best, bestDist = n, d
		}
	}
	return best
}

// editDistance is the Levenshtein distance between a and b: the fewest single-letter
// insertions, deletions and substitutions that turn one into the other.
func editDistance(a, b []rune) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
