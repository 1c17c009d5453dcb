// Package agent is the policy-agent: a gRPC server on a Unix socket that runs policy chains
// with the policies compiled into the binary.
package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"reflect"
	"syscall"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/fsperm"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/obs"
	"github.com/policy-engine/policy-engine/internal/tracing"
	"github.com/policy-engine/policy-engine/internal/uds"
)

// DefaultConfigPath is where the container keeps the agent's config.
const DefaultConfigPath = "/etc/policy-engine/agent-config.yaml"

type flags struct {
	config   string
	socket   string
	validate bool
}

func parseFlags(args []string, stderr io.Writer) (*flags, error) {
	fs := flag.NewFlagSet("policy-agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	f := &flags{}
	fs.StringVar(&f.config, "config", DefaultConfigPath, "path of the agent config file")
	fs.StringVar(&f.socket, "socket", "", "Unix socket to listen on (overrides agent_core.socket_path)")
	fs.BoolVar(&f.validate, "validate", false, "check the config and exit: 0 if valid, 1 if not")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	if f.config == "" {
		return nil, errors.New("-config must not be empty")
	}
	return f, nil
}

// configVersion is the version shown for a config: its user-set version, if any, and a hash
// of its bytes.
func configVersion(user string, data []byte) string {
	sum := sha256.Sum256(data)
	h := hex.EncodeToString(sum[:6])
	if user != "" {
		return user + "-" + h
	}
	return h
}

// Main runs the agent until ctx is cancelled; it is the whole process but for signal handling
// of SIGTERM/SIGINT, which cancel ctx.
func Main(ctx context.Context, args []string, stderr io.Writer) error {
	f, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	// SIGHUP is registered before the first load, so that a reload asked for during start-up
	// is not lost.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	cfg, data, err := LoadConfig(f.config)
	if err != nil {
		return err
	}
	core := cfg.AgentCore
	if f.socket != "" {
		core.SocketPath = f.socket
	}
	// A config or socket directory that any user could write to is refused at start-up too.
	permErr := errors.Join(fsperm.CheckConfig(f.config), fsperm.CheckSocket(uds.Path(core.SocketPath)))
	if permErr != nil && !f.validate {
		return permErr
	}
	level, _ := logging.ParseLevel(core.Observability.LogLevel)
	log := logging.New(stderr, "agent", level)
	exec := NewExecutor(log)
	version := configVersion(core.Version, data)
	if err := exec.Load(core, version); err != nil {
		return fmt.Errorf("%s: %w", f.config, err)
	}
	defer exec.Close()
	if f.validate {
		if permErr != nil {
			return permErr
		}
		fmt.Fprintf(stderr, "%s: valid (version %s)\n", f.config, version)
		return nil
	}
	exec.metrics.loaded(version)
	var names []string
	for _, m := range policy.Modules() {
		names = append(names, m.Name)
	}
	exec.metrics.precreate(names)
	tr, err := tracing.NewLogged(core.Observability.Tracing, tracing.Follower, "policy-agent", Version, log)
	if err != nil {
		return fmt.Errorf("%s: %w", f.config, err)
	}
	exec.SetTracer(tr)
	defer func() { exec.SetTracer(nil).Close() }()

	ln, err := uds.Listen(core.SocketPath)
	if err != nil {
		return fmt.Errorf("listen on %q: %w", core.SocketPath, err)
	}
	maxMsg := 2*core.ResourceLimits.MaxBodySizeBytes + 1<<20
	srv := grpc.NewServer(
		grpc.MaxRecvMsgSize(maxMsg),
		grpc.MaxSendMsgSize(maxMsg),
		grpc.MaxConcurrentStreams(uint32(core.Server.MaxConcurrentRequests)),
	)
	svc := newService(exec, core.Server.MaxConcurrentRequests)
	defer svc.stop()
	agentv1.RegisterPolicyAgentServer(srv, svc)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus(agentv1.PolicyAgent_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)

	if core.Observability.MetricsAddress != "" {
		o := core.Observability
		h := obs.Handler(obs.Options{
			Sets:           func() []*metrics.Set { return []*metrics.Set{exec.metrics.Set()} },
			Pprof:          o.PprofEnabled != nil && *o.PprofEnabled,
			ProcessMetrics: true,
			Families:       Families,
			NoMetrics:      o.MetricsEnabled != nil && !*o.MetricsEnabled,
			Ready:          exec.readiness,
			Config:         exec.configDump,
		})
		httpSrv, err := obs.Listen(o.MetricsAddress, h)
		if err != nil {
			ln.Close()
			return fmt.Errorf("listen on metrics address %q: %w", o.MetricsAddress, err)
		}
		defer httpSrv.Close()
	}

	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	log.Audit(zerolog.InfoLevel).Str("socket", uds.Path(core.SocketPath)).Str("config_version", version).
		Int("policies", len(exec.Describe().SupportedPolicies)).Msg("policy-agent serving")

	for {
		select {
		case <-hup:
			data = reloadAgent(f, data, exec, log)
		case err := <-serveErr:
			return fmt.Errorf("grpc server: %w", err)
		case <-ctx.Done():
			timeout := time.Duration(exec.snap.Load().cfg.Server.RequestTimeoutMS) * time.Millisecond
			log.Info().Int64("request_timeout_ms", timeout.Milliseconds()).Msg("shutting down: finishing the calls in flight")
			hs.Shutdown()
			svc.beginDrain()
			stopped := make(chan struct{})
			go func() { srv.GracefulStop(); close(stopped) }()
			select {
			case <-stopped:
			case <-time.After(timeout):
				srv.Stop()
			}
			log.Info().Msg("stopped")
			return nil
		}
	}
}

// readiness is ready when a config is loaded and every policy that depends on something
// outside (a Redis server) can reach it.
func (e *Executor) readiness() (bool, any) {
	type detail struct {
		Status        string `json:"status"`
		ConfigVersion string `json:"config_version"`
		Error         string `json:"error,omitempty"`
	}
	d := detail{Status: "ready"}
	if s := e.snap.Load(); s != nil {
		d.ConfigVersion = s.version
	}
	hctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := e.HealthCheck(hctx); err != nil {
		d.Status, d.Error = "not ready", err.Error()
		return false, d
	}
	return true, d
}

// reloadAgent re-reads the config file and swaps in a new snapshot when it changed and is
// valid. It returns the bytes now in force.
func reloadAgent(f *flags, current []byte, exec *Executor, log *logging.Logger) []byte {
	cfg, data, err := LoadConfig(f.config)
	if err == nil && bytes.Equal(data, current) {
		log.Audit(zerolog.InfoLevel).Str("config_version", exec.snap.Load().version).Msg("config unchanged; reload skipped")
		return current
	}
	var version string
	var tr *tracing.Tracer
	old := exec.snap.Load().cfg
	if err == nil {
		if f.socket != "" {
			cfg.AgentCore.SocketPath = f.socket
		}
		if cfg.AgentCore.SocketPath != old.SocketPath {
			err = fmt.Errorf("%s: agent_core.socket_path: cannot change on reload (from %q to %q); restart the agent", f.config, old.SocketPath, cfg.AgentCore.SocketPath)
		}
	}
	tracingChanged := err == nil && !reflect.DeepEqual(cfg.AgentCore.Observability.Tracing, old.Observability.Tracing)
	if tracingChanged {
		if tr, err = tracing.NewLogged(cfg.AgentCore.Observability.Tracing, tracing.Follower, "policy-agent", Version, log); err != nil {
			err = fmt.Errorf("%s: %w", f.config, err)
		}
	}
	if err == nil {
		version = configVersion(cfg.AgentCore.Version, data)
		if err = exec.Load(cfg.AgentCore, version); err != nil {
			err = fmt.Errorf("%s: %w", f.config, err)
		}
	}
	if err != nil {
		if tr != nil {
			tr.Close()
		}
		exec.metrics.reloadFailure.Inc()
		log.Audit(zerolog.ErrorLevel).Str("file", f.config).Str("config_version", exec.snap.Load().version).
			Errors("errors", err).Msg("config reload failed; keeping the previous config")
		return current
	}
	if tracingChanged {
		go exec.SetTracer(tr).Close()
	}
	if o := cfg.AgentCore.Observability; o.MetricsAddress != old.Observability.MetricsAddress ||
		!reflect.DeepEqual(o.PprofEnabled, old.Observability.PprofEnabled) || !reflect.DeepEqual(o.MetricsEnabled, old.Observability.MetricsEnabled) {
		log.Audit(zerolog.WarnLevel).Msg("observability.metrics_address, metrics_enabled and pprof_enabled take effect on restart only")
	}
	if lvl, lerr := logging.ParseLevel(cfg.AgentCore.Observability.LogLevel); lerr == nil {
		log.SetLevel(lvl)
	}
	exec.metrics.reloadSuccess.Inc()
	exec.metrics.loaded(version)
	log.Audit(zerolog.InfoLevel).Str("config_version", version).Msg("config reloaded")
	return data
}
