package loadtest

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/policy-engine/policy-engine/agent/policy"
	_ "github.com/policy-engine/policy-engine/policies/all" // to know which policies the agent has
)

// Phase names.
const (
	phaseOpen    = "open"
	phaseClosed  = "closed"
	phaseStreams = "streams"
	// phaseIdle is the memory of each process once it is ready, before any traffic.
	phaseIdle = "idle"
)

// openPhase names the open-loop phase at a rate.
func openPhase(rate float64) string { return fmt.Sprintf("%s %g", phaseOpen, rate) }

// Target names.
const (
	targetNoop   = "noop"
	targetKernel = "kernel+agent"
	// targetKernelUDS is kernel+agent with Envoy's side on a Unix socket (server.socket_path),
	// as with a sidecar Envoy on a pipe address, instead of TCP loopback.
	targetKernelUDS = "kernel+agent-uds"
)

// APIKey is the API key of the load-test traffic; the agent config holds its digest.
const APIKey = "loadtest-key-0123456789"

// RouteName is the route of the load-test traffic.
const RouteName = "/api/v1/users"

// Options are the load test's settings.
type Options struct {
	BinDir string
	// Rates are the open-loop rates, requests per second: one open-loop phase each.
	Rates         []float64
	OpenFor       time.Duration
	ClosedFor     time.Duration
	Warmup        time.Duration
	Concurrency   int
	Conns         int
	Streams       int
	Repeat        int
	Targets       []string
	JSONOut       string
	WorkDir       string // empty: a temporary folder, removed at the end
	ProfileDir    string // non-empty: capture kernel and agent profiles in the closed loop
	ProfileFor    time.Duration
	MaxInFlight   int
	StartTimeout  time.Duration
	ExtraKernelYA string // appended to the kernel config's policy_kernel section, for experiments
	// ServerEnv is added to the environment of the kernel and agent, e.g. GOGC=200.
	ServerEnv []string
	// MessageTimeout is Envoy's message_timeout that the kernel is configured with; the agent
	// timeout is three quarters of it, as in the example config.
	MessageTimeout time.Duration
	// Scenario is the request chain: apikey, jwt or jwt-cached (jwt.go).
	Scenario string
}

