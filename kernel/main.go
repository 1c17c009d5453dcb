// Package kernel is the policy-kernel: Envoy's ext_proc server. For every HTTP request it picks
// the route's policy chains from an immutable config snapshot, asks a policy-agent to run them,
// and turns the agent's instructions into ext_proc header and body mutations or immediate
// responses.
package kernel

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/VictoriaMetrics/metrics"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/obs"
)

// DefaultConfigPath is where the container keeps the kernel's config.
const DefaultConfigPath = "/etc/policy-engine/kernel-config.yaml"

type flags struct {
	config    string
	validate  bool
	listen    string
	metrics   string
	agentWait time.Duration
}

func parseFlags(args []string, stderr io.Writer) (*flags, error) {
	fs := flag.NewFlagSet("policy-kernel", flag.ContinueOnError)
	fs.SetOutput(stderr)
	f := &flags{}
	fs.StringVar(&f.config, "config", DefaultConfigPath, "path of the kernel config file")
	fs.BoolVar(&f.validate, "validate", false, "check the config (and, when reachable, every chain against its agent) and exit: 0 if valid, 1 if not")
	fs.StringVar(&f.listen, "listen", "", "ext_proc listen address host:port (overrides server.address and server.port)")
	fs.StringVar(&f.metrics, "metrics-listen", "", "metrics listen address host:port (overrides observability.metrics_address and metrics_port)")
	fs.DurationVar(&f.agentWait, "agent-wait", 10*time.Second, "how long to wait at start for the agents to answer GetAgentConfig")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	var errs []error
	if fs.NArg() > 0 {
		errs = append(errs, fmt.Errorf("unexpected arguments: %q", fs.Args()))
	}
	if f.config == "" {
		errs = append(errs, errors.New("-config must not be empty"))
	}
	if f.agentWait < 0 {
		errs = append(errs, errors.New("-agent-wait must not be negative"))
	}
	return f, errors.Join(errs...)
}

// Kernel is a running kernel: its server, its agents and its current snapshot.
type Kernel struct {
	flags   *flags
	log     *logging.Logger
	metrics *kernelMetrics
	server  *Server
	pool    *agentPool

	mu      sync.Mutex // serialises snapshot builds (reloads and agent rediscovery)
	current []byte     // bytes of the config in force
	// stopping turns readiness off once SIGTERM arrives.
	stopping atomic.Bool
}

// Main runs the kernel until ctx is cancelled. cmd/policy-kernel turns SIGTERM and SIGINT into
// that cancellation; SIGHUP (config reload) is handled here.
func Main(ctx context.Context, args []string, stderr io.Writer) error {
	f, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	cfg, data, err := LoadConfig(f.config)
	if err != nil {
		return err
	}
	kc := cfg.PolicyKernel
	level, _ := logging.ParseLevel(kc.Observability.LogLevel)
	log := logging.New(stderr, "kernel", level)
	m := newKernelMetrics()
	k := &Kernel{
		flags:   f,
		log:     log,
		metrics: m,
		server:  NewServer(log, m),
		pool:    &agentPool{byName: map[string]*agentState{}, maxMsg: grpcMsgLimit(kc), metrics: m},
	}
	defer k.pool.closeAll()
	m.registerStreams(k.server)
	m.markReloaded()
	agents, err := k.pool.agentsFor(kc)
	if err != nil {
		return err
	}
	k.pool.commit(agents, 0)
	k.discover(ctx, agents, f.agentWait)
	snap := buildSnapshot(kc, configVersion(kc.Version, data), agents, m)
	if f.validate {
		return validateReport(stderr, f.config, snap)
	}
	k.install(snap, data)

	addr := net.JoinHostPort(kc.Server.Address, strconv.Itoa(kc.Server.Port))
	if f.listen != "" {
		addr = f.listen
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen on %q: %w", addr, err)
	}
	srv := grpc.NewServer(
		grpc.MaxConcurrentStreams(kc.Server.MaxConcurrentStreams),
		grpc.MaxRecvMsgSize(grpcMsgLimit(kc)),
		grpc.MaxSendMsgSize(grpcMsgLimit(kc)),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	)
	extprocv3.RegisterExternalProcessorServer(srv, k.server)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus(extprocv3.ExternalProcessor_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)

	var httpSrv *obs.Server
	if maddr := metricsAddr(f, kc); maddr != "" {
		pprofOn := kc.Observability.PprofEnabled == nil || *kc.Observability.PprofEnabled
		httpSrv, err = obs.Listen(maddr, obs.Handler(obs.Options{
			Sets:           func() []*metrics.Set { return []*metrics.Set{m.set} },
			Ready:          k.readiness,
			Pprof:          pprofOn,
			ProcessMetrics: true,
			Families:       Families,
		}))
		if err != nil {
			ln.Close()
			return fmt.Errorf("listen on metrics address %q: %w", maddr, err)
		}
		defer httpSrv.Close()
	}

	hctx, stopHealth := context.WithCancel(ctx)
	defer stopHealth()
	go k.healthLoop(hctx)

	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	log.Info().Str("address", ln.Addr().String()).Str("config_version", snap.Version).
		Int("routes", snap.routes.Len()).Msg("policy-kernel serving")

	for {
		select {
		case <-hup:
			k.reload()
		case err := <-serveErr:
			return fmt.Errorf("grpc server: %w", err)
		case <-ctx.Done():
			k.shutdown(srv, hs)
			return nil
		}
	}
}

