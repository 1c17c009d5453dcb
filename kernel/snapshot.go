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

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
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

	routes       *routetable.Table[*Route]
	defaultRoute *Route // nil: unknown routes pass unchanged
	agents       map[string]*agentState
	// invalid lists why routes were marked invalid, for logs and readiness.
	invalid []string
	// problems are the same problems with the config key each is about, for file:line
	// reports (reload, --validate).
	problems []problem
	// warnings are settings that have no effect, such as on_failure continue on a policy that
	// enforces; logged when the snapshot is installed and printed by --validate.
	warnings []problem
	// metricKeys are the route series the snapshot uses; installing it drops the others.
	metricKeys map[string]bool
}

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
	// invalid is why requests on the route are denied: a policy its agent does not have.
	invalid  string
	metrics  *routeMetrics
	procMode *filterv3.ProcessingMode
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
}

// policies returns the advertised policies by name, or nil when the agent was never reached.
func (a *agentState) policies() map[string]*agentv1.PolicyInfo {
	info := a.info.Load()
	if info == nil {
		return nil
	}
	m := make(map[string]*agentv1.PolicyInfo, len(info.GetSupportedPolicies()))
	for _, p := range info.GetSupportedPolicies() {
		m[p.GetName()] = p
	}
	return m
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
	s := &Snapshot{Version: version, Config: cfg, Loaded: time.Now(), agents: agents}
	adv := map[string]map[string]*agentv1.PolicyInfo{}
	for name, a := range agents {
		adv[name] = a.policies()
	}
	first := cfg.Agents[0].Name
	routes := map[string]*Route{}
	keepRoutes := map[string]bool{}
	compile := func(name, key, agentName string, reqChain, respChain []ChainEntry) *Route {
		if agentName == "" {
			agentName = first
		}
		r := &Route{Name: name, agent: agents[agentName]}
		var problems []problem
		r.request, problems = compileChain(reqChain, agentv1.PolicyPhase_REQUEST, agentName, adv[agentName], key+".request_policy_chain", problems)
		r.response, problems = compileChain(respChain, agentv1.PolicyPhase_RESPONSE, agentName, adv[agentName], key+".response_policy_chain", problems)
		if a := agents[agentName]; a != nil {
			s.warnings = ignoredOnFailure(reqChain, a.enforcing(), key+".request_policy_chain", s.warnings)
			s.warnings = ignoredOnFailure(respChain, a.enforcing(), key+".response_policy_chain", s.warnings)
		}
		if len(problems) > 0 {
			msgs := make([]string, len(problems))
			for i, p := range problems {
				msgs[i] = p.msg
			}
			r.invalid = strings.Join(msgs, "; ")
			s.invalid = append(s.invalid, fmt.Sprintf("route %q: %s", name, r.invalid))
			s.problems = append(s.problems, problems...)
		}
		r.metrics = m.forRoute(name, agentName)
		r.procMode = computeMode(r)
		keepRoutes[name+"\x00"+agentName] = true
		return r
	}
	for i, rp := range cfg.RoutePolicies {
		routes[rp.RouteName] = compile(rp.RouteName, fmt.Sprintf("policy_kernel.route_policies[%d]", i), rp.Agent, rp.RequestPolicyChain, rp.ResponsePolicyChain)
	}
	if d := cfg.DefaultPolicy; d != nil {
		s.defaultRoute = compile("default", "policy_kernel.default_policy", d.Agent, d.RequestPolicyChain, d.ResponsePolicyChain)
	}
	s.routes = routetable.New(routes)
	sort.Strings(s.invalid)
	s.metricKeys = keepRoutes
	return s
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
	var c chain
	// Without the agent's word, the request is sent.
	readsRequest := false
	for i, e := range entries {
		c.policies = append(c.policies, &agentv1.Policy{Name: e.Policy, Metadata: e.Metadata, OnFailure: e.OnFailure})
		if adv == nil {
			readsRequest = true
			continue // the agent was not reached yet; it is checked again when it is
		}
		ekey := fmt.Sprintf("%s[%d]", key, i)
		info, ok := adv[e.Policy]
		if !ok {
			readsRequest = true
			problems = append(problems, problem{ekey + ".policy", fmt.Sprintf("policy %q is not supported by agent %q", e.Policy, agentName)})
			continue
		}
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
		if phase == agentv1.PolicyPhase_REQUEST && info.GetRequiresRequestBody() {
			c.body = true
		}
		if phase == agentv1.PolicyPhase_RESPONSE && info.GetRequiresResponseBody() {
			c.body = true
		}
		if phase == agentv1.PolicyPhase_RESPONSE && !info.GetResponseIgnoresRequest() {
			readsRequest = true
		}
	}
	c.noRequest = phase == agentv1.PolicyPhase_RESPONSE && len(c.policies) > 0 && !readsRequest
	return c, problems
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
// route, else the longest route name that is a path prefix of :path, else the default policy.
func (s *Snapshot) route(routeName, path string) *Route {
	if routeName != "" {
		if r, ok := s.routes.ByName(routeName); ok {
			return r
		}
	}
	if r, ok := s.routes.ByPath(path); ok {
		return r
	}
	return s.defaultRoute
}

// agentPool owns the agents' connections across snapshots.
type agentPool struct {
	mu      sync.Mutex
	byName  map[string]*agentState
	maxMsg  int
	metrics *kernelMetrics
}

// agentsFor returns the agent states for cfg, reusing the connections of agents whose socket
// and pool size did not change.
func (p *agentPool) agentsFor(cfg *KernelConfig) (map[string]*agentState, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[string]*agentState{}
	for _, ac := range cfg.Agents {
		if old, ok := p.byName[ac.Name]; ok && old.cfg.SocketPath == ac.SocketPath && old.cfg.Connections == ac.Connections {
			st := &agentState{cfg: ac, client: old.client, metrics: old.metrics}
			st.info.Store(old.info.Load())
			st.healthy.Store(old.healthy.Load())
			out[ac.Name] = st
			continue
		}
		client, err := dialStreamAgent(ac, p.maxMsg)
		if err != nil {
			for _, st := range out {
				if !p.owns(st.client) {
					st.client.Close()
				}
			}
			return nil, err
		}
		out[ac.Name] = &agentState{cfg: ac, client: client, metrics: p.metrics.forAgent(ac.Name)}
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