func parseOptions(args []string, stderr io.Writer) (*Options, error) {
	fs := flag.NewFlagSet("loadtest", flag.ContinueOnError)
	fs.SetOutput(stderr)
	o := &Options{}
	var targets string
	fs.StringVar(&o.BinDir, "bin", "bin", "folder with policy-kernel, policy-agent and extproc-noop")
	var rates string
	fs.StringVar(&rates, "rate", "2500,5000", "open-loop rates, requests per second, comma-separated: one open-loop phase each")
	fs.DurationVar(&o.OpenFor, "open", 10*time.Second, "open-loop phase length")
	fs.DurationVar(&o.ClosedFor, "closed", 10*time.Second, "closed-loop phase length")
	fs.DurationVar(&o.Warmup, "warmup", 2*time.Second, "closed-loop warm-up of each target before measuring")
	fs.IntVar(&o.Concurrency, "concurrency", 64, "closed-loop concurrent requests")
	fs.IntVar(&o.Conns, "conns", 2, "HTTP/2 connections to each server, like Envoy's per-worker connections")
	fs.IntVar(&o.Streams, "streams", 10000, "streams held open at once in the memory phase (0: skip it)")
	fs.IntVar(&o.Repeat, "repeat", 1, "how many times to run the open, closed and memory phases, alternating the targets")
	fs.StringVar(&targets, "targets", targetNoop+","+targetKernel, "targets to measure, comma-separated: noop, kernel+agent, kernel+agent-uds (Envoy's side on a Unix socket)")
	fs.StringVar(&o.JSONOut, "json", "loadtest/results/loadtest.json", "where to write the JSON report (empty: nowhere)")
	fs.StringVar(&o.WorkDir, "workdir", "", "folder for configs, sockets and logs (default: a temporary one, removed at the end)")
	fs.StringVar(&o.ProfileDir, "profile", "", "capture CPU and heap profiles of the kernel and agent during the closed loop (<name>.cpu.pprof), each open-loop rate (open<rate>.<name>.cpu.pprof, with execution traces of both processes at the same time, open<rate>.<name>.trace, for loadtest/cmd/crossing) and the held streams into this folder")
	fs.DurationVar(&o.ProfileFor, "profile-seconds", 8*time.Second, "CPU profile length (at most the phase's length)")
	fs.IntVar(&o.MaxInFlight, "max-in-flight", 20000, "open-loop requests outstanding at once before new ones are dropped")
	fs.DurationVar(&o.StartTimeout, "start-timeout", 30*time.Second, "how long to wait for the servers to be ready")
	fs.StringVar(&o.ExtraKernelYA, "kernel-yaml", "", "extra YAML lines for the kernel config's policy_kernel section")
	fs.DurationVar(&o.MessageTimeout, "message-timeout", 200*time.Millisecond, "Envoy's message_timeout for the kernel config (the agent timeout is 3/4 of it)")
	fs.StringVar(&o.Scenario, "scenario", scenarioAPIKey, "request chain of kernel+agent: apikey (apiKeyAuth), jwt (jwtValidation, RS256 verified per request) or jwt-cached (jwtValidation with a cache keyed by the token)")
	var env string
	fs.StringVar(&env, "server-env", "", "comma-separated KEY=VALUE pairs added to the kernel's and agent's environment, e.g. GOGC=200")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	var errs []error
	if env != "" {
		for kv := range strings.SplitSeq(env, ",") {
			if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
				errs = append(errs, fmt.Errorf("-server-env: %q is not KEY=VALUE", kv))
				continue
			}
			o.ServerEnv = append(o.ServerEnv, kv)
		}
	}
	if fs.NArg() > 0 {
		errs = append(errs, fmt.Errorf("unexpected arguments: %q", fs.Args()))
	}
	for r := range strings.SplitSeq(rates, ",") {
		v, err := strconv.ParseFloat(strings.TrimSpace(r), 64)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("-rate: invalid value %q", r))
		case v <= 0 || math.IsNaN(v) || math.IsInf(v, 0):
			errs = append(errs, fmt.Errorf("-rate must be positive, got %g", v))
		default:
			o.Rates = append(o.Rates, v)
		}
	}
	if o.Concurrency <= 0 || o.Conns <= 0 || o.Repeat <= 0 || o.MaxInFlight <= 0 {
		errs = append(errs, errors.New("-concurrency, -conns, -repeat and -max-in-flight must be positive"))
	}
	if o.MessageTimeout < 4*time.Millisecond || o.MessageTimeout > 6*time.Second {
		errs = append(errs, fmt.Errorf("-message-timeout must be from 4ms to 6s, got %s", o.MessageTimeout))
	}
	if o.Streams < 0 {
		errs = append(errs, fmt.Errorf("-streams must not be negative, got %d", o.Streams))
	}
	switch o.Scenario {
	case scenarioAPIKey, scenarioJWT, scenarioJWTCached:
	default:
		errs = append(errs, fmt.Errorf("-scenario: unknown scenario %q (want apikey, jwt or jwt-cached)", o.Scenario))
	}
	for t := range strings.SplitSeq(targets, ",") {
		switch t = strings.TrimSpace(t); t {
		case targetNoop, targetKernel, targetKernelUDS:
			o.Targets = append(o.Targets, t)
		default:
			errs = append(errs, fmt.Errorf("-targets: unknown target %q (want noop, kernel+agent or kernel+agent-uds)", t))
		}
	}
	return o, errors.Join(errs...)
}

