// Package agent is the policy-agent: a gRPC server on a Unix socket that runs policy chains
// with the policies compiled into the binary.
package agent

import (
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
	"runtime"
	"slices"
	"syscall"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/flowctl"
	"github.com/policy-engine/policy-engine/internal/fsperm"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/obs"
	"github.com/policy-engine/policy-engine/internal/rawio"
	"github.com/policy-engine/policy-engine/internal/tracing"
	"github.com/policy-engine/policy-engine/internal/uds"
)

// DefaultConfigPath is where the container keeps the agent's config.
const DefaultConfigPath = "/etc/policy-engine/agent-config.yaml"

type flags struct {
	config   string
	socket   string
	validate bool
	// watch reloads the config when it or a file it names changes; watchEvery is how often it
	// looks.
	watch      bool
	watchEvery time.Duration
	// version prints the binary's version and exits.
	version bool
}

func parseFlags(args []string, stderr io.Writer) (*flags, error) {
	fs := flag.NewFlagSet("policy-agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	f := &flags{}
	fs.StringVar(&f.config, "config", DefaultConfigPath, "path of the agent config file")
	fs.StringVar(&f.socket, "socket", "", "Unix socket to listen on (overrides agent_core.socket_path)")
	fs.BoolVar(&f.validate, "validate", false, "check the config and exit: 0 if valid, 1 if not")
	fs.BoolVar(&f.watch, "watch-config", true, "reload the config when it or a file it names (secrets, jwks_file) changes, as on SIGHUP")
	fs.DurationVar(&f.watchEvery, "watch-interval", time.Second, "how often -watch-config looks at the files")
	fs.BoolVar(&f.version, "version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	if f.config == "" {
		return nil, errors.New("-config must not be empty")
	}
	if f.watchEvery < 10*time.Millisecond {
		return nil, fmt.Errorf("-watch-interval must be at least 10ms, got %v", f.watchEvery)
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
	if f.version {
		_, err := fmt.Fprintf(stdout, "policy-agent %s (%s %s/%s)\n", Version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
		return err
	}
	// SIGHUP is registered before the first load, so that a reload asked for during start-up
	// is not lost.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	cfg, in, files, err := loadInputs(f.config)
	if err != nil {
		return err
	}
	data := in.data
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
		return locate(f.config, data, err)
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
	// The kernel's connections read and write without waking the runtime's monitor thread.
	ln = rawio.Listener{Listener: ln}
	maxMsg := 2*core.ResourceLimits.MaxBodySizeBytes + 1<<20
	srv := grpc.NewServer(append(flowctl.ServerOptions(),
		grpc.MaxRecvMsgSize(maxMsg),
		grpc.MaxSendMsgSize(maxMsg),
		grpc.MaxConcurrentStreams(uint32(core.Server.MaxConcurrentRequests)),
	)...)
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
			ProcessMetrics: true,
			Families:       Families,
			NoMetrics:      o.MetricsEnabled != nil && !*o.MetricsEnabled,
			Ready:          exec.readiness,
		})
		httpSrv, err := obs.Listen(o.MetricsAddress, h)
		if err != nil {
			ln.Close()
			return fmt.Errorf("listen on metrics address %q: %w", o.MetricsAddress, err)
		}
		defer httpSrv.Close()
	}
	// The admin listener (the config, profiles) is a listener of its own, so that the metrics
	// listener can face Prometheus and the kubelet while this one stays on loopback.
	if o := core.Observability; o.AdminAddress != "" {
		adminSrv, err := obs.Listen(o.AdminAddress, obs.AdminHandler(obs.AdminOptions{
			Config: exec.configDump,
			Pprof:  o.PprofEnabled != nil && *o.PprofEnabled,
		}))
		if err != nil {
			ln.Close()
			return fmt.Errorf("listen on admin address %q: %w", o.AdminAddress, err)
		}
		defer adminSrv.Close()
	}

	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	log.Audit(zerolog.InfoLevel).Str("socket", uds.Path(core.SocketPath)).Str("config_version", version).
		Int("policies", len(exec.Describe().SupportedPolicies)).Msg("policy-agent serving")

	wctx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	w := watchFiles(wctx, f, files)
	// The files chain entries name in their metadata (set by the kernel's config), which no
	// reload of the agent's own config notices: a change drops the entries that name them.
	mw := watchFiles(wctx, f, nil)
	for {
		select {
		case <-exec.MetadataFilesGrew():
			mw.Set(exec.MetadataFiles())
		case changed := <-mw.C():
			exec.DropEntriesNaming(changed)
		case <-hup:
			w.Sync()
			in, files = reloadAgent(f, in, files, exec, log)
			w.Set(files)
		case changed := <-w.C():
			log.Audit(zerolog.InfoLevel).Strs("files", changed).Msg("config file changed; reloading")
			in, files = reloadAgent(f, in, files, exec, log)
			w.Set(files)
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

// reloadAgent re-reads the config file and the files it names, and swaps in a new snapshot
// when any of them changed and the config is valid. It returns the inputs now in force and the
// files to watch: those of the config in force and, after a failure, those the refused config
// names, so that the secret it waited for is noticed when it appears.
func reloadAgent(f *flags, current *inputs, watched []string, exec *Executor, log *logging.Logger) (*inputs, []string) {
	cfg, in, files, err := loadInputs(f.config)
	if err == nil && in.same(current) {
		log.Audit(zerolog.InfoLevel).Str("config_version", exec.snap.Load().version).Msg("config unchanged; reload skipped")
		return current, files
	}
	var data []byte
	var changedFiles []string
	if in != nil {
		data = in.data
		changedFiles = in.changed(current)
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
	tracingChanged := err == nil && (!reflect.DeepEqual(cfg.AgentCore.Observability.Tracing, old.Observability.Tracing) ||
		slices.ContainsFunc(in.tracing, func(p string) bool { return slices.Contains(changedFiles, p) }))
	if tracingChanged {
		if tr, err = tracing.NewLogged(cfg.AgentCore.Observability.Tracing, tracing.Follower, "policy-agent", Version, log); err != nil {
			err = fmt.Errorf("%s: %w", f.config, err)
		}
	}
	if err == nil {
		version = configVersion(cfg.AgentCore.Version, data)
		if err = exec.Load(cfg.AgentCore, version); err != nil {
			err = locate(f.config, data, err)
		}
	}
	if err != nil {
		if tr != nil {
			tr.Close()
		}
		exec.metrics.reloadFailure.Inc()
		log.Audit(zerolog.ErrorLevel).Str("file", f.config).Str("config_version", exec.snap.Load().version).
			Errors("errors", err).Msg("config reload failed; keeping the previous config")
		return current, union(watched, files)
	}
	if tracingChanged {
		go exec.SetTracer(tr).Close()
	}
	if o := cfg.AgentCore.Observability; o.MetricsAddress != old.Observability.MetricsAddress || o.AdminAddress != old.Observability.AdminAddress ||
		!reflect.DeepEqual(o.PprofEnabled, old.Observability.PprofEnabled) || !reflect.DeepEqual(o.MetricsEnabled, old.Observability.MetricsEnabled) {
		log.Audit(zerolog.WarnLevel).Msg("observability.metrics_address, admin_address, metrics_enabled and pprof_enabled take effect on restart only")
	}
	if lvl, lerr := logging.ParseLevel(cfg.AgentCore.Observability.LogLevel); lerr == nil {
		log.SetLevel(lvl)
	}
	exec.metrics.reloadSuccess.Inc()
	exec.metrics.loaded(version)
	ev := log.Audit(zerolog.InfoLevel).Str("config_version", version)
	if len(changedFiles) > 0 {
		ev = ev.Strs("files_changed", changedFiles)
	}
	ev.Msg("config reloaded")
	return in, files
}

// stdout is where --version writes.
var stdout io.Writer = os.Stdout
