// Package testenv runs the real policy-agent and policy-kernel binaries for integration tests:
// it builds them once per test process, starts them on temporary Unix sockets and free loopback
// ports, waits until they serve, and stops every process it started, by PID, when the test
// ends. It also runs kernel.Main or agent.Main in the test's process (RunMain) and a real
// redis-server (StartRedis), and holds the helpers the tests of every package share.
package testenv

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/envoytest"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error

	extraMu    sync.Mutex
	extraBuilt = map[string]string{} // package path → binary
)

// TestAgentPackage is the agent with the misbehaving test policies compiled in.
const TestAgentPackage = "github.com/policy-engine/policy-engine/internal/testpolicies/cmd/policy-testagent"

// Main runs a test package's tests and removes the binaries built for them.
func Main(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// Binaries builds the kernel and agent once per test process and returns their paths.
func Binaries(t testing.TB) (kernel, agent string) {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "policy-engine-bin-")
		if buildErr != nil {
			return
		}
		cmd := exec.Command("go", "build", "-o", binDir+string(os.PathSeparator),
			"github.com/policy-engine/policy-engine/cmd/policy-kernel",
			"github.com/policy-engine/policy-engine/cmd/policy-agent")
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(binDir, "policy-kernel"), filepath.Join(binDir, "policy-agent")
}

// Build builds the main package pkg once per test process, next to the kernel and agent, and
// returns the binary's path.
func Build(t testing.TB, pkg string) string {
	t.Helper()
	Binaries(t)
	extraMu.Lock()
	defer extraMu.Unlock()
	if bin, ok := extraBuilt[pkg]; ok {
		return bin
	}
	dir, err := os.MkdirTemp(binDir, "pkg-")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("go", "build", "-o", dir+string(os.PathSeparator), pkg).CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, out)
	}
	bin := filepath.Join(dir, filepath.Base(pkg))
	extraBuilt[pkg] = bin
	return bin
}

// SyncBuffer collects a process's output; safe for concurrent use.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String returns everything written so far.
func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// ending is how a process or a Main ends: done is closed once it has, and err is then what it
// returned.
type ending struct {
	done chan struct{}
	err  error
}

func newEnding() ending { return ending{done: make(chan struct{})} }

// end records the result; it is called once.
func (e *ending) end(err error) {
	e.err = err
	close(e.done)
}

// Exited reports whether it has ended.
func (e *ending) Exited() bool {
	select {
	case <-e.done:
		return true
	default:
		return false
	}
}

// Wait waits up to timeout for the end and returns its error; false when it has not ended.
func (e *ending) Wait(timeout time.Duration) (error, bool) {
	select {
	case <-e.done:
		return e.err, true
	case <-time.After(timeout):
		return nil, false
	}
}

// Proc is a started process.
type Proc struct {
	Cmd  *exec.Cmd
	Logs *SyncBuffer
	ending
}

// Start starts bin with args; the process is stopped (SIGTERM, then SIGKILL after 10 s) when the
// test ends.
func Start(t testing.TB, bin string, env []string, args ...string) *Proc {
	t.Helper()
	p := &Proc{Cmd: exec.Command(bin, args...), Logs: &SyncBuffer{}, ending: newEnding()}
	p.Cmd.Stdout = p.Logs
	p.Cmd.Stderr = p.Logs
	p.Cmd.Env = append(os.Environ(), env...)
	// A child of the process that outlives it keeps its output pipe open; Wait does not wait
	// for that longer than this once the process itself has ended.
	p.Cmd.WaitDelay = time.Second
	if err := p.Cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	go func() { p.end(p.Cmd.Wait()) }()
	t.Cleanup(func() { p.Stop(t) })
	return p
}

// PID returns the process id.
func (p *Proc) PID() int { return p.Cmd.Process.Pid }

// Signal sends sig to the process.
func (p *Proc) Signal(sig os.Signal) error { return p.Cmd.Process.Signal(sig) }

// Stop ends the process: SIGTERM, then SIGKILL if it has not ended within 10 s.
func (p *Proc) Stop(t testing.TB) {
	if p.Exited() {
		return
	}
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	if _, ok := p.Wait(10 * time.Second); !ok {
		_ = p.Cmd.Process.Kill()
		p.Wait(5 * time.Second)
		t.Errorf("process %d did not stop on SIGTERM; killed. Output:\n%s", p.PID(), p.Logs.String())
	}
}

// Kill ends the process with SIGKILL and waits for it.
func (p *Proc) Kill() {
	_ = p.Cmd.Process.Kill()
	p.Wait(5 * time.Second)
}

