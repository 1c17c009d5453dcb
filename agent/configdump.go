package agent

import (
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/policy-engine/policy-engine/agent/policy"
	"github.com/policy-engine/policy-engine/internal/obs"
)

// ConfigDump is what /config on the agent's metrics listener shows: the config in force, with
// the policies' settings redacted (see obs.RedactValue): a setting whose name may hold a
// secret is "[REDACTED]", a secret reference (${env:NAME}, ${file:/path}) is shown as written,
// never resolved. Its JSON field names are stable; docs/operations.md describes them.
type ConfigDump struct {
	AgentVersion  string    `json:"agent_version"`
	ConfigVersion string    `json:"config_version"`
	LoadedAt      time.Time `json:"loaded_at"`
	Name          string    `json:"name"`
	SocketPath    string    `json:"socket_path"`
	Server        struct {
		MaxConcurrentRequests int `json:"max_concurrent_requests"`
		RequestTimeoutMS      int `json:"request_timeout_ms"`
		MaxChainDurationMS    int `json:"max_chain_duration_ms"`
	} `json:"server"`
	ResourceLimits struct {
		MaxBodySizeBytes  int `json:"max_body_size_bytes"`
		MaxStateSizeBytes int `json:"max_state_size_bytes"`
	} `json:"resource_limits"`
	// PolicySettings is agent_core.policies.config, redacted, by policy.
	PolicySettings map[string]any `json:"policy_settings"`
	// Policies are the policies compiled into this agent.
	Policies      []PolicyDump   `json:"policies"`
	Observability map[string]any `json:"observability"`
}

// PolicyDump is one compiled-in policy.
type PolicyDump struct {
	Name     string   `json:"name"`
	Version  string   `json:"version"`
	Phases   []string `json:"phases"`
	Enforces bool     `json:"enforces"`
}

// configDump returns the dump of the config in force.
func (e *Executor) configDump() any {
	s := e.snap.Load()
	if s == nil {
		return map[string]string{"error": "no config loaded"}
	}
	c := s.cfg
	d := &ConfigDump{AgentVersion: Version, ConfigVersion: s.version, LoadedAt: s.loaded.UTC(), Name: c.Name, SocketPath: c.SocketPath,
		PolicySettings: map[string]any{}, Policies: []PolicyDump{}}
	d.Server.MaxConcurrentRequests = c.Server.MaxConcurrentRequests
	d.Server.RequestTimeoutMS = c.Server.RequestTimeoutMS
	d.Server.MaxChainDurationMS = c.Server.MaxChainDurationMS
	d.ResourceLimits.MaxBodySizeBytes = c.ResourceLimits.MaxBodySizeBytes
	d.ResourceLimits.MaxStateSizeBytes = c.ResourceLimits.MaxStateSizeBytes
	settings := c.Policies.written
	if settings == nil {
		// A config that did not come through LoadConfig has nothing resolved: redaction by
		// name alone applies.
		settings = c.Policies.Config
	}
	for _, name := range slices.Sorted(maps.Keys(settings)) {
		d.PolicySettings[name] = obs.RedactJSON(settings[name])
	}
	for _, m := range policy.Modules() {
		pd := PolicyDump{Name: m.Name, Version: m.Version, Enforces: m.Enforces, Phases: []string{}}
		if m.Phases&policy.Request != 0 {
			pd.Phases = append(pd.Phases, "request")
		}
		if m.Phases&policy.Response != 0 {
			pd.Phases = append(pd.Phases, "response")
		}
		d.Policies = append(d.Policies, pd)
	}
	o := c.Observability
	d.Observability = map[string]any{
		"log_level": logLevelName(o.LogLevel), "metrics_address": o.MetricsAddress, "admin_address": o.AdminAddress,
		"metrics_enabled": o.MetricsEnabled == nil || *o.MetricsEnabled,
		"pprof_enabled":   o.PprofEnabled != nil && *o.PprofEnabled,
		"tracing":         o.Tracing.Redacted(),
	}
	return d
}

func logLevelName(s string) string {
	if s == "" {
		return "info"
	}
	return strings.ToLower(s)
}