// Main runs the load test with command-line arguments, printing the table to stdout.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseOptions(args, stderr)
	if err != nil {
		return err
	}
	rep, err := Run(ctx, o, stderr)
	if err != nil {
		return err
	}
	if err := rep.WriteTable(stdout); err != nil {
		return err
	}
	if o.JSONOut != "" {
		if err := os.MkdirAll(filepath.Dir(o.JSONOut), 0o755); err != nil {
			return fmt.Errorf("create report folder: %w", err)
		}
		var buf bytes.Buffer
		if err := rep.WriteJSON(&buf); err != nil {
			return err
		}
		if err := os.WriteFile(o.JSONOut, buf.Bytes(), 0o644); err != nil {
			return fmt.Errorf("write report: %w", err)
		}
		fmt.Fprintf(stdout, "report written to %s\n", o.JSONOut)
	}
	return nil
}

// target is one server under test: its processes and where it listens.
type target struct {
	name       string
	addr       string
	procs      []*process
	metricsURL string // the kernel's /metrics; empty for the baseline
	// pprof lists the base URLs of /debug/pprof/ by process name.
	pprof map[string]string
	conns *Conns
}

// stop ends the target's processes, the kernel before its agent.
func (t *target) stop() {
	for _, p := range t.procs {
		p.stop()
	}
}

