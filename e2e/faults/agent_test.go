// Package faults is the fault suite: the real policy-kernel and policy-agent processes (and a
// test agent with misbehaving policies compiled in) under steady traffic from a client that
// behaves like Envoy's ext_proc filter, while the test kills, slows, restarts and reconfigures
// them. Every test counts the requests it sends and the answers it gets: the answer must be
// safe, come in bounded time, and no request may go unanswered.
//
// make test runs the short form; make faults (FAULTS_FULL=1) runs longer traffic and more
// cycles.
package faults

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
	"github.com/policy-engine/policy-engine/internal/testpolicies"
)

func TestMain(m *testing.M) { testenv.Main(m) }

const agentYAML = `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  policies:
    config:
      apiKeyAuth:
        keys: [{key: fault-key-1, user_id: fault-user}]
  observability:
    metrics_address: "{{AGENT_METRICS}}"
`

// twoAgents names the same agent process twice, once fail-closed and once fail-open, so that
// one run shows both behaviours, with the given agent timeout and message timeout.
func twoAgents(timeoutMS, messageTimeoutMS int, routes string) string {
	return fmt.Sprintf(`policy_kernel:
  server:
    message_timeout_ms: %[2]d
  agents:
    - name: closed
      socket_path: "{{SOCK}}"
      timeout_ms: %[1]d
      retry: {max_attempts: 3, backoff_ms: 10}
      health_check_interval_ms: 2000
    - name: open
      socket_path: "{{SOCK}}"
      timeout_ms: %[1]d
      retry: {max_attempts: 3, backoff_ms: 10}
      health_check_interval_ms: 2000
      fail_open: true
  route_policies:
%[3]s`, timeoutMS, messageTimeoutMS, routes)
}

// healthInterval is the agents' health_check_interval_ms.
const healthInterval = 2 * time.Second

const keyRoutes = `    - route_name: /closed
      agent: closed
      request_policy_chain: [{policy: apiKeyAuth}]
    - route_name: /open
      agent: open
      request_policy_chain: [{policy: apiKeyAuth}]
`

func keyed(path string) *envoytest.Request {
	return request(path, [2]string{"x-api-key", "fault-key-1"})
}

// served reports whether a request went through its chain normally: apiKeyAuth let it
// through and named its user.
func served(s shot) bool {
	return s.kernelAnswered() && s.res.Forwarded != nil && testenv.Header(s.res.Forwarded.Headers, "x-user-id") == "fault-user"
}

