package kernel

import (
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"sync"

	"github.com/policy-engine/policy-engine/config"
	"github.com/policy-engine/policy-engine/internal/cond"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/tracing"
	"github.com/policy-engine/policy-engine/internal/yamlconf"
)

// Config is the kernel's config file (specification §3.2).
type Config struct {
	PolicyKernel *KernelConfig `yaml:"policy_kernel" required:"true"`
}

// KernelConfig is the policy_kernel section.
type KernelConfig struct {
	// Version is an optional label shown with the config's content hash.
	Version string `yaml:"version"`
	// Shadow puts every chain entry of every route in shadow (see ChainEntry.Mode).
	Shadow        bool                `yaml:"shadow"`
	Server        ServerConfig        `yaml:"server"`
	Agents        []AgentConfig       `yaml:"agents" required:"true"`
	RoutePolicies []RoutePolicy       `yaml:"route_policies"`
	DefaultPolicy *ChainPair          `yaml:"default_policy"`
	Observability ObservabilityConfig `yaml:"observability"`

	// conds are the chain entries' when conditions compiled by ParseConfig, by source.
	conds map[string]*cond.Expr
}

// ServerConfig is the ext_proc listener.
type ServerConfig struct {
	Address string `yaml:"address"`
	Port    int    `yaml:"port"`
	// SocketPath, when set, is a Unix socket the kernel serves ext_proc on instead of
	// Address:Port: Envoy in the same pod reaches it with a pipe address.
	SocketPath string `yaml:"socket_path"`
	// SocketMode is the octal mode of SocketPath ("0600" by default); "0660" lets an Envoy
	// that runs as another user but shares the kernel's group connect.
	SocketMode           string `yaml:"socket_mode"`
	MaxConcurrentStreams uint32 `yaml:"max_concurrent_streams"`
	// StreamWorkers is how many goroutines serve Envoy's streams and keep the stacks they
	// grew; a stream that finds none idle gets a goroutine of its own.
	StreamWorkers uint32 `yaml:"stream_workers"`
	// MessageTimeoutMS is Envoy's message_timeout for this filter; the kernel answers every
	// message within it, whatever the agent does.
	MessageTimeoutMS int `yaml:"message_timeout_ms"`
	// MaxBodySizeBytes caps a body the kernel asks Envoy for (Envoy's buffer limit).
	MaxBodySizeBytes int `yaml:"max_body_size_bytes"`
	// DrainDelayMS is how long the kernel keeps accepting new streams after SIGTERM while
	// reporting not ready, so that load balancers and Envoy's health checks notice first.
	DrainDelayMS int `yaml:"drain_delay_ms"`
	// ShutdownTimeoutMS is how long streams still open after the drain delay may take to
	// finish before they are cut.
	ShutdownTimeoutMS int `yaml:"shutdown_timeout_ms"`
	// StatusOnError is the HTTP status of a request denied because the kernel could not
	// decide (agent down, invalid route, invalid agent reply).
	StatusOnError int `yaml:"status_on_error"`
	// MaxConnections caps the connections open at once on the ext_proc port; one past it is
	// closed as soon as it is accepted.
	MaxConnections int `yaml:"max_connections"`
	// StreamIdleTimeoutMS ends an ext_proc stream that has received no message for that long
	// (a stream legitimately waits between the request and the response phase for as long as
	// the upstream takes); -1 turns the limit off.
	StreamIdleTimeoutMS int `yaml:"stream_idle_timeout_ms"`
	// TLS serves the ext_proc port over TLS, with client certificates when asked.
	TLS TLSConfig `yaml:"tls"`
}

// TLSConfig is the ext_proc listener's TLS. The files are read again when they change.
type TLSConfig struct {
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// ClientCAFile holds the CA certificates that client certificates must chain to.
	ClientCAFile string `yaml:"client_ca_file"`
	// RequireClientCert refuses a connection without a valid client certificate (mTLS).
	RequireClientCert bool `yaml:"require_client_cert"`
}

// Enabled reports whether the listener serves TLS.
func (t TLSConfig) Enabled() bool { return t.CertFile != "" }

// AgentConfig is one policy-agent.
type AgentConfig struct {
	Name                  string      `yaml:"name" required:"true"`
	SocketPath            string      `yaml:"socket_path" required:"true"`
	TimeoutMS             int         `yaml:"timeout_ms"`
	Retry                 RetryConfig `yaml:"retry"`
	HealthCheckIntervalMS int         `yaml:"health_check_interval_ms"`
	// FailOpen lets requests through when the agent is unavailable or times out.
	FailOpen bool `yaml:"fail_open"`
	// Connections is the number of connections kept open to the agent.
	Connections int `yaml:"connections"`
}