// Run starts the targets, drives each phase and returns the report. Every process it started
// is stopped before it returns, on error and on cancellation too.
func Run(ctx context.Context, o *Options, log io.Writer) (rep *Report, err error) {
	dir := o.WorkDir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "loadtest-"); err != nil {
			return nil, fmt.Errorf("create work folder: %w", err)
		}
		defer os.RemoveAll(dir)
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create work folder: %w", err)
	}
	var started []*process
	defer func() {
		for i := len(started) - 1; i >= 0; i-- {
			started[i].stop()
		}
	}()
	reqChain, respChain := chains()
	var jwtSet *jwtSetup
	if o.Scenario == scenarioJWT || o.Scenario == scenarioJWTCached {
		if jwtSet, err = newJWTSetup(); err != nil {
			return nil, err
		}
	}
	rep = &Report{Machine: machine(), Settings: Settings{
		Rates: o.Rates, OpenSeconds: o.OpenFor.Seconds(), ClosedSeconds: o.ClosedFor.Seconds(), Concurrency: o.Concurrency,
		Connections: o.Conns, Streams: o.Streams, Repeat: o.Repeat, RequestChain: scenarioChain(o.Scenario, reqChain), ResponseChain: respChain,
	}}

	var targets []*target
	for _, name := range o.Targets {
		t, err := startTarget(ctx, name, o, dir, reqChain, respChain, jwtSet, &started)
		if err != nil {
			return nil, err
		}
		targets = append(targets, t)
	}
	for _, t := range targets {
		if t.conns, err = Dial(t.addr, o.Conns); err != nil {
			return nil, err
		}
		defer t.conns.Close()
	}
	for _, t := range targets {
		// What each process holds before any traffic: its binary, runtime and config.
		row := Row{Run: 1, Target: t.name, Phase: phaseIdle}
		for _, p := range t.procs {
			rss, err := RSS(p.pid())
			if err != nil {
				return nil, err
			}
			row.Procs = append(row.Procs, ProcUsage{Name: p.name, PeakRSS: rss})
		}
		rep.Rows = append(rep.Rows, row)
	}
	tr := DefaultTraffic(RouteName, APIKey)
	if jwtSet != nil {
		tr = jwtSet.traffic(tr)
	}
	for _, t := range targets {
		fmt.Fprintf(log, "loadtest: warming up %s for %s\n", t.name, o.Warmup)
		res := ClosedLoop(ctx, t.conns, tr, o.Concurrency, o.Warmup)
		if res.Requests == 0 {
			return nil, fmt.Errorf("warm-up of %s: no request succeeded: %s", t.name, strings.Join(res.TopErrors(), "; "))
		}
	}
	for run := 1; run <= o.Repeat; run++ {
		for _, rate := range o.Rates {
			for _, t := range targets {
				stopProfile := func() error { return nil }
				if o.ProfileDir != "" && run == 1 && t.name == targetKernel {
					stopProfile = profile(ctx, t, o.ProfileDir, fmt.Sprintf("open%g.", rate), min(o.ProfileFor, o.OpenFor), true)
				}
				row, err := measure(ctx, t, run, openPhase(rate), func() *Result {
					return OpenLoop(ctx, t.conns, tr, rate, o.OpenFor, o.MaxInFlight)
				})
				if err != nil {
					return nil, err
				}
				if err := stopProfile(); err != nil {
					return nil, err
				}
				rep.Rows = append(rep.Rows, row)
				fmt.Fprintf(log, "loadtest: run %d %s open loop at %g/s: %.0f req/s, p50 %d µs, p99 %d µs, %d errors\n", run, t.name, rate, row.RPS, row.P50us, row.P99us, row.Errors)
			}
		}
		for _, t := range targets {
			stopProfile := func() error { return nil }
			if o.ProfileDir != "" && run == 1 && t.name == targetKernel {
				stopProfile = profile(ctx, t, o.ProfileDir, "", min(o.ProfileFor, o.ClosedFor), false)
			}
			row, err := measure(ctx, t, run, phaseClosed, func() *Result {
				return ClosedLoop(ctx, t.conns, tr, o.Concurrency, o.ClosedFor)
			})
			if err != nil {
				return nil, err
			}
			if err := stopProfile(); err != nil {
				return nil, err
			}
			rep.Rows = append(rep.Rows, row)
			fmt.Fprintf(log, "loadtest: run %d %s closed loop: %.0f req/s, p99 %d µs, %d errors\n", run, t.name, row.RPS, row.P99us, row.Errors)
		}
	}
	// The memory phases come last, once per run, alternating the targets like the others, each
	// on processes of its own, started and warmed up as the first ones were: a process keeps
	// much of what 10,000 streams made it map, so a second phase on the same process would not
	// measure what the first did (and the loops after it would run on that memory).
	for _, t := range targets {
		t.stop()
	}
	for run := 1; o.Streams > 0 && run <= o.Repeat; run++ {
		for _, name := range o.Targets {
			t, err := startTarget(ctx, name, o, dir, reqChain, respChain, jwtSet, &started)
			if err != nil {
				return nil, err
			}
			if t.conns, err = Dial(t.addr, o.Conns); err != nil {
				return nil, err
			}
			res := ClosedLoop(ctx, t.conns, tr, o.Concurrency, o.Warmup)
			t.conns.Close()
			if res.Requests == 0 {
				return nil, fmt.Errorf("warm-up of %s: no request succeeded: %s", t.name, strings.Join(res.TopErrors(), "; "))
			}
			profileDir := ""
			if run == 1 {
				profileDir = o.ProfileDir
			}
			row, err := holdPhase(ctx, t, tr, run, o.Streams, profileDir)
			t.stop()
			if err != nil {
				return nil, err
			}
			rep.Rows = append(rep.Rows, row)
			fmt.Fprintf(log, "loadtest: run %d %s held %d streams\n", run, t.name, row.Requests)
		}
	}
	rep.setRatios(targetNoop)
	return rep, nil
}

// counters are a process's cumulative CPU time, context switches and read/write system calls.
type counters struct {
	cpu                time.Duration
	switches, syscalls int64
}

func readCounters(pid int) (counters, error) {
	var c counters
	var err error
	if c.cpu, err = CPUTime(pid); err != nil {
		return c, err
	}
	if c.switches, err = ContextSwitches(pid); err != nil {
		return c, err
	}
	c.syscalls, err = IOSyscalls(pid)
	return c, err
}