// TestAgentKilled kills the agent with SIGKILL under steady traffic, then starts it again.
// Fail-closed routes answer 500 within the agent timeout while it is gone, fail-open routes
// continue, no request waits for Envoy's message timeout, and once the agent is back every
// request is served normally within one health-check interval.
func TestAgentKilled(t *testing.T) {
	// The agent timeout leaves room for a busy machine: with the agent gone, calls fail at once
	// (the socket refuses them), far inside it.
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: twoAgents(400, 500, keyRoutes)})
	c := e.Dial(t, envoyConfig)
	before := map[string]int{"/closed": requestsCounted(t, e, "/closed"), "/open": requestsCounted(t, e, "/open")}
	tr := startTraffic(c, 4, 5*time.Millisecond, func(w, n int) (string, *envoytest.Request) {
		route := []string{"/closed", "/open"}[(w+n)%2]
		return route, keyed(route)
	})
	type window struct{ kill, back time.Time }
	var windows []window
	probes := 0
	for range scale(1, 3) {
		time.Sleep(scale(500*time.Millisecond, 2*time.Second))
		w := window{kill: time.Now()}
		e.Agent.Kill()
		time.Sleep(scale(700*time.Millisecond, 3*time.Second))
		e.StartAgent(t)
		w.back = time.Now()
		windows = append(windows, w)
		t.Logf("agent killed at %v, back at %v", w.kill.Format(time.StampMilli), w.back.Format(time.StampMilli))
		// Served again within one health-check interval of the agent being back.
		testenv.WaitFor(t, healthInterval, "a request served after the agent came back", func() bool {
			probes++
			return served(play(c, "/closed", keyed("/closed")))
		})
		t.Logf("served again %v after the agent was back", time.Since(w.back).Round(time.Millisecond))
	}
	time.Sleep(scale(500*time.Millisecond, 2*time.Second))
	shots := tr.finish()
	alive(t, e)

	down := func(s shot) bool {
		for _, w := range windows {
			if s.start.After(w.kill.Add(-time.Second)) && s.start.Before(w.back.Add(healthInterval)) {
				return true
			}
		}
		return false
	}
	for _, s := range shots {
		switch {
		case !s.kernelAnswered():
			t.Errorf("%s at %v: %s — every request must get the kernel's answer", s.route, s.start.Format(time.StampMilli), s.outcome())
		case s.latency > 400*time.Millisecond+margin:
			t.Errorf("%s: answered after %v, more than the agent timeout and a margin", s.route, s.latency)
		case served(s):
		case !down(s):
			t.Errorf("%s at %v, agent up: %s", s.route, s.start.Format(time.StampMilli), s.outcome())
		case s.route == "/closed":
			if got := s.outcome(); got != "500 policy_agent_unavailable" && got != "500 policy_agent_timeout" {
				t.Errorf("/closed with the agent gone: %s, want the configured deny", got)
			}
		case s.route == "/open":
			if s.res.Forwarded == nil || s.res.LocalReply {
				t.Errorf("/open with the agent gone: %s, want continue", s.outcome())
			}
		}
	}
	// Counted at both ends: every request the client sent is one the kernel counted.
	for route, n := range before {
		sent := 0
		for _, s := range shots {
			if s.route == route {
				sent++
			}
		}
		// The probes after each restart went to /closed.
		if route == "/closed" {
			sent += probes
		}
		if got := requestsCounted(t, e, route) - n; got != sent {
			t.Errorf("%s: client sent %d, kernel counted %d", route, sent, got)
		}
	}
	tl := count(shots)
	tl.report(t, "agent SIGKILL under traffic")
	if tl.lost() != 0 {
		t.Errorf("%d requests lost", tl.lost())
	}
	if tl.outcomes["500 policy_agent_unavailable"]+tl.outcomes["500 policy_agent_timeout"] == 0 {
		t.Error("no request met the dead agent: the kill came too late to test anything")
	}
}

// TestAgentSlow runs a policy that sleeps far past timeout_ms. The kernel answers within the
// agent timeout plus a small bound, the agent's call is cancelled (the policy sees its context
// end), the timeout is counted, and each chain ran exactly once although retries are allowed.
func TestAgentSlow(t *testing.T) {
	routes := `    - route_name: /closed
      agent: closed
      request_policy_chain: [{policy: testSleep, metadata: {sleep_ms: 3000}}]
    - route_name: /open
      agent: open
      request_policy_chain: [{policy: testSleep, metadata: {sleep_ms: 3000}}]
`
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: twoAgents(150, 200, routes),
		AgentBin: testenv.Build(t, testenv.TestAgentPackage)})
	c := e.Dial(t, envoyConfig)
	tr := startTraffic(c, 4, 10*time.Millisecond, func(w, n int) (string, *envoytest.Request) {
		route := []string{"/closed", "/open"}[(w+n)%2]
		return route, request(route)
	})
	time.Sleep(scale(time.Second, 5*time.Second))
	shots := tr.finish()
	alive(t, e)
	for _, s := range shots {
		switch {
		case !s.kernelAnswered():
			t.Errorf("%s: %s", s.route, s.outcome())
		case s.latency < 140*time.Millisecond || s.latency > 150*time.Millisecond+margin:
			t.Errorf("%s: answered after %v; the agent timeout is 150ms", s.route, s.latency)
		case s.route == "/closed" && s.outcome() != "500 policy_agent_timeout":
			t.Errorf("/closed: %s, want 500 policy_agent_timeout", s.outcome())
		case s.route == "/open" && (s.res.Forwarded == nil || s.res.LocalReply):
			t.Errorf("/open: %s, want continue", s.outcome())
		}
	}
	n := float64(len(shots))
	timeouts := metric(t, e, `policy_kernel_agent_timeouts_total{agent="closed"}`) + metric(t, e, `policy_kernel_agent_timeouts_total{agent="open"}`)
	if timeouts != n {
		t.Errorf("policy_kernel_agent_timeouts_total %v, want %v", timeouts, n)
	}
	// Each chain started once, and every one was cancelled rather than left to sleep on.
	testenv.WaitFor(t, 2*time.Second, "every sleeping policy to be cancelled", func() bool {
		return agentMetric(t, e, `policy_testagent_sleep_total{outcome="cancelled"}`) == n
	})
	if started := agentMetric(t, e, `policy_testagent_sleep_total{outcome="started"}`); started != n {
		t.Errorf("the slow policy started %v times for %v requests: a started chain ran again", started, n)
	}
	if done := agentMetric(t, e, `policy_testagent_sleep_total{outcome="completed"}`); done != 0 {
		t.Errorf("%v slow policies ran to their end after the kernel gave up", done)
	}
	tl := count(shots)
	tl.report(t, "agent slower than timeout_ms")
	if tl.lost() != 0 {
		t.Errorf("%d requests lost", tl.lost())
	}
}

