package faults

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// redisServer is a redis-server this test started, without persistence, stopped by PID.
type redisServer struct {
	addr string
	cmd  *exec.Cmd
}

// startRedis starts a redis-server on addr (a free loopback port when empty). Without the
// binary the test is skipped, except in CI (CI=true), which must have it.
func startRedis(t *testing.T, addr string) *redisServer {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("redis-server is not installed; CI must have it (.ci/run installs it): %v", err)
		}
		t.Skip("redis-server is not installed (Debian: apt-get install redis-server)")
	}
	if addr == "" {
		addr = testenv.FreeAddr(t)
	}
	_, port, _ := net.SplitHostPort(addr)
	r := &redisServer{addr: addr, cmd: exec.Command(bin, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", t.TempDir())}
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.kill)
	testenv.WaitFor(t, 10*time.Second, "redis-server to answer PING", func() bool {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
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
	})
	return r
}

func (r *redisServer) kill() {
	if r.cmd.ProcessState != nil {
		return
	}
	_ = r.cmd.Process.Signal(syscall.SIGCONT)
	_ = r.cmd.Process.Kill()
	_ = r.cmd.Wait()
}

const redisTimeout = 50 * time.Millisecond

const redisAgentYAML = `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  policies:
    config:
      rateLimit:
        redis: {address: "%s", timeout_ms: 50}
  observability:
    metrics_address: "{{AGENT_METRICS}}"
`

// redisRoutes limit far above the test's rate, so that every answer shows the backend's state
// only: each route decides a failed Redis call by its on_backend_error.
const redisRoutes = `policy_kernel:
  server: {message_timeout_ms: 500}
  agents:
    - name: a
      socket_path: "{{SOCK}}"
      timeout_ms: 400
      health_check_interval_ms: 2000
  route_policies:
%s`

func redisRoute(onError string) string {
	return fmt.Sprintf(`    - route_name: /%[1]s
      request_policy_chain:
        - policy: rateLimit
          metadata: {requests_per_second: 100000, burst: 100000, key: route, backend: redis, on_backend_error: %[1]s}
`, onError)
}

// TestRedisDown takes the rate limit's Redis away under traffic, first frozen (SIGSTOP: it
// accepts connections and never answers), then killed, then back. Each route answers as its
// on_backend_error says (local: the agent's own bucket, allow, deny: 503), no request waits
// longer than the Redis timeout and a margin, and with Redis back every route is decided by it
// again.
func TestRedisDown(t *testing.T) {
	redis := startRedis(t, "")
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: fmt.Sprintf(redisAgentYAML, redis.addr),
		KernelYAML: fmt.Sprintf(redisRoutes, redisRoute("local")+redisRoute("allow")+redisRoute("deny"))})
	c := dial(t, e)
	routes := []string{"/local", "/allow", "/deny"}
	phase := func(name string, d time.Duration, want map[string]string) {
		t.Helper()
		tr := startTraffic(c, 3, 5*time.Millisecond, func(w, n int) (string, *envoytest.Request) {
			r := routes[(w+n)%3]
			return r, request(r)
		})
		time.Sleep(d)
		shots := tr.finish()
		for _, s := range shots {
			if got := s.outcome(); got != want[s.route] {
				t.Errorf("%s: %s: %s, want %s", name, s.route, got, want[s.route])
			}
			if s.latency > redisTimeout+margin {
				t.Errorf("%s: %s: answered after %v; the Redis timeout is %v", name, s.route, s.latency, redisTimeout)
			}
		}
		tl := count(shots)
		tl.report(t, "Redis "+name)
		if tl.lost() != 0 {
			t.Errorf("%s: %d requests lost", name, tl.lost())
		}
	}
	up := map[string]string{"/local": "upstream", "/allow": "upstream", "/deny": "upstream"}
	down := map[string]string{"/local": "upstream", "/allow": "upstream", "/deny": "503 rate_limit_unavailable"}
	short := scale(time.Second, 5*time.Second)
	phase("up", short, up)
	if err := redis.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	phase("frozen (SIGSTOP)", short, down)
	if err := redis.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	redis.kill()
	phase("killed", short, down)
	// Every failed call was decided by its route's on_backend_error, and counted under it.
	for _, action := range []string{"local", "allow", "deny"} {
		if n := agentMetric(t, e, `policy_agent_ratelimit_backend_errors_total{policy="rateLimit",action="`+action+`"}`); n == 0 {
			t.Errorf("no backend error counted for on_backend_error %s", action)
		}
	}
	startRedis(t, redis.addr)
	testenv.WaitFor(t, 5*time.Second, "Redis to decide again", func() bool {
		return play(c, "/deny", request("/deny")).outcome() == "upstream"
	})
	phase("back", short, up)
	alive(t, e)
}
