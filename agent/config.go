package agent

import (
	"errors"
	"fmt"
	"os"

	"github.com/policy-engine/policy-engine/internal/logging"
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
}

// PoliciesConfig holds the policies' settings.
type PoliciesConfig struct {
	FailOnUnknown bool                    `yaml:"fail_on_unknown"`
	Config        map[string]yamlconf.Raw `yaml:"config"`
}

// ObservabilityConfig sets logs and metrics.
type ObservabilityConfig struct {
	LogLevel       string `yaml:"log_level"`
	MetricsEnabled bool   `yaml:"metrics_enabled"`
	// MetricsAddress is where /metrics, /health/* and /debug/pprof/ are served; empty turns
	// the HTTP listener off.
	MetricsAddress string `yaml:"metrics_address"`
	PprofEnabled   *bool  `yaml:"pprof_enabled"`
}

// ResourceLimits caps what one request may carry.
type ResourceLimits struct {
	MaxBodySizeBytes  int `yaml:"max_body_size_bytes"`
	MaxStateSizeBytes int `yaml:"max_state_size_bytes"`
}

// Defaults of the agent config.
const (
	DefaultMaxConcurrentRequests = 1000
	DefaultRequestTimeoutMS      = 5000
	DefaultMaxBodySizeBytes      = 1 << 20
	DefaultMaxStateSizeBytes     = 64 << 10
)

// LoadConfig reads, decodes and validates an agent config file.
func LoadConfig(path string) (*Config, []byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("read agent config: %w", err)
	}
	cfg, err := ParseConfig(path, data)
	return cfg, data, err
}

// ParseConfig decodes and validates an agent config; file names the source in errors.
func ParseConfig(file string, data []byte) (*Config, error) {
	var cfg Config
	if err := yamlconf.Decode(file, data, &cfg); err != nil {
		return nil, err
	}
	c := cfg.AgentCore
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: agent_core.%s: %s", file, key, fmt.Sprintf(format, args...)))
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
	if c.ResourceLimits.MaxBodySizeBytes < 0 {
		bad("resource_limits.max_body_size_bytes", "must not be negative, got %d", c.ResourceLimits.MaxBodySizeBytes)
	}
	if c.ResourceLimits.MaxStateSizeBytes < 0 {
		bad("resource_limits.max_state_size_bytes", "must not be negative, got %d", c.ResourceLimits.MaxStateSizeBytes)
	}
	if _, err := logging.ParseLevel(c.Observability.LogLevel); err != nil {
		bad("observability.log_level", "%v", err)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	if c.Server.MaxConcurrentRequests == 0 {
		c.Server.MaxConcurrentRequests = DefaultMaxConcurrentRequests
	}
	if c.Server.RequestTimeoutMS == 0 {
		c.Server.RequestTimeoutMS = DefaultRequestTimeoutMS
	}
	if c.ResourceLimits.MaxBodySizeBytes == 0 {
		c.ResourceLimits.MaxBodySizeBytes = DefaultMaxBodySizeBytes
	}
	if c.ResourceLimits.MaxStateSizeBytes == 0 {
		c.ResourceLimits.MaxStateSizeBytes = DefaultMaxStateSizeBytes
	}
	return &cfg, nil
}
