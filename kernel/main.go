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
	"maps"
	"net"
	"os"
	"os/signal"
	"reflect"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/VictoriaMetrics/metrics"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/flowctl"
	"github.com/policy-engine/policy-engine/internal/fsperm"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/obs"
	"github.com/policy-engine/policy-engine/internal/tracing"
	"github.com/policy-engine/policy-engine/internal/watch"
	"github.com/policy-engine/policy-engine/internal/yamlconf"
)

// DefaultConfigPath is where the container keeps the kernel's config.
const DefaultConfigPath = "/etc/policy-engine/kernel-config.yaml"

type flags struct {
	config    string
	validate  bool
	listen    string
	metrics   string
	admin     string
	agentWait time.Duration
	// watch reloads the config when its file changes; watchEvery is how often it looks.
	watch      bool
	watchEvery time.Duration
	// version prints the binary's version and exits.
	version bool
	// agentConfig is refused with a pointer to policyctl validate (the kernel binary does not
	// carry the agent's policies).
	agentConfig string
}

func parseFlags(args []string, stderr io.Writer) (*flags, error) {
	fs := flag.NewFlagSet("policy-kernel", flag.ContinueOnError)
	fs.SetOutput(stderr)
	f := &flags{}
	fs.StringVar(&f.config, "config", DefaultConfigPath, "path of the kernel config file")
	fs.BoolVar(&f.validate, "validate", false, "check the config and every chain entry against its running agent (waiting up to -agent-wait for the agents; an agent that does not answer is a problem), print every problem as file:line, and exit: 0 if valid, 1 if not. Without running agents: policyctl validate --config FILE --agent-config AGENT_FILE")
	fs.StringVar(&f.agentConfig, "agent-config", "", "not supported: the kernel does not carry the agent's policies; validate offline with policyctl validate --config FILE --agent-config AGENT_FILE")
	fs.StringVar(&f.listen, "listen", "", "ext_proc listen address host:port, or unix:///path for a Unix socket (overrides server.address, server.port and server.socket_path)")
	fs.StringVar(&f.metrics, "metrics-listen", "", "metrics listen address host:port (overrides observability.metrics_address and metrics_port)")
	fs.StringVar(&f.admin, "admin-listen", "", "admin listen address host:port: /config, /debug/explain, /debug/pprof/ (overrides observability.admin_address and admin_port)")
	fs.DurationVar(&f.agentWait, "agent-wait", 10*time.Second, "how long to wait at start for the agents to answer GetAgentConfig")
	fs.BoolVar(&f.watch, "watch-config", true, "reload the config when its file changes, as on SIGHUP")
	fs.DurationVar(&f.watchEvery, "watch-interval", time.Second, "how often -watch-config looks at the config file")
	fs.BoolVar(&f.version, "version", false, "print the version and exit")
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
	if f.agentConfig != "" {
		errs = append(errs, fmt.Errorf("-agent-config: policy-kernel does not carry the agent's policies, so it validates against running agents only; to validate without them run: policyctl validate --config %s --agent-config %s", f.config, f.agentConfig))
	}
	if f.watchEvery < 10*time.Millisecond {
		errs = append(errs, fmt.Errorf("-watch-interval must be at least 10ms, got %v", f.watchEvery))
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
	// health is the gRPC health service on the ext_proc port; it follows readiness.
	health *health.Server

	mu      sync.Mutex // serialises snapshot builds (reloads and agent rediscovery)
	current []byte     // bytes of the config in force
	// stopping turns readiness off once SIGTERM arrives.
	stopping atomic.Bool
	// serving is the last status given to the gRPC health service; 0 before the first.
	serving atomic.Int32
}

// Main runs the kernel until ctx is cancelled. cmd/policy-kernel turns SIGTERM and SIGINT into
// that cancellation; SIGHUP (config reload) is handled here.
func Main(ctx context.Context, args []string, stderr io.Writer) error {
	f, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	if f.version {
		_, err := fmt.Fprintf(stdout, "policy-kernel %s (%s %s/%s)\n", Version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
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
	kc := cfg.PolicyKernel
	// A config or agent socket that any user could replace is refused at start-up, as under
	// --validate (which reports it with every other problem).
	if !f.validate {
		if errs := permissionProblems(f.config, kc); len(errs) > 0 {
			return errors.Join(errs...)
		}
	}
	level, _ := logging.ParseLevel(kc.Observability.LogLevel)
	log := logging.New(stderr, "kernel", level)
	m := newKernelMetrics()
	k := &Kernel{
		flags:   f,
		log:     log,
		metrics: m,
		server:  NewServer(log, m),
		pool:    &agentPool{byName: map[string]*agentState{}, maxMsg: grpcMsgLimit(kc), metrics: m},
		health:  health.NewServer(),
	}
	defer k.pool.closeAll()
	k.pool.onLearn = k.onLearn
	m.registerStreams(k.server)
	m.registerInvalidRoutes(k.server)
	agents, err := k.pool.agentsFor(kc)
	if err != nil {
		return err
	}
	k.pool.commit(agents, 0)
	k.discover(ctx, agents, f.agentWait)
	entryErrs := checkEntries(kc, agents, reloadTimeout)
	snap := buildSnapshot(kc, configVersion(kc.Version, data), agents, m)
	if f.validate {
		return validateReport(stderr, f.config, data, snap, entryErrs, false)
	}
	tr, err := tracing.NewLogged(kc.Observability.Tracing, tracing.Root, "policy-kernel", Version, log)
	if err != nil {
		return fmt.Errorf("%s: %w", f.config, err)
	}
	k.server.SetTracer(tr)
	defer func() { k.server.SetTracer(nil).Close() }()
	k.install(snap, data)
	m.markReloaded()

	opts := []grpc.ServerOption{
		grpc.MaxConcurrentStreams(kc.Server.MaxConcurrentStreams),
		grpc.MaxRecvMsgSize(grpcMsgLimit(kc)),
		grpc.MaxSendMsgSize(grpcMsgLimit(kc)),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		// Each Envoy stream runs in a goroutine; a new one grows its stack for every stream,
		// a worker only once.
		grpc.NumStreamWorkers(kc.Server.StreamWorkers),
		// A connection that has not finished its handshake (TLS and HTTP/2 preface) in this
		// time is closed, so that it cannot hold a place under max_connections.
		grpc.ConnectionTimeout(handshakeTimeout),
	}
	// Fixed flow-control windows: no bandwidth-estimation PING per message from Envoy.
	opts = append(opts, flowctl.ServerOptions()...)
	if kc.Server.TLS.Enabled() {
		cf, err := newCertFiles(kc.Server.TLS, m, log)
		if err != nil {
			return fmt.Errorf("%s: %w", f.config, err)
		}
		opts = append(opts, grpc.Creds(newRefusalCounter(credentials.NewTLS(cf.serverConfig()), m, log)))
	}
	var idle *idleStreams
	if ms := kc.Server.StreamIdleTimeoutMS; ms > 0 {
		idle = newIdleStreams(time.Duration(ms)*time.Millisecond, m, log)
		opts = append(opts, idle.serverOptions()...)
		// A connection without a stream for as long is closed too (GOAWAY; Envoy reconnects).
		opts = append(opts, grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: time.Duration(ms) * time.Millisecond}))
	}
	extLn, err := listenExtProc(kc, f)
	if err != nil {
		return err
	}
	ln := newLimitListener(extLn, kc.Server.MaxConnections, m, log)
	srv := grpc.NewServer(opts...)
	extprocv3.RegisterExternalProcessorServer(srv, k.server)
	healthpb.RegisterHealthServer(srv, k.health)
	k.syncHealth()

	if maddr := metricsAddr(f, kc); maddr != "" {
		httpSrv, err := obs.Listen(maddr, obs.Handler(obs.Options{
			Sets:           func() []*metrics.Set { return []*metrics.Set{m.set} },
			Ready:          k.readiness,
			ProcessMetrics: true,
			Families:       Families,
		}))
		if err != nil {
			ln.Close()
			return fmt.Errorf("listen on metrics address %q: %w", maddr, err)
		}
		defer httpSrv.Close()
	}
	// The admin listener: what tells more than the probes and the metrics, bound to loopback
	// unless the operator says otherwise.
	if aaddr := adminAddr(f, kc); aaddr != "" {
		adminSrv, err := obs.Listen(aaddr, obs.AdminHandler(obs.AdminOptions{
			Config: k.configDump,
			Pprof:  kc.Observability.PprofEnabled != nil && *kc.Observability.PprofEnabled,
			Routes: k.adminRoutes(),
		}))
		if err != nil {
			ln.Close()
			return fmt.Errorf("listen on admin address %q: %w", aaddr, err)
		}
		defer adminSrv.Close()
	}

	hctx, stopHealth := context.WithCancel(ctx)
	defer stopHealth()
	healthDone := make(chan struct{})
	go func() { k.healthLoop(hctx); close(healthDone) }()
	if idle != nil {
		go idle.run(hctx)
	}

	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	log.Audit(zerolog.InfoLevel).Str("address", ln.Addr().String()).Bool("tls", kc.Server.TLS.Enabled()).
		Bool("client_cert_required", kc.Server.TLS.RequireClientCert).Str("config_version", snap.Version).
		Int("routes", snap.routes.Len()).Msg("policy-kernel serving")

	w := watchConfig(hctx, f)
	for {
		select {
		case <-hup:
			w.Sync()
			k.reload()
		case files := <-w.C():
			log.Audit(zerolog.InfoLevel).Strs("files", files).Msg("config file changed; reloading")
			k.reload()
		case err := <-serveErr:
			return fmt.Errorf("grpc server: %w", err)
		case <-ctx.Done():
			stopHealth()
			<-healthDone
			k.shutdown(srv)
			return nil
		}
	}
}

// watchConfig watches the config file when -watch-config is on; nil (off) otherwise.
func watchConfig(ctx context.Context, f *flags) *watch.Watcher {
	if !f.watch {
		return nil
	}
	w := watch.New(f.watchEvery, f.config)
	go w.Run(ctx)
	return w
}

// grpcMsgLimit sizes gRPC messages to the body cap plus room for headers, so a body Envoy is
// allowed to buffer always fits and nothing larger does.
func grpcMsgLimit(kc *KernelConfig) int { return kc.Server.MaxBodySizeBytes + 1<<20 }

func metricsAddr(f *flags, kc *KernelConfig) string {
	return listenAddr(f.metrics, kc.Observability.MetricsAddress, kc.Observability.MetricsPort)
}

func adminAddr(f *flags, kc *KernelConfig) string {
	return listenAddr(f.admin, kc.Observability.AdminAddress, kc.Observability.AdminPort)
}

// listenAddr is a listener's address: the flag's when given, else the config's host and port;
// "" (no listener) for a negative port.
func listenAddr(flag, host string, port int) string {
	if flag != "" {
		return flag
	}
	if port < 0 {
		return ""
	}
	return net.JoinHostPort(host, strconv.Itoa(port))
}

// install makes snap current and drops the metric series its predecessor alone used.
func (k *Kernel) install(snap *Snapshot, data []byte) {
	prev := k.server.Snapshot()
	k.server.Store(snap)
	k.current = data
	snap.retainMetrics(k.metrics)
	k.metrics.setInfo(snap.Version)
	for _, inv := range snap.invalid {
		k.log.Error().Str("config_version", snap.Version).Str("error", inv).Msg("route marked invalid; its requests are denied")
	}
	for _, w := range snap.warnings {
		k.log.Warn().Str("config_version", snap.Version).Str("key", w.key).Str("warning", w.msg).Msg("config setting ignored")
	}
	// A route not checked yet is checked again at every health check; logged when the list
	// changes only.
	for _, inv := range snap.unvalidated {
		if prev != nil && slices.Equal(prev.unvalidated, snap.unvalidated) {
			break
		}
		k.log.Warn().Str("config_version", snap.Version).Str("error", inv).Msg("route not checked against its agent yet; its requests are refused until it is")
	}
}

// onLearn hears from an agent client that its agent now has another policy set (it was
// replaced), before the client sends a call on the new connection: the agents of the config in
// force that use the client take the new set, and the snapshot is rebuilt against it.
func (k *Kernel) onLearn(c AgentClient, info *agentv1.GetAgentConfigResponse) {
	snap := k.server.Snapshot()
	if snap == nil {
		return
	}
	used := false
	for _, a := range snap.agents {
		if a.client == c {
			a.info.Store(info)
			used = true
		}
	}
	if used {
		k.log.Warn().Str("agent_version", info.GetAgentVersion()).Msg("agent came back with another policy set; routes checked again before it is called")
		k.rebuild()
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

// reloadTimeout bounds the GetAgentConfig query of each agent during a reload; an agent that
// does not answer in time keeps what it advertised last.
const reloadTimeout = time.Second

// reload re-reads the config file, asks every agent for its policies again, and swaps in the
// new snapshot when the file changed and the snapshot is valid: the file passes its schema and
// checks, and every chain passes the agents' policies and metadata schemas. Otherwise the
// current snapshot stays, the problems are logged with file, line and key, and the failure is
// counted. Streams already open finish on the snapshot they started with.
func (k *Kernel) reload() {
	k.mu.Lock()
	defer k.mu.Unlock()
	file := k.flags.config
	cfg, data, err := LoadConfig(file)
	if err == nil && bytes.Equal(data, k.current) {
		k.log.Audit(zerolog.InfoLevel).Str("config_version", k.server.Snapshot().Version).Msg("config unchanged; reload skipped")
		return
	}
	if err != nil {
		k.reloadFailed(err)
		return
	}
	kc := cfg.PolicyKernel
	old := k.server.Snapshot().Config
	agents, err := k.pool.agentsFor(kc)
	if err != nil {
		k.reloadFailed(fmt.Errorf("%s: %w", file, err))
		return
	}
	k.query(agents, reloadTimeout)
	entryErrs := checkEntries(kc, agents, reloadTimeout)
	snap := buildSnapshot(kc, configVersion(kc.Version, data), agents, k.metrics)
	if len(snap.problems) > 0 || len(entryErrs) > 0 {
		// A chain entry that an agent in reach could not build is not put in force.
		k.pool.discard(agents)
		err := problemsError(file, data, snap.problems)
		if len(snap.problems) == 0 {
			err = nil
		}
		for _, name := range sortedKeys(entryErrs) {
			err = errors.Join(err, fmt.Errorf("%s: %w", file, entryErrs[name]))
		}
		k.reloadFailed(err)
		return
	}
	var tr *tracing.Tracer
	tracingChanged := !reflect.DeepEqual(kc.Observability.Tracing, old.Observability.Tracing)
	if tracingChanged {
		if tr, err = tracing.NewLogged(kc.Observability.Tracing, tracing.Root, "policy-kernel", Version, k.log); err != nil {
			k.pool.discard(agents)
			k.reloadFailed(fmt.Errorf("%s: policy_kernel.observability.tracing: %w", file, err))
			return
		}
	}
	grace := time.Duration(2*kc.Server.MessageTimeoutMS)*time.Millisecond + time.Second
	k.pool.commit(agents, grace)
	k.install(snap, data)
	if tracingChanged {
		prev := k.server.SetTracer(tr)
		time.AfterFunc(grace, prev.Close)
	}
	if lvl, err := logging.ParseLevel(kc.Observability.LogLevel); err == nil {
		k.log.SetLevel(lvl)
	}
	if restart := restartOnly(old, kc); len(restart) > 0 {
		k.log.Audit(zerolog.WarnLevel).Strs("keys", restart).Msg("these settings take effect on restart only")
	}
	k.metrics.reloadSuccess.Inc()
	k.metrics.markReloaded()
	ev := k.log.Audit(zerolog.InfoLevel).Str("config_version", snap.Version).Int("routes", snap.routes.Len())
	rc := routeChanges(old, kc)
	for _, l := range []struct {
		key   string
		names []string
	}{{"routes_added", rc.added}, {"routes_removed", rc.removed}, {"routes_changed", rc.changed}} {
		ev = ev.Strs(l.key, firstNames(l.names))
		if len(l.names) > maxLoggedRoutes {
			ev = ev.Int(l.key+"_count", len(l.names))
		}
	}
	if rc.defaultChanged {
		ev = ev.Bool("default_policy_changed", true)
	}
	ev.Msg("config reloaded")
}

// maxLoggedRoutes bounds each list of route names on the "config reloaded" line; a longer list
// is cut there, and its full length logged as <key>_count.
const maxLoggedRoutes = 20

// firstNames returns at most maxLoggedRoutes of names.
func firstNames(names []string) []string {
	if len(names) > maxLoggedRoutes {
		return names[:maxLoggedRoutes]
	}
	return names
}

// routeDiff is what a reload changed in the routes, by route name, each list in sorted order.
type routeDiff struct {
	added, removed, changed []string
	defaultChanged          bool
}

// routeChanges compares the routes (and the default policy) of two configs: a route whose
// agent, mode or chains differ in any way, metadata included, is changed.
func routeChanges(old, cur *KernelConfig) routeDiff {
	var d routeDiff
	before := make(map[string]*RoutePolicy, len(old.RoutePolicies))
	for i := range old.RoutePolicies {
		before[old.RoutePolicies[i].RouteName] = &old.RoutePolicies[i]
	}
	seen := make(map[string]bool, len(cur.RoutePolicies))
	for i := range cur.RoutePolicies {
		r := &cur.RoutePolicies[i]
		seen[r.RouteName] = true
		switch o, ok := before[r.RouteName]; {
		case !ok:
			d.added = append(d.added, r.RouteName)
		case !reflect.DeepEqual(o, r):
			d.changed = append(d.changed, r.RouteName)
		}
	}
	for name := range before {
		if !seen[name] {
			d.removed = append(d.removed, name)
		}
	}
	slices.Sort(d.added)
	slices.Sort(d.removed)
	slices.Sort(d.changed)
	d.defaultChanged = !reflect.DeepEqual(old.DefaultPolicy, cur.DefaultPolicy)
	return d
}

func (k *Kernel) reloadFailed(err error) {
	k.metrics.reloadFailure.Inc()
	k.log.Audit(zerolog.ErrorLevel).Str("file", k.flags.config).Str("config_version", k.server.Snapshot().Version).
		Errors("errors", err).Msg("config reload failed; keeping the previous config")
}

// restartOnly lists the settings that changed but only apply when the kernel starts.
func restartOnly(old, cur *KernelConfig) []string {
	var out []string
	add := func(changed bool, key string) {
		if changed {
			out = append(out, "policy_kernel."+key)
		}
	}
	add(old.Server.Address != cur.Server.Address, "server.address")
	add(old.Server.Port != cur.Server.Port, "server.port")
	add(old.Server.SocketPath != cur.Server.SocketPath, "server.socket_path")
	add(old.Server.SocketMode != cur.Server.SocketMode, "server.socket_mode")
	add(old.Server.MaxConcurrentStreams != cur.Server.MaxConcurrentStreams, "server.max_concurrent_streams")
	add(old.Server.StreamWorkers != cur.Server.StreamWorkers, "server.stream_workers")
	add(old.Server.MaxBodySizeBytes != cur.Server.MaxBodySizeBytes, "server.max_body_size_bytes")
	add(old.Server.MaxConnections != cur.Server.MaxConnections, "server.max_connections")
	add(old.Server.StreamIdleTimeoutMS != cur.Server.StreamIdleTimeoutMS, "server.stream_idle_timeout_ms")
	add(old.Server.TLS != cur.Server.TLS, "server.tls")
	o, c := old.Observability, cur.Observability
	add(o.MetricsPort != c.MetricsPort, "observability.metrics_port")
	add(o.MetricsAddress != c.MetricsAddress, "observability.metrics_address")
	add(o.AdminPort != c.AdminPort, "observability.admin_port")
	add(o.AdminAddress != c.AdminAddress, "observability.admin_address")
	add(!reflect.DeepEqual(o.PprofEnabled, c.PprofEnabled), "observability.pprof_enabled")
	return out
}

// query asks every agent for its config once, in parallel, within timeout; agents that do not
// answer keep what they advertised before.
func (k *Kernel) query(agents map[string]*agentState, timeout time.Duration) {
	var wg sync.WaitGroup
	for _, a := range agents {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			info, err := a.client.GetAgentConfig(ctx)
			if err != nil {
				k.log.Warn().Str("agent", a.cfg.Name).Err(err).Msg("agent did not answer GetAgentConfig; its chains are checked against what it advertised before")
				return
			}
			a.info.Store(info)
		}()
	}
	wg.Wait()
}

// problemsError turns snapshot problems into file:line: key: message errors.
func problemsError(file string, data []byte, problems []problem) error {
	doc, err := yamlconf.ParseDoc(file, data)
	if err != nil {
		return err
	}
	probs := yamlconf.NewProblems(doc)
	for _, p := range problems {
		probs.Add(doc.Errorf(p.key, "%s", p.msg))
	}
	return probs.Err()
}

// healthLoop checks every agent on its interval, and asks an agent for its config again when it
// was never reached or came back, rebuilding the snapshot when what it advertises changed.
func (k *Kernel) healthLoop(ctx context.Context) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	next := map[string]time.Time{}
	var lastWake time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-k.server.wake:
			// A request met a route not checked yet: check its agents now rather than at
			// their next interval, at most once a second.
			if now.Sub(lastWake) >= time.Second {
				lastWake = now
				clear(next)
			}
		case now := <-tick.C:
			snap := k.server.Snapshot()
			for name, a := range snap.agents {
				if now.Before(next[name]) {
					continue
				}
				interval := time.Duration(a.cfg.HealthCheckIntervalMS) * time.Millisecond
				if snap.unvalidatedOn(a) || !a.healthy.Load() {
					// Its routes are refused until it is checked: try again within a second
					// rather than a whole interval (a start-up on a busy machine, an agent
					// coming back).
					interval = min(interval, uncheckedRetry)
				}
				next[name] = now.Add(interval)
				k.checkAgent(ctx, a)
			}
			k.syncHealth()
		}
	}
}

