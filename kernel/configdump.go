package kernel

import (
	"time"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/obs"
)

// ConfigDump is what /config on the kernel's metrics listener shows: the config in force as
// the kernel compiled it, with every secret redacted (see obs.RedactValue). Its JSON field
// names are stable; docs/operations.md describes them.
type ConfigDump struct {
	KernelVersion string `json:"kernel_version"`
	// ConfigVersion is the config's version label and content hash, as in
	// policy_kernel_config_info and /health/ready.
	ConfigVersion string `json:"config_version"`
	// LoadedAt is when the config in force was loaded; BuiltAt when its routes were last
	// compiled against the agents (a rebuild follows an agent that comes back or changes).
	LoadedAt time.Time `json:"loaded_at"`
	BuiltAt  time.Time `json:"built_at"`
	// Shadow is policy_kernel.shadow: every entry of every route in shadow.
	Shadow bool `json:"shadow"`
	// Ready is false while a route is invalid or not checked, or an agent is unreachable.
	Ready  bool        `json:"ready"`
	Routes []RouteDump `json:"routes"`
	// Default is the default policy's chains; null when requests of unknown routes pass.
	Default *RouteDump  `json:"default_route"`
	Agents  []AgentDump `json:"agents"`
	Tracing any         `json:"tracing"`
}

// RouteDump is one route: its chains and whether it can serve.
type RouteDump struct {
	Name  string `json:"name"`
	Agent string `json:"agent"`
	// Mode is the route's mode: "shadow" puts every entry in shadow, else "enforce".
	Mode string `json:"mode"`
	// Status is "ok", "invalid" (a chain its agent cannot run; requests are refused) or
	// "unvalidated" (not checked against its agent yet; requests are refused); Reason says why.
	Status   string      `json:"status"`
	Reason   string      `json:"reason,omitempty"`
	Request  []EntryDump `json:"request_policy_chain"`
	Response []EntryDump `json:"response_policy_chain"`
}

// EntryDump is one chain entry as sent to the agent.
type EntryDump struct {
	Policy string `json:"policy"`
	// Mode is "shadow" or "enforce", after the route's and the kernel's modes are applied.
	Mode      string `json:"mode"`
	OnFailure string `json:"on_failure"`
	// When is the entry's condition; empty: it always runs.
	When     string         `json:"when,omitempty"`
	Metadata map[string]any `json:"metadata,omitempty"`
	// Cache is the entry's cache setting with its scope (cachecfg.go).
	Cache *CacheDump `json:"cache,omitempty"`
}

// AgentDump is one agent: its settings, its health and what it advertised.
type AgentDump struct {
	Name       string `json:"name"`
	SocketPath string `json:"socket_path"`
	Healthy    bool   `json:"healthy"`
	FailOpen   bool   `json:"fail_open"`
	TimeoutMS  int    `json:"timeout_ms"`
	// AgentName, AgentVersion and ConfigVersion are what the agent said in GetAgentConfig;
	// empty while it was never reached.
	AgentName     string `json:"agent_name"`
	AgentVersion  string `json:"agent_version"`
	ConfigVersion string `json:"config_version"`
	// Policies are the policies the agent advertises; Enforcing those whose failures deny.
	Policies  []string `json:"policies"`
	Enforcing []string `json:"enforcing_policies"`
}

// configDump returns the dump of the snapshot in force.
func (k *Kernel) configDump() any {
	snap := k.server.Snapshot()
	if snap == nil {
		return map[string]string{"error": "no config loaded"}
	}
	ready, _ := k.readiness()
	return dumpSnapshot(snap, ready)
}

func dumpSnapshot(snap *Snapshot, ready bool) *ConfigDump {
	kc := snap.Config
	d := &ConfigDump{
		KernelVersion: Version, ConfigVersion: snap.Version, LoadedAt: snap.ConfigLoaded.UTC(), BuiltAt: snap.Loaded.UTC(),
		Shadow: kc.Shadow, Ready: ready, Routes: []RouteDump{}, Agents: []AgentDump{},
		Tracing: kc.Observability.Tracing.Redacted(),
	}
	for _, rp := range kc.RoutePolicies {
		if r, ok := snap.routes.ByName(rp.RouteName); ok {
			d.Routes = append(d.Routes, dumpRoute(r, rp.Mode, kc.agentOf(rp.Agent)))
		}
	}
	if dp := kc.DefaultPolicy; dp != nil && snap.defaultRoute != nil {
		r := dumpRoute(snap.defaultRoute, dp.Mode, kc.agentOf(dp.Agent))
		d.Default = &r
	}
	for _, ac := range kc.Agents {
		a := snap.agents[ac.Name]
		ad := AgentDump{Name: ac.Name, SocketPath: ac.SocketPath, FailOpen: ac.FailOpen, TimeoutMS: ac.TimeoutMS,
			Policies: []string{}, Enforcing: []string{}}
		if a != nil {
			ad.Healthy = a.healthy.Load()
			info := a.info.Load()
			ad.AgentName, ad.AgentVersion, ad.ConfigVersion = info.GetAgentName(), info.GetAgentVersion(), info.GetConfigVersion()
			for _, p := range a.policySource().GetSupportedPolicies() {
				ad.Policies = append(ad.Policies, p.GetName())
			}
			for _, p := range a.enforcing() {
				if p != "" {
					ad.Enforcing = append(ad.Enforcing, p)
				}
			}
		}
		d.Agents = append(d.Agents, ad)
	}
	return d
}

// agentOf is the name of a route's agent: the one it names, else the first.
func (kc *KernelConfig) agentOf(name string) string {
	if name == "" && len(kc.Agents) > 0 {
		return kc.Agents[0].Name
	}
	return name
}

func dumpRoute(r *Route, mode, agent string) RouteDump {
	if mode == "" {
		mode = ModeEnforce
	}
	rd := RouteDump{Name: r.Name, Agent: agent, Mode: mode, Status: "ok",
		Request: dumpChain(r.request.policies), Response: dumpChain(r.response.policies)}
	switch r.refuseCode {
	case codeInvalidRoute:
		rd.Status, rd.Reason = "invalid", r.invalid
	case codeNotValidated:
		rd.Status, rd.Reason = "unvalidated", r.invalid
	}
	return rd
}

func dumpChain(ps []*agentv1.Policy) []EntryDump {
	out := make([]EntryDump, 0, len(ps))
	for _, p := range ps {
		e := EntryDump{Policy: p.GetName(), Mode: ModeEnforce, OnFailure: p.GetOnFailure(), When: p.GetWhen(), Metadata: obs.RedactMap(false, p.GetMetadata())}
		if e.OnFailure == "" {
			e.OnFailure = "deny"
		}
		if p.GetShadow() {
			e.Mode = ModeShadow
		}
		e.Cache = dumpCache(p.GetCache())
		out = append(out, e)
	}
	return out
}