// measure runs one load phase against t and fills a row with its client-side results and the
// CPU and peak RSS of t's processes over it.
func measure(ctx context.Context, t *target, run int, phase string, load func() *Result) (Row, error) {
	row := Row{Run: run, Target: t.name, Phase: phase}
	before := make([]counters, len(t.procs))
	for i, p := range t.procs {
		if err := ResetPeakRSS(p.pid()); err != nil {
			return row, err
		}
		c, err := readCounters(p.pid())
		if err != nil {
			return row, err
		}
		before[i] = c
	}
	var hist0, calls0 vmHistogram
	if t.metricsURL != "" {
		h, c, err := scrapeHistograms(ctx, t.metricsURL)
		if err != nil {
			return row, err
		}
		hist0, calls0 = h, c
	}
	res := load()
	for i, p := range t.procs {
		c, err := readCounters(p.pid())
		if err != nil {
			return row, err
		}
		rss, err := PeakRSS(p.pid())
		if err != nil {
			return row, err
		}
		u := ProcUsage{Name: p.name, CPUSec: (c.cpu - before[i].cpu).Seconds(), PeakRSS: rss}
		if n := float64(res.Requests); n > 0 {
			u.CPUPer1k = u.CPUSec / n * 1000
			u.SwitchesPerReq = float64(c.switches-before[i].switches) / n
			u.SyscallsPerReq = float64(c.syscalls-before[i].syscalls) / n
		}
		row.CPUPer1k += u.CPUPer1k
		row.SwitchesPerReq += u.SwitchesPerReq
		row.SyscallsPerReq += u.SyscallsPerReq
		row.Procs = append(row.Procs, u)
	}
	if t.metricsURL != "" {
		h, c, err := scrapeHistograms(ctx, t.metricsURL)
		if err != nil {
			return row, err
		}
		if q, err := h.sub(hist0).quantile(0.99); err == nil && !math.IsNaN(q) {
			if math.IsInf(q, 1) {
				row.KernelP99Above = true
				q = h.topBound()
			}
			row.KernelP99us = q * 1e6
		}
		calls := c.sub(calls0)
		for _, v := range []struct {
			q   float64
			out *float64
		}{{0.5, &row.AgentCallP50us}, {0.99, &row.AgentCallP99us}} {
			if q, err := calls.quantile(v.q); err == nil && !math.IsNaN(q) && !math.IsInf(q, 1) {
				*v.out = q * 1e6
			}
		}
	}
	row.Requests, row.Errors, row.RPS = res.Requests, res.Errors, res.Rate()
	row.P50us, row.P99us, row.P999us = res.Quantile(50), res.Quantile(99), res.Quantile(99.9)
	row.Errs = res.TopErrors()
	return row, nil
}

// holdPhase opens n streams at once against t and reports each process's peak RSS while they
// are open.
// With profileDir set, the heap profile of each of the kernel target's processes is saved
// there while the streams are held, as <name>.streams.heap.pprof.
func holdPhase(ctx context.Context, t *target, tr *Traffic, run, n int, profileDir string) (Row, error) {
	row := Row{Run: run, Target: t.name, Phase: fmt.Sprintf("%s %d", phaseStreams, n)}
	for _, p := range t.procs {
		if err := ResetPeakRSS(p.pid()); err != nil {
			return row, err
		}
	}
	// Envoy allows 1024 streams per connection; the servers here allow as many.
	conns, err := Dial(t.addr, (n+999)/1000)
	if err != nil {
		return row, err
	}
	defer conns.Close()
	h := Hold(ctx, conns, tr, n, 256)
	time.Sleep(500 * time.Millisecond)
	for _, p := range t.procs {
		rss, err := PeakRSS(p.pid())
		if err != nil {
			h.Release()
			return row, err
		}
		row.Procs = append(row.Procs, ProcUsage{Name: p.name, PeakRSS: rss})
	}
	if t.metricsURL != "" {
		// What the kernel's memory is, while the streams are held.
		m, err := scrapeGauges(ctx, t.metricsURL, "go_memstats_heap_inuse_bytes", "go_memstats_stack_inuse_bytes", "go_goroutines")
		if err != nil {
			h.Release()
			return row, err
		}
		row.KernelMemory = &GoMemory{HeapInuse: int64(m[0]), StackInuse: int64(m[1]), Goroutines: int64(m[2])}
	}
	if profileDir != "" && t.name == targetKernel {
		for name, base := range t.pprof {
			if err := fetchTo(ctx, base+"heap", filepath.Join(profileDir, name+".streams.heap.pprof")); err != nil {
				h.Release()
				return row, err
			}
		}
	}
	h.Release()
	row.Requests, row.Errors = int64(h.Opened), int64(h.Errors)
	if h.FirstError != nil {
		row.Errs = []string{h.FirstError.Error()}
	}
	return row, nil
}