// uncheckedRetry is how soon an agent that is down, or whose routes are not checked yet, is
// checked again when its health_check_interval_ms is longer.
const uncheckedRetry = time.Second

// healthCheckTimeout bounds an agent health check (specification §3.7).
const healthCheckTimeout = 100 * time.Millisecond

func (k *Kernel) checkAgent(ctx context.Context, a *agentState) {
	cctx, cancel := context.WithTimeout(ctx, healthCheckTimeout)
	err := a.client.Check(cctx)
	cancel()
	was := a.healthy.Load()
	if err != nil {
		if ctx.Err() != nil {
			return // shutting down; the agent is fine as far as we know
		}
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
	prev := a.info.Swap(info)
	// Checked again when the agent has other policies or another config (an entry it
	// refused may build now, or the reverse), and while a route of it is not checked.
	if prev == nil || policySetChanged(prev, info) || prev.GetConfigVersion() != info.GetConfigVersion() ||
		k.server.Snapshot().unvalidatedOn(a) {
		k.rebuild()
	}
}

// syncHealth makes the gRPC health service on the ext_proc port say what readiness says, so
// that Envoy's health checks of the cluster see the same as /health/ready.
func (k *Kernel) syncHealth() {
	ready, _ := k.readiness()
	st := healthpb.HealthCheckResponse_NOT_SERVING
	if ready {
		st = healthpb.HealthCheckResponse_SERVING
	}
	if k.serving.Swap(int32(st)) == int32(st) {
		return
	}
	k.health.SetServingStatus("", st)
	k.health.SetServingStatus(extprocv3.ExternalProcessor_ServiceDesc.ServiceName, st)
}

// rebuild compiles the config in force again, against what the agents advertise now.
func (k *Kernel) rebuild() {
	k.mu.Lock()
	defer k.mu.Unlock()
	cur := k.server.Snapshot()
	for name, err := range checkEntries(cur.Config, cur.agents, reloadTimeout) {
		if !cur.unvalidatedOn(cur.agents[name]) { // logged once, not at every retry
			k.log.Warn().Str("agent", name).Str("error", err.Error()).Msg("chain entries not checked; their routes are refused until they are")
		}
	}
	snap := buildSnapshot(cur.Config, cur.Version, cur.agents, k.metrics)
	k.install(snap, k.current)
	if len(cur.unvalidated) > 0 && slices.Equal(cur.unvalidated, snap.unvalidated) && slices.Equal(cur.invalid, snap.invalid) {
		return // a retry that changed nothing
	}
	k.log.Audit(zerolog.InfoLevel).Str("config_version", snap.Version).Int("invalid_routes", len(snap.invalid)).
		Int("unvalidated_routes", len(snap.unvalidated)).Msg("routes checked again against the agents' policies")
}

// readiness is ready when the config in force can serve every route (each checked against its
// agent and valid), every agent is healthy, and the kernel is not draining; its detail says
// which part is not, in not_ready. A rolling deploy of a config with a route that cannot serve
// never becomes ready.
func (k *Kernel) readiness() (bool, any) {
	snap := k.server.Snapshot()
	type agentInfo struct {
		Healthy       bool   `json:"healthy"`
		Version       string `json:"version,omitempty"`
		ConfigVersion string `json:"config_version,omitempty"`
	}
	detail := struct {
		Status        string               `json:"status"`
		NotReady      []string             `json:"not_ready,omitempty"`
		ConfigVersion string               `json:"config_version"`
		Agents        map[string]agentInfo `json:"agents"`
		InvalidRoutes []string             `json:"invalid_routes,omitempty"`
		Unvalidated   []string             `json:"unvalidated_routes,omitempty"`
		Draining      bool                 `json:"draining,omitempty"`
	}{Status: "ready", Agents: map[string]agentInfo{}}
	if snap == nil {
		detail.NotReady = append(detail.NotReady, "no config loaded")
	} else {
		detail.ConfigVersion = snap.Version
		detail.InvalidRoutes = snap.invalid
		detail.Unvalidated = snap.unvalidated
		if n := len(snap.invalid); n > 0 {
			detail.NotReady = append(detail.NotReady, fmt.Sprintf("%d routes are invalid", n))
		}
		if n := len(snap.unvalidated); n > 0 {
			detail.NotReady = append(detail.NotReady, fmt.Sprintf("%d routes are not checked against their agent yet", n))
		}
		for _, ac := range snap.Config.Agents {
			a := snap.agents[ac.Name]
			h := a.healthy.Load()
			if !h {
				detail.NotReady = append(detail.NotReady, fmt.Sprintf("agent %q is not reachable at %q", ac.Name, ac.SocketPath))
			}
			info := a.info.Load()
			detail.Agents[ac.Name] = agentInfo{Healthy: h, Version: info.GetAgentVersion(), ConfigVersion: info.GetConfigVersion()}
		}
	}
	if k.stopping.Load() {
		detail.Draining = true
		detail.NotReady = append(detail.NotReady, "shutting down")
	}
	ready := len(detail.NotReady) == 0
	if !ready {
		detail.Status = "not ready"
	}
	return ready, detail
}

// shutdown reports not ready (on /health/ready and the gRPC health service), keeps serving for
// the drain delay so that Envoy and load balancers notice, then refuses new streams and lets
// open ones finish within the shutdown timeout.
func (k *Kernel) shutdown(srv *grpc.Server) {
	cfg := k.server.Snapshot().Config.Server
	k.stopping.Store(true)
	k.health.Shutdown() // NOT_SERVING from now on
	k.log.Info().Int("drain_delay_ms", cfg.DrainDelayMS).Int64("streams", k.server.streams.Load()).Msg("shutting down: draining")
	time.Sleep(time.Duration(cfg.DrainDelayMS) * time.Millisecond)
	k.server.draining.Store(true)
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(time.Duration(cfg.ShutdownTimeoutMS) * time.Millisecond):
		k.log.Warn().Int64("streams", k.server.streams.Load()).Msg("shutdown timeout: cutting the streams still open")
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

// validateReport checks a snapshot built for --validate: every agent must have answered, so
// that every chain was checked against its agent's policies and metadata schemas. It returns
// every problem at once, as file:line: key: message.
//
// offline is policyctl validate: the agents run in the caller's process (ValidateOffline), so
// an agent without one is one no agent config was given for, and the agent sockets, which are
// the deployment's, are not checked.
func validateReport(w io.Writer, file string, data []byte, snap *Snapshot, entryErrs map[string]error, offline bool) error {
	problems := slices.Clone(snap.problems)
	for i, ac := range snap.Config.Agents {
		key := fmt.Sprintf("policy_kernel.agents[%d].socket_path", i)
		if offline && snap.agents[ac.Name].info.Load() == nil {
			problems = append(problems, problem{
				key: fmt.Sprintf("policy_kernel.agents[%d].name", i),
				msg: fmt.Sprintf("no agent config that loads has agent_core.name %q: its chains could not be checked against its policies", ac.Name),
			})
		} else if snap.agents[ac.Name].info.Load() == nil {
			problems = append(problems, problem{
				key: key,
				msg: fmt.Sprintf("agent %q did not answer at %q: its chains could not be checked against its policies", ac.Name, ac.SocketPath),
			})
		} else if err := entryErrs[ac.Name]; err != nil {
			problems = append(problems, problem{key: key, msg: err.Error() + ": its chains could not be checked"})
		}
	}
	var errs []error
	if offline {
		if err := fsperm.CheckConfig(file); err != nil {
			errs = append(errs, err)
		}
	} else {
		errs = permissionProblems(file, snap.Config)
	}
	if len(problems) > 0 {
		errs = append([]error{problemsError(file, data, problems)}, errs...)
	}
	for _, p := range snap.warnings {
		fmt.Fprintf(w, "warning: %v\n", problemsError(file, data, []problem{p}))
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	fmt.Fprintf(w, "%s: valid (version %s)\n", file, snap.Version)
	return nil
}

// sortedKeys returns the keys of m in order.
func sortedKeys[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}

// Version of the kernel binary; set by the linker.
var Version = "dev"

// stdout is where --version writes.
var stdout io.Writer = os.Stdout
