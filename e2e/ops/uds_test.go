package ops

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

// TestKernelOnUnixSocket serves ext_proc on a Unix socket (server.socket_path, mode 0660), as
// in a pod where Envoy reaches the kernel on a pipe address: a stale socket file left by a dead
// kernel is replaced, the socket gets the mode asked for, the Envoy-faithful client's requests
// pass over it, a second kernel on the same socket is refused, and the socket is gone once the
// kernel stopped.
func TestKernelOnUnixSocket(t *testing.T) {
	kbin, abin := testenv.Binaries(t)
	dir := t.TempDir()
	e := &testenv.Env{
		Dir: dir, AgentSock: filepath.Join(dir, "agent.sock"), AgentConfig: filepath.Join(dir, "agent.yaml"),
		KernelConfig: filepath.Join(dir, "kernel.yaml"), MetricsAddr: testenv.FreeAddr(t), AgentMetrics: testenv.FreeAddr(t),
	}
	sock := filepath.Join(dir, "ext-proc", "kernel.sock")
	e.KernelAddr = "unix://" + sock
	e.WriteConfig(t, e.AgentConfig, agentYAML)
	kc := strings.Replace(fmt.Sprintf(kernelYAML, "u1"), "    message_timeout_ms: 2000\n",
		"    message_timeout_ms: 2000\n    socket_path: "+sock+"\n    socket_mode: \"0660\"\n", 1)
	e.WriteConfig(t, e.KernelConfig, kc)

	// A socket file whose kernel died.
	if err := os.MkdirAll(filepath.Dir(sock), 0o750); err != nil {
		t.Fatal(err)
	}
	stale, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()

	e.Agent = testenv.Start(t, abin, nil, "--config", e.AgentConfig)
	testenv.WaitDial(t, e.Agent, "unix", e.AgentSock)
	e.Kernel = testenv.Start(t, kbin, nil, "--config", e.KernelConfig, "--metrics-listen", e.MetricsAddr, "--admin-listen", "127.0.0.1:0", "--agent-wait", "5s")
	testenv.WaitDial(t, e.Kernel, "unix", sock)
	testenv.WaitFor(t, testenv.StartTimeout, "the kernel to be ready", func() bool { code, _ := e.Get(t, "/health/ready"); return code == 200 })

	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket mode %v, want a socket with mode 0660", fi.Mode())
	}
	if !strings.Contains(e.Kernel.Output(), `"address":"`+sock+`"`) {
		t.Errorf("the kernel does not log the socket it serves on:\n%s", e.Kernel.Output())
	}

	c := e.Dial(t, envoyConfig)
	for i := 0; i < 20; i++ {
		r := do(t, c)
		if r.Status != 200 || r.Forwarded == nil || !hasHeader(r.Forwarded.Headers, "x-user-id", "demo-user") {
			t.Fatalf("request %d over the socket: status %d, details %s", i, r.Status, r.Details)
		}
		if v := testenv.Header(r.Headers, "x-config-version"); v != "u1" {
			t.Fatalf("response chain did not run: x-config-version %q", v)
		}
	}

	// A second kernel, given the socket with --listen, does not take it from the first.
	second := testenv.Start(t, kbin, nil, "--config", e.KernelConfig, "--listen", "unix://"+sock,
		"--metrics-listen", testenv.FreeAddr(t), "--admin-listen", "127.0.0.1:0", "--agent-wait", "1s", "--watch-config=false")
	if err, ok := second.Wait(testenv.StartTimeout); !ok || err == nil {
		t.Fatalf("a second kernel on a live socket did not fail (%v):\n%s", err, second.Output())
	}
	if out := second.Output(); !strings.Contains(out, "is in use by another process") {
		t.Fatalf("second kernel's error:\n%s", out)
	}
	if r := do(t, c); r.Status != 200 {
		t.Fatalf("the first kernel stopped serving: %d", r.Status)
	}

	if err := e.Kernel.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if _, ok := e.Kernel.Wait(15 * time.Second); !ok {
		t.Fatal("the kernel did not stop")
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Fatalf("the socket outlived the kernel: %v", err)
	}
}