// chains names the chains of the load-test route: apiKeyAuth then rateLimit with a limit that
// is never hit (allowAll where the agent has no rateLimit policy), and addSecurityHeaders on
// the response.
func chains() (request, response string) {
	if _, ok := policy.Lookup("rateLimit"); ok {
		return "apiKeyAuth + rateLimit", "addSecurityHeaders"
	}
	return "apiKeyAuth + allowAll", "addSecurityHeaders"
}

func startTarget(ctx context.Context, name string, o *Options, dir, reqChain, respChain string, jwtSet *jwtSetup, started *[]*process) (*target, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	t := &target{name: name, addr: fmt.Sprintf("127.0.0.1:%d", port)}
	switch name {
	case targetNoop:
		p, err := startProcess(filepath.Join(o.BinDir, "extproc-noop"), []string{"-listen", t.addr}, "noop", dir)
		if err != nil {
			return nil, err
		}
		*started = append(*started, p)
		t.procs = []*process{p}
		if err := waitTCP(ctx, t.addr, p, o.StartTimeout); err != nil {
			return nil, err
		}
	case targetKernel, targetKernelUDS:
		socket := ""
		if name == targetKernelUDS {
			// Its own folder: configs, sockets and logs apart from the TCP run's.
			dir = filepath.Join(dir, "uds")
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return nil, fmt.Errorf("create work folder: %w", err)
			}
			ksock := filepath.Join(dir, "kernel.sock")
			t.addr = "unix://" + ksock
			socket = fmt.Sprintf("    socket_path: %q\n", ksock)
		}
		mport, err := freePort()
		if err != nil {
			return nil, err
		}
		aport, err := freePort()
		if err != nil {
			return nil, err
		}
		// The admin listeners serve the profiles.
		kadmin, err := freePort()
		if err != nil {
			return nil, err
		}
		aadmin, err := freePort()
		if err != nil {
			return nil, err
		}
		sock := filepath.Join(dir, "agent.sock")
		acfg := filepath.Join(dir, "agent-config.yaml")
		kcfg := filepath.Join(dir, "kernel-config.yaml")
		ac := agentConfig(sock, aport, aadmin)
		kc := kernelConfig(port, mport, kadmin, sock, reqChain, o.MessageTimeout, o.ExtraKernelYA)
		ac, kc = jwtSet.configs(ac, kc, o.Scenario == scenarioJWTCached)
		if err := os.WriteFile(acfg, []byte(ac), 0o600); err != nil {
			return nil, fmt.Errorf("write agent config: %w", err)
		}
		kc = strings.Replace(kc, kernelServerLine, kernelServerLine+socket, 1)
		if err := os.WriteFile(kcfg, []byte(kc), 0o600); err != nil {
			return nil, fmt.Errorf("write kernel config: %w", err)
		}
		agent, err := startProcess(filepath.Join(o.BinDir, "policy-agent"), []string{"-config", acfg}, "agent", dir, o.ServerEnv...)
		if err != nil {
			return nil, err
		}
		*started = append(*started, agent)
		kernel, err := startProcess(filepath.Join(o.BinDir, "policy-kernel"), []string{"-config", kcfg}, "kernel", dir, o.ServerEnv...)
		if err != nil {
			return nil, err
		}
		*started = append(*started, kernel)
		t.procs = []*process{kernel, agent}
		base := fmt.Sprintf("http://127.0.0.1:%d", mport)
		t.metricsURL = base + "/metrics"
		t.pprof = map[string]string{"kernel": fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/", kadmin), "agent": fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/", aadmin)}
		if err := waitReady(ctx, base+"/health/ready", kernel, o.StartTimeout); err != nil {
			return nil, err
		}
	}
	return t, nil
}