// TestAgentRestartedWithOtherPolicies replaces the test agent with the production agent, which
// lacks the test policies: routes that name one turn invalid (denied with 500, logged), the
// others keep serving; with the test agent back, they are valid again.
func TestAgentRestartedWithOtherPolicies(t *testing.T) {
	routes := `    - route_name: /closed
      agent: closed
      request_policy_chain: [{policy: apiKeyAuth}]
    - route_name: /tagged
      agent: closed
      request_policy_chain: [{policy: testTag, metadata: {tag: t1}}]
`
	testAgent := testenv.Build(t, testenv.TestAgentPackage)
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: twoAgents(400, 500, routes), AgentBin: testAgent})
	c := e.Dial(t, envoyConfig)
	tagged := func() shot { return play(c, "/tagged", request("/tagged")) }
	if s := tagged(); s.outcome() != "upstream" || testenv.Header(s.res.Forwarded.Headers, testpolicies.TagHeader) != "t1" {
		t.Fatalf("/tagged with the test agent: %s", s.outcome())
	}
	tr := startTraffic(c, 2, 5*time.Millisecond, func(int, int) (string, *envoytest.Request) { return "/closed", keyed("/closed") })

	_, prodAgent := testenv.Binaries(t)
	e.Agent.Kill()
	e.StartAgentBin(t, prodAgent)
	back := time.Now()
	testenv.WaitFor(t, 2*healthInterval, "/tagged to turn invalid", func() bool {
		return tagged().outcome() == "500 invalid_route"
	})
	t.Logf("route invalid %v after the agent without the policy came back", time.Since(back).Round(time.Millisecond))
	if !strings.Contains(e.Kernel.Logs.String(), `policy \"testTag\" is not supported by agent \"closed\"`) {
		t.Errorf("the invalid route was not logged:\n%s", e.Kernel.Logs.String())
	}
	if _, ready := e.Get(t, "/health/ready"); !strings.Contains(ready, `testTag`) {
		t.Errorf("readiness does not name the invalid route: %s", ready)
	}

	e.Agent.Kill()
	e.StartAgentBin(t, testAgent)
	testenv.WaitFor(t, 2*healthInterval, "/tagged to be valid again", func() bool {
		return tagged().outcome() == "upstream"
	})
	time.Sleep(200 * time.Millisecond)
	shots := tr.finish()
	alive(t, e)
	for _, s := range shots {
		if !s.kernelAnswered() {
			t.Errorf("/closed: %s", s.outcome())
		}
		// While a replaced agent's policy set is being checked (it builds the chain entries
		// again), the route is refused as not validated: a refusal, never a pass.
		if o := s.outcome(); o != "upstream" && o != "500 policy_agent_unavailable" && o != "500 policy_agent_timeout" && o != "500 route_not_validated" {
			t.Errorf("/closed across the restarts: %s", o)
		}
	}
	tl := count(shots)
	tl.report(t, "agent restarted with another policy set (traffic on the route that stays valid)")
	if tl.lost() != 0 {
		t.Errorf("%d requests lost", tl.lost())
	}
	if tl.outcomes["upstream"] == 0 {
		t.Error("no request was served")
	}
}