// RetryConfig bounds the retries of an agent call that never reached the agent.
type RetryConfig struct {
	MaxAttempts int `yaml:"max_attempts"`
	BackoffMS   int `yaml:"backoff_ms"`
}

// RoutePolicy is one route's chains.
type RoutePolicy struct {
	RouteName string `yaml:"route_name" required:"true"`
	// Agent names the agent that runs the chains; default: the first agent.
	Agent string `yaml:"agent"`
	// Mode "shadow" puts every entry of the route's chains in shadow.
	Mode                string       `yaml:"mode"`
	RequestPolicyChain  []ChainEntry `yaml:"request_policy_chain"`
	ResponsePolicyChain []ChainEntry `yaml:"response_policy_chain"`
}

// ChainPair is the default policy's chains.
type ChainPair struct {
	Agent string `yaml:"agent"`
	// Mode "shadow" puts every entry of the default chains in shadow.
	Mode                string       `yaml:"mode"`
	RequestPolicyChain  []ChainEntry `yaml:"request_policy_chain"`
	ResponsePolicyChain []ChainEntry `yaml:"response_policy_chain"`
}

// ChainEntry is one policy of a chain.
type ChainEntry struct {
	Policy    string            `yaml:"policy" required:"true"`
	Metadata  yamlconf.Metadata `yaml:"metadata"`
	OnFailure string            `yaml:"on_failure"`
	// Mode is "enforce" (the default) or "shadow": the entry runs, and what it would have
	// refused is counted and logged by the agent, but nothing it decides is enforced.
	Mode string `yaml:"mode"`
	// When is a CEL condition over the request and the state of earlier entries
	// (internal/cond): the entry runs only when it is true. Empty: always.
	When string `yaml:"when"`
	// Cache reuses the entry's result for requests with the same key (cachecfg.go).
	Cache *CacheConfig `yaml:"cache"`
}

// Chain entry modes.
const (
	ModeEnforce = "enforce"
	ModeShadow  = "shadow"
)

// ObservabilityConfig sets metrics, logs and tracing.
type ObservabilityConfig struct {
	MetricsPort int `yaml:"metrics_port"`
	// MetricsAddress is the address the metrics port binds to; default 0.0.0.0.
	MetricsAddress string `yaml:"metrics_address"`
	// AdminPort serves /config, /debug/explain and /debug/pprof/; -1 turns it off.
	AdminPort int `yaml:"admin_port"`
	// AdminAddress is the address the admin port binds to; default 127.0.0.1: what it tells
	// (the config, every request's trace, profiles) is for the host or the pod, not the
	// network. It is bound, not filtered by peer address: under a service mesh, traffic
	// from outside reaches the pod from a loopback address too.
	AdminAddress string `yaml:"admin_address"`
	LogLevel     string `yaml:"log_level"`
	// PprofEnabled serves /debug/pprof/ on the admin port; nil means false.
	PprofEnabled *bool         `yaml:"pprof_enabled"`
	Tracing      TracingConfig `yaml:"tracing"`
}

// TracingConfig sets OpenTelemetry tracing.
type TracingConfig = tracing.Config

// Defaults of the kernel config.
const (
	DefaultAddress               = "127.0.0.1"
	DefaultPort                  = 9001
	DefaultMaxConnections        = 1024
	DefaultStreamIdleTimeoutMS   = 300000
	DefaultMaxConcurrentStreams  = 1000
	DefaultStreamWorkers         = 256
	MaxStreamWorkers             = 65536
	DefaultMessageTimeoutMS      = 200
	DefaultMaxBodySizeBytes      = 1 << 20
	DefaultAgentTimeoutMS        = 150
	MaxAgentTimeoutMS            = 5000
	DefaultHealthCheckIntervalMS = 5000
	DefaultBackoffMS             = 10
	DefaultConnections           = 2
	DefaultStatusOnError         = 500
	DefaultMetricsPort           = 9090
	DefaultAdminPort             = 9190
	DefaultAdminAddress          = "127.0.0.1"
	DefaultShutdownTimeoutMS     = 10000
	DefaultSocketMode            = "0600"
)

