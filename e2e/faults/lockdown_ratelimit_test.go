package faults

import (
	"fmt"
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

const lockdownRateLimitAgentYAML = `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  policies:
    config:
      rateLimit:
        max_local_buckets: 4
  observability:
    metrics_address: "{{AGENT_METRICS}}"
`

const lockdownRateLimitKernelYAML = `policy_kernel:
  agents:
    - name: a
      socket_path: "{{SOCK}}"
      timeout_ms: 150
      health_check_interval_ms: 200
  route_policies:
    - route_name: /limited
      request_policy_chain:
        - {policy: rateLimit, metadata: {requests_per_second: 0.01, burst: 2, key: "header:x-tenant"}}
`

// TestLockdownRateLimitOverflow: a client minting key values gets a full bucket for each new
// one until the store is full (max_local_buckets 4); past that, every new key shares the
// overflow bucket (one burst of 2 between them), and each request it decides is counted in
// policy_agent_ratelimit_local_overflow_total, which the agent describes with HELP and TYPE.
func TestLockdownRateLimitOverflow(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: lockdownRateLimitAgentYAML, KernelYAML: lockdownRateLimitKernelYAML})
	c := e.Dial(t, envoyConfig)
	const series = `policy_agent_ratelimit_local_overflow_total{policy="rateLimit"}`
	before := agentMetric(t, e, series)
	passed := func(key string, n int) int {
		ok := 0
		for range n {
			s := play(c, "/limited", request("/limited", [2]string{"x-tenant", key}))
			switch s.outcome() {
			case "upstream":
				ok++
			case "429 rate_limited":
			default:
				t.Fatalf("key %s: %s", key, s.outcome())
			}
		}
		return ok
	}
	// Four keys fill the store, each with its own full bucket.
	for i := range 4 {
		if n := passed(fmt.Sprintf("minted-%d", i), 3); n != 2 {
			t.Fatalf("key %d: %d of 3 passed, want its burst of 2", i, n)
		}
	}
	if n := agentMetric(t, e, series) - before; n != 0 {
		t.Fatalf("overflow counted %v before the store was full", n)
	}
	// Six more keys: all share one overflow bucket of 2.
	total := 0
	for i := 4; i < 10; i++ {
		total += passed(fmt.Sprintf("minted-%d", i), 1)
	}
	if total != 2 {
		t.Fatalf("%d of 6 requests on new keys passed with the store full, want the overflow burst of 2", total)
	}
	if n := agentMetric(t, e, series) - before; n != 6 {
		t.Fatalf("overflow counted %v, want 6", n)
	}
	_, body := e.GetAgent(t, "/metrics")
	for _, line := range []string{"# HELP policy_agent_ratelimit_local_overflow_total Rate-limit requests decided by a shared overflow bucket", "# TYPE policy_agent_ratelimit_local_overflow_total counter"} {
		if !strings.Contains(body, line) {
			t.Fatalf("agent /metrics lacks %q", line)
		}
	}
}