// Output returns what the process has written so far.
func (p *Proc) Output() string { return p.Logs.String() }

// Reload sends SIGHUP to the process and waits until its log holds one more line with any of
// want; it returns the one that came.
func (p *Proc) Reload(t testing.TB, want ...string) string {
	t.Helper()
	return signalAndWait(t, p.Logs, func() error { return p.Signal(syscall.SIGHUP) }, want)
}

// signalAndWait calls signal and waits up to StartTimeout until logs hold one more occurrence
// of any of want than before; it returns the one that came.
func signalAndWait(t testing.TB, logs *SyncBuffer, signal func() error, want []string) string {
	t.Helper()
	count := func() []int {
		s := logs.String()
		n := make([]int, len(want))
		for i, w := range want {
			n[i] = strings.Count(s, w)
		}
		return n
	}
	before := count()
	if err := signal(); err != nil {
		t.Fatal(err)
	}
	var got string
	WaitFor(t, StartTimeout, fmt.Sprintf("one more line with one of %q in the log", want), func() bool {
		for i, n := range count() {
			if n > before[i] {
				got = want[i]
				return true
			}
		}
		return false
	})
	return got
}

// Running is a process, or a Main run in the test's process, that a test waits on.
type Running interface {
	// Exited reports whether it has ended.
	Exited() bool
	// Output returns its log so far.
	Output() string
}

// StartTimeout bounds the waits for a process to start serving and for a reload to show in
// its log: generous, for a loaded machine running the race detector.
const StartTimeout = 15 * time.Second