// ParseSocketMode reads an octal socket mode such as "0660". The owner must be able to read and
// write (the kernel checks that a socket in its place is not in use by connecting to it), and
// other users get nothing: a process that can connect can ask the kernel to judge requests, and
// learns the policies' answers. Share the socket with Envoy through a group.
func ParseSocketMode(s string) (fs.FileMode, error) {
	v, err := strconv.ParseUint(s, 8, 32)
	if err != nil || len(s) > 4 {
		return 0, fmt.Errorf("must be an octal mode such as \"0660\", got %q", s)
	}
	m := fs.FileMode(v)
	switch {
	case m&^fs.ModePerm != 0:
		return 0, fmt.Errorf("must be an octal mode such as \"0660\", got %q", s)
	case m&0o600 != 0o600:
		return 0, fmt.Errorf("must let the owner read and write (0600), got %q", s)
	case m&0o007 != 0:
		return 0, fmt.Errorf("must give other users no access (share the socket through a group, e.g. \"0660\"), got %q", s)
	}
	return m, nil
}

// kernelSchema is the JSON schema every kernel config is checked against.
var kernelSchema = sync.OnceValue(func() *yamlconf.Schema {
	return yamlconf.MustCompileSchema("kernel-config.schema.json", config.KernelSchema)
})

// LoadConfig reads, decodes and validates a kernel config file.
func LoadConfig(path string) (*Config, []byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("read kernel config: %w", err)
	}
	cfg, err := ParseConfig(path, data)
	return cfg, data, err
}

