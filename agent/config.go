package agent

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"sync"

	"github.com/policy-engine/policy-engine/config"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/secrets"
	"github.com/policy-engine/policy-engine/internal/tracing"
	"github.com/policy-engine/policy-engine/internal/yamlconf"
)

// Config is the agent's config file (specification §4.1.5).
type Config struct {
	AgentCore *CoreConfig `yaml:"agent_core" required:"true"`
}

// CoreConfig is the agent_core section.
type CoreConfig struct {
	Name           string              `yaml:"name" required:"true"`
	SocketPath     string              `yaml:"socket_path" required:"true"`
	Version        string              `yaml:"version"`
	Server         ServerConfig        `yaml:"server"`
	Policies       PoliciesConfig      `yaml:"policies"`
	Observability  ObservabilityConfig `yaml:"observability"`
	ResourceLimits ResourceLimits      `yaml:"resource_limits"`
}

// ServerConfig bounds the agent's gRPC server.
type ServerConfig struct {
	MaxConcurrentRequests int `yaml:"max_concurrent_requests"`
	RequestTimeoutMS      int `yaml:"request_timeout_ms"`
	// MaxChainDurationMS bounds every chain: a chain's deadline is the kernel's deadline_ms,
	// at most this, and this when the kernel sets none.
	MaxChainDurationMS int `yaml:"max_chain_duration_ms"`
}

// PoliciesConfig holds the policies' settings.
type PoliciesConfig struct {
	// FailOnUnknown is deprecated and ignored: a chain that names a policy the agent does
	// not have always fails (POLICY_ERROR). It is still accepted, with a warning at load, so
	// that configs that set it keep loading.
	FailOnUnknown *bool                   `yaml:"fail_on_unknown"`
	Config        map[string]yamlconf.Raw `yaml:"config"`
	// written holds the sections as the file has them, before secret references were
	// resolved: for policies that warn about secrets written in clear, and for /config, which
	// shows references, never what they resolve to.
	written map[string]yamlconf.Raw
}

// ObservabilityConfig sets logs, metrics and tracing.
type ObservabilityConfig struct {
	LogLevel string `yaml:"log_level"`
	// MetricsEnabled serves /metrics on MetricsAddress; nil means true.
	MetricsEnabled *bool `yaml:"metrics_enabled"`
	// MetricsAddress is where /metrics and /health/* are served; empty turns the HTTP
	// listener off.
	MetricsAddress string `yaml:"metrics_address"`
	// AdminAddress is where /config and /debug/pprof/ are served; empty turns it off. The
	// shipped configs bind it to loopback: it is for the host or the pod, not the network.
	AdminAddress string `yaml:"admin_address"`
	// PprofEnabled serves /debug/pprof/ on AdminAddress; nil means false.
	PprofEnabled *bool          `yaml:"pprof_enabled"`
	Tracing      tracing.Config `yaml:"tracing"`
}

// ResourceLimits caps what one request may carry.
type ResourceLimits struct {
	MaxBodySizeBytes  int `yaml:"max_body_size_bytes"`
	MaxStateSizeBytes int `yaml:"max_state_size_bytes"`
	// MaxCacheBytes bounds the results all chain entries' caches keep together (cache.go);
	// a result that does not fit is not kept.
	MaxCacheBytes int64 `yaml:"max_cache_bytes"`
}

// Defaults of the agent config.
const (
	DefaultMaxConcurrentRequests = 1000
	DefaultRequestTimeoutMS      = 5000
	DefaultMaxChainDurationMS    = 1000
	DefaultMaxBodySizeBytes      = 1 << 20
	DefaultMaxStateSizeBytes     = 64 << 10
	DefaultMaxCacheBytes         = 64 << 20
)

// agentSchema is the JSON schema every agent config is checked against.
var agentSchema = sync.OnceValue(func() *yamlconf.Schema {
	return yamlconf.MustCompileSchema("agent-config.schema.json", config.AgentSchema)
})