// Dialable reports whether addr accepts a connection on network ("tcp" or "unix").
func Dialable(network, addr string) bool {
	c, err := net.DialTimeout(network, addr, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// WaitDial waits up to StartTimeout until addr accepts connections on network. It fails the
// test at once, with r's output, when r ends first.
func WaitDial(t testing.TB, r Running, network, addr string) {
	t.Helper()
	WaitFor(t, StartTimeout, network+" "+addr+" to accept connections", func() bool {
		if r.Exited() {
			t.Fatalf("ended before serving on %s:\n%s", addr, r.Output())
		}
		return Dialable(network, addr)
	})
}

// WaitFor polls cond every 20 ms until it holds or timeout passes.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Env is an agent and a kernel started together.
type Env struct {
	Dir         string
	AgentSock   string
	AgentConfig string
	// KernelConfig is the path of the kernel's config; rewrite it and send SIGHUP to reload.
	KernelConfig string
	KernelAddr   string
	MetricsAddr  string
	// AdminAddr is the kernel's admin listener (--admin-listen): /config, /debug/explain,
	// /debug/pprof/.
	AdminAddr    string
	AgentMetrics string
	// AgentAdmin is a free address for the agent's admin listener, "{{AGENT_ADMIN}}" in its
	// config (observability.admin_address).
	AgentAdmin string
	Agent      *Proc
	Kernel     *Proc
	AgentEnv   []string
	// watchArgs are the -watch-config flags both binaries get.
	watchArgs []string
	kernelBin string
	agentBin  string
}

// AgentBin returns the agent binary the environment starts.
func (e *Env) AgentBin() string { return e.agentBin }

// Options configure StartEnv. The configs may use the placeholders {{SOCK}} (the agent's
// socket), {{DIR}} (a temporary directory), {{AGENT_METRICS}} and {{AGENT_ADMIN}} (free
// addresses for the agent's metrics and admin listeners).
type Options struct {
	AgentYAML  string
	KernelYAML string
	AgentEnv   []string
	// NoAgent leaves the agent to the test.
	NoAgent bool
	// AgentBin is the agent binary to run; empty means policy-agent. Build makes one.
	AgentBin string
	// NotReady is a kernel config that cannot serve every route (one is invalid on purpose),
	// so the kernel never becomes ready: StartEnv waits until it listens only.
	NotReady bool
	// WatchConfig leaves the binaries' config watching on (-watch-config). Off by default, so
	// that a test that rewrites a config decides with SIGHUP when it is read.
	WatchConfig bool
}

// StartEnv writes the configs, starts the agent, waits for its socket, starts the kernel on a
// free port, and waits until the kernel is ready.
func StartEnv(t testing.TB, o Options) *Env {
	t.Helper()
	kbin, abin := Binaries(t)
	dir, err := os.MkdirTemp("", "pe-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	e := &Env{
		Dir: dir, AgentSock: filepath.Join(dir, "agent.sock"),
		AgentConfig: filepath.Join(dir, "agent.yaml"), KernelConfig: filepath.Join(dir, "kernel.yaml"),
		KernelAddr: FreeAddr(t), MetricsAddr: FreeAddr(t), AdminAddr: FreeAddr(t), AgentMetrics: FreeAddr(t), AgentAdmin: FreeAddr(t),
		AgentEnv: o.AgentEnv, kernelBin: kbin, agentBin: abin,
	}
	if o.AgentBin != "" {
		e.agentBin = o.AgentBin
	}
	if !o.WatchConfig {
		e.watchArgs = []string{"--watch-config=false"}
	}
	e.WriteConfig(t, e.AgentConfig, o.AgentYAML)
	e.WriteConfig(t, e.KernelConfig, o.KernelYAML)
	if !o.NoAgent {
		e.StartAgent(t)
	}
	e.Kernel = Start(t, kbin, nil, append([]string{"--config", e.KernelConfig, "--listen", e.KernelAddr, "--metrics-listen", e.MetricsAddr, "--admin-listen", e.AdminAddr, "--agent-wait", "5s"}, e.watchArgs...)...)
	WaitDial(t, e.Kernel, "tcp", e.KernelAddr)
	if !o.NoAgent && !o.NotReady {
		WaitFor(t, StartTimeout, "the kernel to be ready", func() bool { code, _ := e.Get(t, "/health/ready"); return code == 200 })
	}
	return e
}

// Expand fills in the placeholders of a config.
func (e *Env) Expand(s string) string {
	return strings.NewReplacer("{{SOCK}}", e.AgentSock, "{{DIR}}", e.Dir, "{{AGENT_METRICS}}", e.AgentMetrics, "{{AGENT_ADMIN}}", e.AgentAdmin).Replace(s)
}

// WriteConfig writes a config with its placeholders filled in.
func (e *Env) WriteConfig(t testing.TB, path, yaml string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(e.Expand(yaml)), 0o600); err != nil {
		t.Fatal(err)
	}
}

// StartAgent starts (or restarts) the agent and waits for its socket to accept connections.
func (e *Env) StartAgent(t testing.TB) {
	t.Helper()
	e.StartAgentBin(t, e.agentBin)
}

// StartAgentBin starts (or restarts) the agent from another binary, such as one with a
// different set of compiled-in policies, and waits for its socket to accept connections.
func (e *Env) StartAgentBin(t testing.TB, bin string) {
	t.Helper()
	e.Agent = Start(t, bin, e.AgentEnv, append([]string{"--config", e.AgentConfig}, e.watchArgs...)...)
	WaitDial(t, e.Agent, "unix", e.AgentSock)
}

// Dial connects a client that behaves like Envoy's ext_proc filter, configured by cfg, to the
// kernel; it is closed when the test ends.
func (e *Env) Dial(t testing.TB, cfg envoytest.FilterConfig) *envoytest.Client {
	t.Helper()
	c, err := envoytest.Dial(e.KernelAddr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Get fetches a path from the kernel's metrics listener.
func (e *Env) Get(t testing.TB, path string) (int, string) {
	t.Helper()
	return HTTPGet("http://" + e.MetricsAddr + path)
}

// GetAdmin fetches a path from the kernel's admin listener.
func (e *Env) GetAdmin(t testing.TB, path string) (int, string) {
	t.Helper()
	return HTTPGet("http://" + e.AdminAddr + path)
}

// GetAgentAdmin fetches a path from the agent's admin listener (observability.admin_address,
// "{{AGENT_ADMIN}}" in the agent's config).
func (e *Env) GetAgentAdmin(t testing.TB, path string) (int, string) {
	t.Helper()
	return HTTPGet("http://" + e.AgentAdmin + path)
}

// GetAgent fetches a path from the agent's metrics listener (observability.metrics_address,
// "{{AGENT_METRICS}}" in the agent's config).
func (e *Env) GetAgent(t testing.TB, path string) (int, string) {
	t.Helper()
	return HTTPGet("http://" + e.AgentMetrics + path)
}

// HTTPGet fetches url within 5 s and returns the status and the body; when the request fails,
// the status is 0 and the body says why.
func HTTPGet(url string) (int, string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err.Error()
	}
	r, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer r.Body.Close()
	b, _ := io.ReadAll(r.Body)
	return r.StatusCode, string(b)
}

// Reload sends SIGHUP to the kernel and waits until its log shows one more line containing
// want.
func (e *Env) Reload(t testing.TB, want string) {
	t.Helper()
	e.Kernel.Reload(t, want)
}

// Header returns the value of the first header called name (in any case) in hs, or "".
func Header(hs [][2]string, name string) string {
	for _, h := range hs {
		if strings.EqualFold(h[0], name) {
			return h[1]
		}
	}
	return ""
}