// grpcMsgLimit sizes gRPC messages to the body cap plus room for headers, so a body Envoy is
// allowed to buffer always fits and nothing larger does.
func grpcMsgLimit(kc *KernelConfig) int { return kc.Server.MaxBodySizeBytes + 1<<20 }

func metricsAddr(f *flags, kc *KernelConfig) string {
	if f.metrics != "" {
		return f.metrics
	}
	if kc.Observability.MetricsPort < 0 {
		return ""
	}
	return net.JoinHostPort(kc.Observability.MetricsAddress, strconv.Itoa(kc.Observability.MetricsPort))
}

// install makes snap current.
func (k *Kernel) install(snap *Snapshot, data []byte) {
	k.server.Store(snap)
	k.current = data
	k.metrics.setInfo(snap.Version)
	for _, inv := range snap.invalid {
		k.log.Error().Str("config_version", snap.Version).Str("error", inv).Msg("route marked invalid; its requests are denied")
	}
}

// discover asks every agent for its config, waiting up to wait for agents that are still
// starting. Agents that do not answer are retried by the health loop.
func (k *Kernel) discover(ctx context.Context, agents map[string]*agentState, wait time.Duration) {
	deadline := time.Now().Add(wait)
	var wg sync.WaitGroup
	for _, a := range agents {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				qctx, cancel := context.WithTimeout(ctx, time.Second)
				info, err := a.client.GetAgentConfig(qctx)
				cancel()
				if err == nil {
					a.info.Store(info)
					a.healthy.Store(true)
					a.metrics.healthVal.Store(1)
					return
				}
				if time.Now().After(deadline) || ctx.Err() != nil {
					k.log.Warn().Str("agent", a.cfg.Name).Str("error", err.Error()).Msg("agent did not answer GetAgentConfig; its routes are checked when it does")
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
}

// reload re-reads the config file and swaps in a new snapshot when the file changed and is
// valid; otherwise the current snapshot stays and the failure is counted.
func (k *Kernel) reload() {
	k.mu.Lock()
	defer k.mu.Unlock()
	cfg, data, err := LoadConfig(k.flags.config)
	if err == nil && bytes.Equal(data, k.current) {
		k.log.Info().Msg("config unchanged; reload skipped")
		return
	}
	if err != nil {
		k.metrics.reloadFailure.Inc()
		k.log.Error().Str("error", err.Error()).Msg("config reload failed; keeping the previous config")
		return
	}
	kc := cfg.PolicyKernel
	old := k.server.Snapshot().Config
	if kc.Server.Address != old.Server.Address || kc.Server.Port != old.Server.Port {
		k.log.Warn().Msg("server.address and server.port take effect on restart only")
	}
	agents, err := k.pool.agentsFor(kc)
	if err != nil {
		k.metrics.reloadFailure.Inc()
		k.log.Error().Str("error", err.Error()).Msg("config reload failed; keeping the previous config")
		return
	}
	fresh := map[string]*agentState{}
	for n, a := range agents {
		if a.info.Load() == nil {
			fresh[n] = a
		}
	}
	k.discover(context.Background(), fresh, 2*time.Second)
	snap := buildSnapshot(kc, configVersion(kc.Version, data), agents, k.metrics)
	k.pool.commit(agents, 2*time.Duration(kc.Server.MessageTimeoutMS)*time.Millisecond+time.Second)
	k.install(snap, data)
	if lvl, err := logging.ParseLevel(kc.Observability.LogLevel); err == nil {
		k.log.SetLevel(lvl)
	}
	k.metrics.reloadSuccess.Inc()
	k.metrics.markReloaded()
	k.log.Info().Str("config_version", snap.Version).Msg("config reloaded")
}

// healthLoop checks every agent on its interval, and asks an agent for its config again when it
// was never reached or came back, rebuilding the snapshot when what it advertises changed.
func (k *Kernel) healthLoop(ctx context.Context) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	next := map[string]time.Time{}
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			snap := k.server.Snapshot()
			for name, a := range snap.agents {
				if now.Before(next[name]) {
					continue
				}
				next[name] = now.Add(time.Duration(a.cfg.HealthCheckIntervalMS) * time.Millisecond)
				k.checkAgent(ctx, a)
			}
		}
	}
}

