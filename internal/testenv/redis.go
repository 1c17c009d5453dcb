package testenv

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Redis is a real redis-server that a test started on a loopback port, without persistence.
// It is killed by its PID when the test ends.
type Redis struct {
	// Addr is its host:port.
	Addr string
	t    testing.TB
	bin  string
	dir  string
	cmd  *exec.Cmd
}

// StartRedis starts a redis-server on addr, a free loopback port when addr is empty, and waits
// until it answers PING. Without the binary the test is skipped, except in CI (CI=true), where
// a missing redis-server is a failure: .ci/run installs it.
func StartRedis(t testing.TB, addr string) *Redis {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("redis-server is not installed; CI must have it (.ci/run installs it): %v", err)
		}
		t.Skip("redis-server is not installed; install it (Debian: apt-get install redis-server) to run the Redis tests")
	}
	if addr == "" {
		addr = FreeAddr(t)
	}
	r := &Redis{Addr: addr, t: t, bin: bin, dir: t.TempDir()}
	r.Start()
	t.Cleanup(r.Kill)
	return r
}

// Start starts the server again, on the same address, after Kill.
func (r *Redis) Start() {
	r.t.Helper()
	_, port, err := net.SplitHostPort(r.Addr)
	if err != nil {
		r.t.Fatalf("redis-server address %q: %v", r.Addr, err)
	}
	r.cmd = exec.Command(r.bin, "--port", port, "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", r.dir, "--daemonize", "no")
	r.cmd.Stdout, r.cmd.Stderr = io.Discard, io.Discard
	if err := r.cmd.Start(); err != nil {
		r.t.Fatalf("start redis-server: %v", err)
	}
	deadline := time.Now().Add(StartTimeout)
	for !r.answers() {
		if time.Now().After(deadline) {
			r.Kill()
			r.t.Fatalf("redis-server on %s did not answer PING within %v", r.Addr, StartTimeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// answers reports whether the server answers PING.
func (r *Redis) answers() bool {
	c, err := net.DialTimeout("tcp", r.Addr, 200*time.Millisecond)
	if err != nil {
		return false
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return false
	}
	b := make([]byte, 7)
	n, _ := io.ReadFull(c, b)
	return string(b[:n]) == "+PONG\r\n"
}

// PID returns the process id of the running server.
func (r *Redis) PID() int { return r.cmd.Process.Pid }

// Kill kills the server by its PID, paused or not, and reaps it; it does nothing when the
// server is not running.
func (r *Redis) Kill() {
	if r.cmd == nil {
		return
	}
	_ = r.cmd.Process.Kill()
	_ = r.cmd.Wait()
	r.cmd = nil
}

// Pause stops the process (SIGSTOP): connections stay open and nothing is answered, like a
// Redis stuck on a slow command. The signal takes effect asynchronously, so Pause waits until
// the process shows as stopped (state T in /proc), and Resume until it no longer does.
func (r *Redis) Pause() {
	r.t.Helper()
	_ = r.cmd.Process.Signal(syscall.SIGSTOP)
	r.waitState(true)
}

// Resume continues a paused server (SIGCONT).
func (r *Redis) Resume() {
	r.t.Helper()
	_ = r.cmd.Process.Signal(syscall.SIGCONT)
	r.waitState(false)
}

func (r *Redis) waitState(stopped bool) {
	r.t.Helper()
	stat := fmt.Sprintf("/proc/%d/stat", r.PID())
	deadline := time.Now().Add(StartTimeout)
	for {
		b, err := os.ReadFile(stat)
		if err != nil {
			time.Sleep(100 * time.Millisecond) // no /proc: give the signal time to land
			return
		}
		// The state follows the command name, which is in parentheses.
		fields := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		if len(fields) > 0 && (fields[0] == "T") == stopped {
			return
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("redis-server did not reach stopped=%v within %v: %s", stopped, StartTimeout, b)
		}
		time.Sleep(time.Millisecond)
	}
}