func agentConfig(sock string, mport, adminPort int) string {
	return fmt.Sprintf(`agent_core:
  name: "loadtest-agent"
  socket_path: %q
  server:
    max_concurrent_requests: 100000
  policies:
    config:
      apiKeyAuth:
        keys:
          - key: %q
            user_id: "loadtest-user"
  observability:
    log_level: "warn"
    metrics_address: "127.0.0.1:%d"
    admin_address: "127.0.0.1:%d"
    pprof_enabled: true  # the profiles of make profile, on admin_address
`, sock, APIKey, mport, adminPort)
}

// kernelAPIKeyEntry is the first entry of the request chain in the apikey scenario.
const kernelAPIKeyEntry = `        - policy: "apiKeyAuth"
          metadata:
            header_name: "X-API-Key"
            required: true
`

// kernelServerLine is a line of kernelConfig's server section, after which a setting is added.
const kernelServerLine = "    max_concurrent_streams: 1024\n"

func kernelConfig(port, mport, adminPort int, sock, reqChain string, messageTimeout time.Duration, extra string) string {
	second := `        - policy: "allowAll"`
	if strings.Contains(reqChain, "rateLimit") {
		second = `        - policy: "rateLimit"
          metadata:
            requests_per_second: 100000000
            burst: 100000000`
	}
	cfg := fmt.Sprintf(`policy_kernel:
  server:
    address: "127.0.0.1"
    port: %d
    max_concurrent_streams: 1024
    message_timeout_ms: %d
  agents:
    - name: "loadtest-agent"
      socket_path: %q
      timeout_ms: %d
  route_policies:
    - route_name: %q
      request_policy_chain:
%s%s
      response_policy_chain:
        - policy: "addSecurityHeaders"
  observability:
    metrics_address: "127.0.0.1"
    metrics_port: %d
    admin_port: %d
    log_level: "warn"
    pprof_enabled: true  # the profiles of make profile, on admin_port
`, port, messageTimeout.Milliseconds(), sock, messageTimeout.Milliseconds()*3/4, RouteName, kernelAPIKeyEntry, second, mport, adminPort)
	if extra != "" {
		cfg += extra + "\n"
	}
	return cfg
}

// process is a server process the load test started; stop ends it by its PID.
type process struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	log  string
}

func startProcess(bin string, args []string, name, dir string, env ...string) (*process, error) {
	logPath := filepath.Join(dir, name+".log")
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("create log of %s: %w", name, err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	// If the load test dies without stopping it, the kernel kills the child.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s (%s): %w", name, bin, err)
	}
	p := &process{name: name, cmd: cmd, done: make(chan struct{}), log: logPath}
	go func() {
		_ = cmd.Wait()
		lf.Close()
		close(p.done)
	}()
	return p, nil
}

func (p *process) pid() int { return p.cmd.Process.Pid }

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// tail returns the end of the process's log, for error messages.
func (p *process) tail() string {
	data, _ := os.ReadFile(p.log)
	if len(data) > 2000 {
		data = data[len(data)-2000:]
	}
	return strings.TrimSpace(string(data))
}