func (k *Kernel) checkAgent(ctx context.Context, a *agentState) {
	cctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	err := a.client.Check(cctx)
	cancel()
	was := a.healthy.Load()
	if err != nil {
		a.healthy.Store(false)
		a.metrics.healthVal.Store(0)
		if was {
			k.log.Warn().Str("agent", a.cfg.Name).Str("error", err.Error()).Msg("agent unhealthy")
		}
		return
	}
	qctx, cancel := context.WithTimeout(ctx, time.Second)
	info, err := a.client.GetAgentConfig(qctx)
	cancel()
	if err != nil {
		return
	}
	a.healthy.Store(true)
	a.metrics.healthVal.Store(1)
	if !was {
		k.log.Info().Str("agent", a.cfg.Name).Msg("agent healthy")
	}
	if prev := a.info.Load(); prev == nil || policySetChanged(prev, info) {
		a.info.Store(info)
		k.rebuild()
	}
}

// rebuild compiles the config in force again, against what the agents advertise now.
func (k *Kernel) rebuild() {
	k.mu.Lock()
	defer k.mu.Unlock()
	cur := k.server.Snapshot()
	snap := buildSnapshot(cur.Config, cur.Version, cur.agents, k.metrics)
	k.install(snap, k.current)
	k.log.Info().Str("config_version", snap.Version).Int("invalid_routes", len(snap.invalid)).Msg("routes checked again against the agents' policies")
}

// readiness is ready when the config is loaded, every agent is healthy, and the kernel is not
// draining.
func (k *Kernel) readiness() (bool, any) {
	snap := k.server.Snapshot()
	type agentInfo struct {
		Healthy bool   `json:"healthy"`
		Version string `json:"version,omitempty"`
	}
	detail := struct {
		Status        string               `json:"status"`
		ConfigVersion string               `json:"config_version"`
		Agents        map[string]agentInfo `json:"agents"`
		InvalidRoutes []string             `json:"invalid_routes,omitempty"`
		Draining      bool                 `json:"draining,omitempty"`
	}{Status: "ready", Agents: map[string]agentInfo{}}
	ready := snap != nil && !k.stopping.Load()
	if snap != nil {
		detail.ConfigVersion = snap.Version
		detail.InvalidRoutes = snap.invalid
		for name, a := range snap.agents {
			h := a.healthy.Load()
			ready = ready && h
			detail.Agents[name] = agentInfo{Healthy: h, Version: a.info.Load().GetAgentVersion()}
		}
	}
	detail.Draining = k.stopping.Load()
	if !ready {
		detail.Status = "not ready"
	}
	return ready, detail
}

// shutdown reports not ready, keeps serving for the drain delay so that Envoy and load
// balancers notice, then refuses new streams and lets open ones finish.
func (k *Kernel) shutdown(srv *grpc.Server, hs *health.Server) {
	snap := k.server.Snapshot()
	k.log.Info().Int("drain_delay_ms", snap.Config.Server.DrainDelayMS).Msg("shutting down: draining")
	hs.Shutdown() // gRPC health reports NOT_SERVING
	k.stopping.Store(true)
	time.Sleep(time.Duration(snap.Config.Server.DrainDelayMS) * time.Millisecond)
	k.server.draining.Store(true)
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		srv.Stop()
	}
	k.log.Info().Msg("stopped")
}

// policySetChanged reports whether an agent now advertises other policies than before.
func policySetChanged(prev, cur *agentv1.GetAgentConfigResponse) bool {
	a, b := prev.GetSupportedPolicies(), cur.GetSupportedPolicies()
	if len(a) != len(b) {
		return true
	}
	for i := range a {
		if !proto.Equal(a[i], b[i]) {
			return true
		}
	}
	return false
}

// validateReport prints every problem of a snapshot and fails when there is one.
func validateReport(w io.Writer, file string, snap *Snapshot) error {
	var unreached []string
	for name, a := range snap.agents {
		if a.info.Load() == nil {
			unreached = append(unreached, name)
		}
	}
	sort.Strings(unreached)
	for _, name := range unreached {
		fmt.Fprintf(w, "%s: agent %q not reachable: its chains were not checked against its policies\n", file, name)
	}
	if len(snap.invalid) > 0 {
		var errs []error
		for _, inv := range snap.invalid {
			errs = append(errs, fmt.Errorf("%s: %s", file, inv))
		}
		return errors.Join(errs...)
	}
	fmt.Fprintf(w, "%s: valid (version %s)\n", file, snap.Version)
	return nil
}

// Version of the kernel binary; set by the linker.
var Version = "dev"