// ParseConfig decodes and validates a kernel config; file names the source in errors. Every
// problem is reported at once, each as file:line: key: message, checked by the rules below and
// by the JSON schema config/schema/kernel-config.schema.json.
func ParseConfig(file string, data []byte) (*Config, error) {
	var cfg Config
	probs, err := yamlconf.DecodeWithSchema(file, data, &cfg, kernelSchema())
	if err != nil {
		return nil, err
	}
	k := cfg.PolicyKernel
	bad := func(key, format string, args ...any) {
		probs.Addf("policy_kernel."+key, format, args...)
	}
	s := &k.Server
	if s.Address == "" {
		s.Address = DefaultAddress
	}
	if s.Port == 0 {
		s.Port = DefaultPort
	}
	if s.Port < 0 || s.Port > 65535 {
		bad("server.port", "must be from 0 to 65535, got %d", s.Port)
	}
	if s.SocketMode == "" {
		s.SocketMode = DefaultSocketMode
	}
	if _, err := ParseSocketMode(s.SocketMode); err != nil {
		bad("server.socket_mode", "%v", err)
	}
	if s.MaxConcurrentStreams == 0 {
		s.MaxConcurrentStreams = DefaultMaxConcurrentStreams
	}
	if s.StreamWorkers == 0 {
		s.StreamWorkers = DefaultStreamWorkers
	}
	if s.StreamWorkers > MaxStreamWorkers {
		bad("server.stream_workers", "must be at most %d, got %d", MaxStreamWorkers, s.StreamWorkers)
	}
	if s.MessageTimeoutMS == 0 {
		s.MessageTimeoutMS = DefaultMessageTimeoutMS
	}
	if s.MessageTimeoutMS < 0 {
		bad("server.message_timeout_ms", "must be positive, got %d", s.MessageTimeoutMS)
	}
	if s.MaxBodySizeBytes == 0 {
		s.MaxBodySizeBytes = DefaultMaxBodySizeBytes
	}
	if s.MaxBodySizeBytes < 0 {
		bad("server.max_body_size_bytes", "must be positive, got %d", s.MaxBodySizeBytes)
	}
	if s.DrainDelayMS < 0 {
		bad("server.drain_delay_ms", "must not be negative, got %d", s.DrainDelayMS)
	}
	if s.ShutdownTimeoutMS == 0 {
		s.ShutdownTimeoutMS = DefaultShutdownTimeoutMS
	}
	if s.ShutdownTimeoutMS < 0 {
		bad("server.shutdown_timeout_ms", "must not be negative, got %d", s.ShutdownTimeoutMS)
	}
	if s.StatusOnError == 0 {
		s.StatusOnError = DefaultStatusOnError
	}
	if s.StatusOnError < 200 || s.StatusOnError > 599 {
		bad("server.status_on_error", "must be an HTTP status from 200 to 599, got %d", s.StatusOnError)
	}
	if s.MaxConnections == 0 {
		s.MaxConnections = DefaultMaxConnections
	}
	if s.MaxConnections < 0 {
		bad("server.max_connections", "must be positive, got %d", s.MaxConnections)
	}
	if s.StreamIdleTimeoutMS == 0 {
		s.StreamIdleTimeoutMS = DefaultStreamIdleTimeoutMS
	}
	if s.StreamIdleTimeoutMS > 0 && s.StreamIdleTimeoutMS <= s.MessageTimeoutMS {
		bad("server.stream_idle_timeout_ms", "must be longer than server.message_timeout_ms (%d), got %d", s.MessageTimeoutMS, s.StreamIdleTimeoutMS)
	}
	if s.StreamIdleTimeoutMS < -1 {
		bad("server.stream_idle_timeout_ms", "must be positive, or -1 to turn the limit off, got %d", s.StreamIdleTimeoutMS)
	}
	if t := s.TLS; t.CertFile != "" || t.KeyFile != "" || t.ClientCAFile != "" || t.RequireClientCert {
		if t.CertFile == "" {
			bad("server.tls.cert_file", "required when server.tls is set")
		}
		if t.KeyFile == "" {
			bad("server.tls.key_file", "required when server.tls is set")
		}
		if t.RequireClientCert && t.ClientCAFile == "" {
			bad("server.tls.client_ca_file", "required when require_client_cert is true: client certificates are checked against it")
		}
	}

	if len(k.Agents) == 0 {
		bad("agents", "at least one agent is required")
	}
	agents := map[string]bool{}
	for i := range k.Agents {
		a := &k.Agents[i]
		key := fmt.Sprintf("agents[%d]", i)
		if a.Name == "" {
			bad(key+".name", "must not be empty")
		} else if agents[a.Name] {
			bad(key+".name", "duplicate agent name %q", a.Name)
		}
		agents[a.Name] = true
		if a.SocketPath == "" {
			bad(key+".socket_path", "must not be empty")
		}
		if a.TimeoutMS == 0 {
			a.TimeoutMS = DefaultAgentTimeoutMS
		}
		if a.TimeoutMS < 0 || a.TimeoutMS > MaxAgentTimeoutMS {
			bad(key+".timeout_ms", "must be from 1 to %d, got %d", MaxAgentTimeoutMS, a.TimeoutMS)
		}
		if a.Retry.MaxAttempts == 0 {
			a.Retry.MaxAttempts = 1
		}
		if a.Retry.MaxAttempts < 0 || a.Retry.MaxAttempts > 10 {
			bad(key+".retry.max_attempts", "must be from 1 to 10, got %d", a.Retry.MaxAttempts)
		}
		if a.Retry.BackoffMS == 0 {
			a.Retry.BackoffMS = DefaultBackoffMS
		}
		if a.Retry.BackoffMS < 0 {
			bad(key+".retry.backoff_ms", "must not be negative, got %d", a.Retry.BackoffMS)
		}
		if a.HealthCheckIntervalMS == 0 {
			a.HealthCheckIntervalMS = DefaultHealthCheckIntervalMS
		}
		if a.HealthCheckIntervalMS < 0 {
			bad(key+".health_check_interval_ms", "must be positive, got %d", a.HealthCheckIntervalMS)
		}
		if a.Connections == 0 {
			a.Connections = DefaultConnections
		}
		if a.Connections < 0 || a.Connections > 64 {
			bad(key+".connections", "must be from 1 to 64, got %d", a.Connections)
		}
	}

	routes := map[string]bool{}
	for i := range k.RoutePolicies {
		r := &k.RoutePolicies[i]
		key := fmt.Sprintf("route_policies[%d]", i)
		if r.RouteName == "" {
			bad(key+".route_name", "must not be empty")
		} else if routes[r.RouteName] {
			bad(key+".route_name", "duplicate route %q", r.RouteName)
		}
		routes[r.RouteName] = true
		if r.Agent != "" && !agents[r.Agent] {
			bad(key+".agent", "no agent named %q", r.Agent)
		}
		checkMode(bad, key+".mode", r.Mode)
		checkChain(bad, key+".request_policy_chain", r.RequestPolicyChain)
		checkChain(bad, key+".response_policy_chain", r.ResponsePolicyChain)
		k.compileConditions(bad, key+".request_policy_chain", r.RequestPolicyChain, false)
		k.compileConditions(bad, key+".response_policy_chain", r.ResponsePolicyChain, true)
	}
	if d := k.DefaultPolicy; d != nil {
		if d.Agent != "" && !agents[d.Agent] {
			bad("default_policy.agent", "no agent named %q", d.Agent)
		}
		checkMode(bad, "default_policy.mode", d.Mode)
		checkChain(bad, "default_policy.request_policy_chain", d.RequestPolicyChain)
		checkChain(bad, "default_policy.response_policy_chain", d.ResponsePolicyChain)
		k.compileConditions(bad, "default_policy.request_policy_chain", d.RequestPolicyChain, false)
		k.compileConditions(bad, "default_policy.response_policy_chain", d.ResponsePolicyChain, true)
	}

	o := &k.Observability
	if o.MetricsPort == 0 {
		o.MetricsPort = DefaultMetricsPort
	}
	if o.MetricsPort < -1 || o.MetricsPort > 65535 {
		bad("observability.metrics_port", "must be from 0 to 65535, or -1 to turn it off, got %d", o.MetricsPort)
	}
	if o.MetricsAddress == "" {
		o.MetricsAddress = "0.0.0.0"
	}
	if o.AdminPort == 0 {
		o.AdminPort = DefaultAdminPort
	}
	if o.AdminPort < -1 || o.AdminPort > 65535 {
		bad("observability.admin_port", "must be from 0 to 65535, or -1 to turn it off, got %d", o.AdminPort)
	}
	if o.AdminAddress == "" {
		o.AdminAddress = DefaultAdminAddress
	}
	if o.AdminPort > 0 && o.MetricsPort > 0 && o.AdminPort == o.MetricsPort {
		bad("observability.admin_port", "must differ from metrics_port (%d): the admin listener is a listener of its own", o.MetricsPort)
	}
	if _, err := logging.ParseLevel(o.LogLevel); err != nil {
		bad("observability.log_level", "%v", err)
	}
	if r := o.Tracing.Rate(); r < 0 || r > 1 {
		bad("observability.tracing.sampling_rate", "must be from 0 to 1, got %g", r)
	}
	if o.Tracing.Enabled && o.Tracing.Endpoint == "" {
		bad("observability.tracing.endpoint", "required when tracing is enabled")
	}
	if err := probs.Err(); err != nil {
		return nil, err
	}
	return &cfg, nil
}

