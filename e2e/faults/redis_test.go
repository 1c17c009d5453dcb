package faults

import (
	"fmt"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

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
	redis := testenv.StartRedis(t, "")
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: fmt.Sprintf(redisAgentYAML, redis.Addr),
		KernelYAML: fmt.Sprintf(redisRoutes, redisRoute("local")+redisRoute("allow")+redisRoute("deny"))})
	c := e.Dial(t, envoyConfig)
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
	redis.Pause()
	phase("frozen (SIGSTOP)", short, down)
	redis.Resume()
	redis.Kill()
	phase("killed", short, down)
	// Every failed call was decided by its route's on_backend_error, and counted under it.
	for _, action := range []string{"local", "allow", "deny"} {
		if n := agentMetric(t, e, `policy_agent_ratelimit_backend_errors_total{policy="rateLimit",action="`+action+`"}`); n == 0 {
			t.Errorf("no backend error counted for on_backend_error %s", action)
		}
	}
	redis.Start()
	testenv.WaitFor(t, 5*time.Second, "Redis to decide again", func() bool {
		return play(c, "/deny", request("/deny")).outcome() == "upstream"
	})
	phase("back", short, up)
	alive(t, e)
}