// stop sends SIGTERM, then SIGKILL if the process has not exited within 5 seconds.
func (p *process) stop() {
	if p.exited() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func waitTCP(ctx context.Context, addr string, p *process, timeout time.Duration) error {
	return waitFor(ctx, p, timeout, func() bool {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
}

func waitReady(ctx context.Context, url string, p *process, timeout time.Duration) error {
	client := &http.Client{Timeout: time.Second}
	return waitFor(ctx, p, timeout, func() bool {
		resp, err := client.Get(url)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

func waitFor(ctx context.Context, p *process, timeout time.Duration, ready func() bool) error {
	deadline := time.Now().Add(timeout)
	for !ready() {
		if p.exited() {
			return fmt.Errorf("%s exited during start-up: %s", p.name, p.tail())
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("%s not ready after %s: %s", p.name, timeout, p.tail())
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}

// scrapeGauges reads the values of unlabelled series from a /metrics page; a series not there
// is 0.
func scrapeGauges(ctx context.Context, url string, names ...string) ([]float64, error) {
	body, err := get(ctx, url)
	if err != nil {
		return nil, fmt.Errorf("scrape %w", err)
	}
	out := make([]float64, len(names))
	for line := range strings.SplitSeq(string(body), "\n") {
		name, value, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		for i, n := range names {
			if name == n {
				out[i], _ = strconv.ParseFloat(strings.TrimSpace(value), 64)
			}
		}
	}
	return out, nil
}

// scrapeHistograms reads the kernel's message durations and its agent call durations.
func scrapeHistograms(ctx context.Context, url string) (requests, calls vmHistogram, err error) {
	body, err := get(ctx, url)
	if err != nil {
		return nil, nil, fmt.Errorf("scrape %w", err)
	}
	if requests, err = parseVMHistogram(bytes.NewReader(body), "policy_kernel_request_duration_seconds"); err != nil {
		return nil, nil, err
	}
	if calls, err = parseVMHistogram(bytes.NewReader(body), "policy_kernel_agent_call_duration_seconds"); err != nil {
		return nil, nil, err
	}
	return requests, calls, nil
}

// traceSeconds is the length of the execution traces taken in the open loops: the kernel's and
// the agent's at the same time, for loadtest/cmd/crossing.
const traceSeconds = 2

// profile starts capturing a CPU profile of each of t's processes for d; the returned
// function waits for them, then saves a heap profile of each, into dir as
// <prefix><name>.cpu.pprof and <prefix><name>.heap.pprof. With withTrace, it also takes an
// execution trace of every process at the same time, <prefix><name>.trace.
func profile(ctx context.Context, t *target, dir, prefix string, d time.Duration, withTrace bool) func() error {
	n := len(t.pprof)
	if withTrace {
		n *= 2
	}
	errs := make(chan error, n)
	for name, base := range t.pprof {
		go func() {
			errs <- fetchTo(ctx, fmt.Sprintf("%sprofile?seconds=%d", base, max(1, int(d.Seconds()))), filepath.Join(dir, prefix+name+".cpu.pprof"))
		}()
		if withTrace {
			go func() {
				errs <- fetchTo(ctx, fmt.Sprintf("%strace?seconds=%d", base, traceSeconds), filepath.Join(dir, prefix+name+".trace"))
			}()
		}
	}
	return func() error {
		var all []error
		for range n {
			all = append(all, <-errs)
		}
		for name, base := range t.pprof {
			all = append(all, fetchTo(ctx, base+"heap", filepath.Join(dir, prefix+name+".heap.pprof")))
		}
		return errors.Join(all...)
	}
}

// get returns the body of a GET of url, which must answer 200; its errors name url.
func get(ctx context.Context, url string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", url, err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: status %d", url, resp.StatusCode)
	}
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", url, err)
	}
	return data, nil
}

// fetchTo saves the body of a GET of url to path.
func fetchTo(ctx context.Context, url, path string) error {
	data, err := get(ctx, url)
	if err != nil {
		return fmt.Errorf("fetch %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("create profile folder: %w", err)
	}
	return os.WriteFile(path, data, 0o644)
}

func machine() Machine {
	m := Machine{CPUs: runtime.NumCPU(), GoVersion: runtime.Version()}
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = "Linux " + strings.TrimSpace(string(data))
	}
	if data, err := os.ReadFile("/proc/loadavg"); err == nil {
		f := strings.Fields(string(data))
		if len(f) >= 3 {
			m.LoadAverage = strings.Join(f[:3], " ")
		}
	}
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(data), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	return m
}