func checkChain(bad func(key, format string, args ...any), key string, chain []ChainEntry) {
	for i, e := range chain {
		k := fmt.Sprintf("%s[%d]", key, i)
		if e.Policy == "" {
			bad(k+".policy", "must not be empty")
		}
		switch e.OnFailure {
		case "", "deny", "continue", "skip_remaining":
		default:
			bad(k+".on_failure", "must be deny, continue or skip_remaining, got %q", e.OnFailure)
		}
		checkMode(bad, k+".mode", e.Mode)
		checkCache(bad, k+".cache", e.Cache)
	}
}

// compileConditions compiles the when conditions of a chain's entries, each distinct source
// once per config: a condition that does not compile is a problem at its entry's when key,
// with the compiler's message, and so is one of a request chain that reads the response.
func (k *KernelConfig) compileConditions(bad func(key, format string, args ...any), key string, chain []ChainEntry, response bool) {
	for i, e := range chain {
		if e.When == "" {
			continue
		}
		x, done := k.conds[e.When]
		if !done {
			var err error
			if x, err = cond.CompileCondition(e.When); err != nil {
				bad(fmt.Sprintf("%s[%d].when", key, i), "invalid condition: %v", err)
				continue
			}
		}
		if !response && x.ReadsResponse() {
			bad(fmt.Sprintf("%s[%d].when", key, i), "invalid condition: response.code and response.headers are only known in a response_policy_chain")
			continue
		}
		if done {
			continue
		}
		if k.conds == nil {
			k.conds = map[string]*cond.Expr{}
		}
		k.conds[e.When] = x
	}
}

// condition returns the compiled when condition src; one compiled now when the config was not
// made by ParseConfig (nil and the error when it does not compile).
func (k *KernelConfig) condition(src string) (*cond.Expr, error) {
	if x, ok := k.conds[src]; ok {
		return x, nil
	}
	return cond.CompileCondition(src)
}

func checkMode(bad func(key, format string, args ...any), key, mode string) {
	switch mode {
	case "", ModeEnforce, ModeShadow:
	default:
		bad(key, "must be enforce or shadow, got %q", mode)
	}
}
