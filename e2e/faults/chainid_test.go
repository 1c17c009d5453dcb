package faults

import (
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

// chainIDKernel is a kernel with one fail-closed agent: /keyed runs apiKeyAuth on the request
// and addSecurityHeaders on the response (a static chain the kernel answers itself).
const chainIDKernel = `policy_kernel:
  agents:
    - name: default-agent
      socket_path: "{{SOCK}}"
      timeout_ms: 400
      health_check_interval_ms: 500
  route_policies:
    - route_name: /keyed
      request_policy_chain: [{policy: apiKeyAuth}]
      response_policy_chain: [{policy: addSecurityHeaders}]
`

// TestAgentRestartChainIDs: the kernel sends a chain's policies once per agent stream and then
// its id alone; an agent killed and started again keeps nothing, and the kernel's new streams
// send the policies again before any id: after the restart a request without a key is still
// refused (an id the agent did not know must never run as an empty chain), a keyed one is
// served, and the static response chain still sets its headers.
func TestAgentRestartChainIDs(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: chainIDKernel})
	c := e.Dial(t, envoyConfig)
	staticRuns := func() float64 {
		return agentMetric(t, e, `policy_agent_executions_total{policy="addSecurityHeaders",status="ok"}`)
	}
	check := func(when string) {
		t.Helper()
		base := staticRuns()
		for range 5 {
			s := play(c, "/keyed", keyed("/keyed"))
			if !served(s) {
				t.Fatalf("%s: keyed request: %s", when, s.outcome())
			}
			if got := testenv.Header(s.res.Headers, "x-frame-options"); got != "DENY" {
				t.Fatalf("%s: x-frame-options %q, want the static response chain's DENY", when, got)
			}
			if s := play(c, "/keyed", request("/keyed")); s.outcome() != "401 unauthorized" {
				t.Fatalf("%s: request without a key: %s, want 401", when, s.outcome())
			}
		}
		if kept, named, unknown := agentMetric(t, e, `policy_agent_stream_chains_total{kind="kept"}`),
			agentMetric(t, e, `policy_agent_stream_chains_total{kind="named"}`),
			agentMetric(t, e, `policy_agent_stream_chains_total{kind="unknown"}`); kept < 1 || named < 1 || unknown != 0 {
			t.Fatalf("%s: agent kept %v chains, ran %v by id, %v unknown; want the chain sent once per stream, then by id", when, kept, named, unknown)
		}
		if n := staticRuns() - base; n != 0 {
			t.Fatalf("%s: the agent ran the static response chain %v times", when, n)
		}
	}
	check("first agent")
	e.Agent.Kill()
	e.StartAgent(t)
	// Until its health check finds the new agent up, the kernel sends the static chain to the
	// agent as any other (an agent found down answers as down): wait for the check too.
	testenv.WaitFor(t, 10*time.Second, "a keyed request served by the new agent, found healthy", func() bool {
		_, m := e.Get(t, "/metrics")
		return served(play(c, "/keyed", keyed("/keyed"))) && testenv.Metric(m, `policy_kernel_agent_health{agent="default-agent"}`) == 1
	})
	check("restarted agent")
	alive(t, e)
}