// LoadConfig reads, decodes and validates an agent config file, and resolves the secret
// references (${env:NAME}, ${file:/path}) in the policies' settings.
func LoadConfig(path string) (*Config, []byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("read agent config: %w", err)
	}
	cfg, err := ParseConfig(path, data)
	if err != nil {
		return nil, data, err
	}
	if err := resolveSecrets(path, cfg.AgentCore, secrets.OS); err != nil {
		return nil, data, err
	}
	return cfg, data, nil
}

// resolveSecrets replaces the secret references in the policies' settings by the secrets.
func resolveSecrets(file string, c *CoreConfig, l secrets.Lookup) error {
	var errs []error
	c.Policies.written = maps.Clone(c.Policies.Config)
	for _, name := range slices.Sorted(maps.Keys(c.Policies.Config)) {
		raw, err := l.ResolveJSON(c.Policies.Config[name])
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: agent_core.policies.config.%s: %w", file, name, err))
			continue
		}
		c.Policies.Config[name] = raw
	}
	return errors.Join(errs...)
}

// ParseConfig decodes and validates an agent config; file names the source in errors. Every
// problem is reported at once, each as file:line: key: message, checked by the rules below and
// by the JSON schema config/schema/agent-config.schema.json.
func ParseConfig(file string, data []byte) (*Config, error) {
	var cfg Config
	probs, err := yamlconf.DecodeWithSchema(file, data, &cfg, agentSchema())
	if err != nil {
		return nil, err
	}
	c := cfg.AgentCore
	bad := func(key, format string, args ...any) {
		probs.Addf("agent_core."+key, format, args...)
	}
	if c.Name == "" {
		bad("name", "must not be empty")
	}
	if c.SocketPath == "" {
		bad("socket_path", "must not be empty")
	}
	if c.Server.MaxConcurrentRequests < 0 {
		bad("server.max_concurrent_requests", "must not be negative, got %d", c.Server.MaxConcurrentRequests)
	}
	if c.Server.RequestTimeoutMS < 0 {
		bad("server.request_timeout_ms", "must not be negative, got %d", c.Server.RequestTimeoutMS)
	}
	if c.Server.MaxChainDurationMS < 0 {
		bad("server.max_chain_duration_ms", "must not be negative, got %d", c.Server.MaxChainDurationMS)
	}
	if c.ResourceLimits.MaxBodySizeBytes < 0 {
		bad("resource_limits.max_body_size_bytes", "must not be negative, got %d", c.ResourceLimits.MaxBodySizeBytes)
	}
	if c.ResourceLimits.MaxStateSizeBytes < 0 {
		bad("resource_limits.max_state_size_bytes", "must not be negative, got %d", c.ResourceLimits.MaxStateSizeBytes)
	}
	if c.ResourceLimits.MaxCacheBytes < 0 {
		bad("resource_limits.max_cache_bytes", "must not be negative, got %d", c.ResourceLimits.MaxCacheBytes)
	}
	if _, err := logging.ParseLevel(c.Observability.LogLevel); err != nil {
		bad("observability.log_level", "%v", err)
	}
	if c.Observability.Tracing.Enabled && c.Observability.Tracing.Endpoint == "" {
		bad("observability.tracing.endpoint", "required when tracing is enabled")
	}
	if err := probs.Err(); err != nil {
		return nil, err
	}
	if c.Server.MaxConcurrentRequests == 0 {
		c.Server.MaxConcurrentRequests = DefaultMaxConcurrentRequests
	}
	if c.Server.RequestTimeoutMS == 0 {
		c.Server.RequestTimeoutMS = DefaultRequestTimeoutMS
	}
	if c.Server.MaxChainDurationMS == 0 {
		c.Server.MaxChainDurationMS = DefaultMaxChainDurationMS
	}
	if c.ResourceLimits.MaxBodySizeBytes == 0 {
		c.ResourceLimits.MaxBodySizeBytes = DefaultMaxBodySizeBytes
	}
	if c.ResourceLimits.MaxStateSizeBytes == 0 {
		c.ResourceLimits.MaxStateSizeBytes = DefaultMaxStateSizeBytes
	}
	if c.ResourceLimits.MaxCacheBytes == 0 {
		c.ResourceLimits.MaxCacheBytes = DefaultMaxCacheBytes
	}
	return &cfg, nil
}
