package faults

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// failureKernelYAML names the agent twice, fail-closed ("closed", the routes' default) and
// fail-open ("open"), with the given timeout and message timeout, and routes.
func failureKernelYAML(timeoutMS, messageTimeoutMS int, routes string) string {
	return fmt.Sprintf(`policy_kernel:
  server:
    message_timeout_ms: %[2]d
  agents:
    - name: closed
      socket_path: "{{SOCK}}"
      timeout_ms: %[1]d
      health_check_interval_ms: 2000
    - name: open
      socket_path: "{{SOCK}}"
      timeout_ms: %[1]d
      health_check_interval_ms: 2000
      fail_open: true
  route_policies:
%[3]s`, timeoutMS, messageTimeoutMS, routes)
}

// failureRoutes are chains in which a failing entry's on_failure would, if honoured, let a
// request past a policy that refuses it, and chains whose first policy reports a failing
// status without a Go error.
const failureRoutes = `    - route_name: /jwt-continue
      request_policy_chain:
        - {policy: jwtValidation, metadata: {jwks_file: "{{DIR}}/missing-jwks.json"}, on_failure: continue}
    - route_name: /jwt-skip
      request_policy_chain:
        - {policy: jwtValidation, metadata: {jwks_file: "{{DIR}}/missing-jwks.json"}, on_failure: skip_remaining}
        - {policy: allowAll}
    - route_name: /skip-then-key
      request_policy_chain:
        - {policy: testPanic, on_failure: skip_remaining}
        - {policy: testTag, metadata: {tag: skipped}}
        - {policy: apiKeyAuth}
    - route_name: /status-error
      request_policy_chain:
        - {policy: testStatus, metadata: {status: POLICY_ERROR}}
        - {policy: allowAll}
    - route_name: /status-error-continue
      request_policy_chain:
        - {policy: testStatus, metadata: {status: POLICY_ERROR}, on_failure: continue}
        - {policy: testTag, metadata: {tag: continued}}
    - route_name: /status-timeout
      request_policy_chain:
        - {policy: testStatus, metadata: {status: TIMEOUT}, on_failure: continue}
        - {policy: allowAll}
    - route_name: /status-unknown
      request_policy_chain:
        - {policy: testStatus, metadata: {status: "7"}}
        - {policy: allowAll}
    - route_name: /enforcing-continue
      request_policy_chain:
        - {policy: testFailEnforcing, on_failure: continue}
    - route_name: /enforcing-skip
      request_policy_chain:
        - {policy: testFailEnforcing, on_failure: skip_remaining}
        - {policy: allowAll}
`

// TestBypassOnFailure attacks a chain through its entries' on_failure: a policy that
// authenticates and cannot be built (its key file is missing) must refuse whatever its
// on_failure says (the kernel refuses the route before the agent is asked: the agent would not
// build the entry), one that authenticates and fails at run time likewise, a skip_remaining before apiKeyAuth must not skip apiKeyAuth, and a policy
// that answers POLICY_ERROR, TIMEOUT or a status code the agent does not know, without a Go
// error, must fail its chain like the failure it names instead of letting the next entry allow.
func TestBypassOnFailure(t *testing.T) {
	// The jwtValidation routes cannot be built, so the kernel is never ready: wait until it
	// has checked them against the agent instead.
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: failureKernelYAML(400, 1000, failureRoutes),
		AgentBin: testenv.Build(t, testenv.TestAgentPackage), NotReady: true})
	testenv.WaitFor(t, testenv.StartTimeout, "the routes to be checked against the agent", func() bool {
		code, body := e.Get(t, "/health/ready")
		return code == 503 && strings.Contains(body, `"invalid_routes"`) && !strings.Contains(body, "unvalidated") && !strings.Contains(body, "is not reachable")
	})
	c := e.Dial(t, envoyConfig)
	f := func(req *envoytest.Request, want string, wantHeaders map[string]string) {
		t.Helper()
		s := play(c, req.Path, req)
		if got := s.outcome(); got != want {
			t.Errorf("%s: %s, want %s", req.Path, got, want)
			return
		}
		for k, v := range wantHeaders {
			if got := testenv.Header(s.res.Forwarded.Headers, k); got != v {
				t.Errorf("%s: upstream header %s = %q, want %q", req.Path, k, got, v)
			}
		}
	}
	f(request("/jwt-continue", [2]string{"authorization", "Bearer a.b.c"}), "500 invalid_route", nil)
	f(request("/jwt-skip"), "500 invalid_route", nil)
	f(request("/enforcing-continue"), "500 policy_error", nil)
	f(request("/enforcing-skip"), "500 policy_error", nil)
	f(request("/skip-then-key", [2]string{"x-api-key", "wrong-key"}), "403 forbidden", nil)
	f(request("/skip-then-key"), "401 unauthorized", nil)
	// skip_remaining still skips what does not enforce: the tag is not set, the key is checked.
	f(request("/skip-then-key", [2]string{"x-api-key", "fault-key-1"}), "upstream",
		map[string]string{"x-user-id": "fault-user", "x-test-tag": ""})
	f(request("/status-error"), "500 policy_error", nil)
	// A policy that enforces nothing keeps its on_failure: continue goes on to the next entry.
	f(request("/status-error-continue"), "upstream", map[string]string{"x-test-tag": "continued"})
	f(request("/status-timeout"), "500 policy_agent_timeout", nil)
	f(request("/status-unknown"), "500 policy_error", nil)
	alive(t, e)

	if n := agentMetric(t, e, `policy_agent_fail_closed_total{policy="testFailEnforcing"}`); n != 2 {
		t.Errorf("policy_agent_fail_closed_total{policy=testFailEnforcing} = %v, want 2", n)
	}
	if n := agentMetric(t, e, `policy_agent_policy_failures_total{policy="testStatus",reason="timeout"}`); n != 1 {
		t.Errorf("testStatus timeouts counted: %v, want 1", n)
	}
	logs := e.Agent.Logs.String()
	for _, want := range []string{`"on_failure":"continue"`, `"on_failure":"skip_remaining"`} {
		if !strings.Contains(logs, want) || !strings.Contains(logs, "is ignored") {
			t.Errorf("the agent did not warn that %s on an enforcing entry is ignored:\n%s", want, logs)
		}
	}
	klogs := e.Kernel.Logs.String()
	for _, want := range []string{
		`route_policies[0].request_policy_chain[0].on_failure","warning":"on_failure continue is ignored: policy \"jwtValidation\" enforces`,
		`route_policies[1].request_policy_chain[0].on_failure","warning":"on_failure skip_remaining is ignored: policy \"jwtValidation\" enforces`,
	} {
		if !strings.Contains(klogs, want) {
			t.Errorf("the kernel did not warn %s:\n%s", want, klogs)
		}
	}
}

// TestBypassOverrun runs a policy that ignores its context and returns, with an allow, long
// after the chain's deadline. The kernel answers at its agent timeout; the agent answers the
// late chain TIMEOUT, never with the policy's late allow, and counts the timeout.
func TestBypassOverrun(t *testing.T) {
	routes := `    - route_name: /deaf
      request_policy_chain: [{policy: testDeafSleep, metadata: {sleep_ms: 400}}]
`
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: failureKernelYAML(150, 1000, routes),
		AgentBin: testenv.Build(t, testenv.TestAgentPackage)})
	c := e.Dial(t, envoyConfig)
	const n = 4
	for range n {
		s := play(c, "/deaf", request("/deaf"))
		if got := s.outcome(); got != "500 policy_agent_timeout" || s.latency > 150*time.Millisecond+margin {
			t.Errorf("/deaf: %s after %v, want 500 policy_agent_timeout within the agent timeout", got, s.latency)
		}
	}
	timeouts := `policy_agent_policy_failures_total{policy="testDeafSleep",reason="timeout"}`
	testenv.WaitFor(t, 5*time.Second, "the agent to count every overrun as a timeout", func() bool {
		return agentMetric(t, e, timeouts) == n
	})
	if ok := agentMetric(t, e, `policy_agent_executions_total{policy="testDeafSleep",status="ok"}`); ok != 0 {
		t.Errorf("the late allows were counted as %v successful executions", ok)
	}
	alive(t, e)
}

// TestBypassAgentDeadline gives the agent a chain limit below the kernel's agent timeout:
// the agent, not the kernel, ends a chain whose policy overruns, and answers TIMEOUT. A policy
// that denies late still denies, also on a fail-open agent, which would pass a TIMEOUT.
func TestBypassAgentDeadline(t *testing.T) {
	routes := `    - route_name: /deaf
      request_policy_chain: [{policy: testDeafSleep, metadata: {sleep_ms: 300}}, {policy: allowAll}]
    - route_name: /deaf-deny
      agent: open
      request_policy_chain: [{policy: testDeafSleep, metadata: {sleep_ms: 300, deny: true}}, {policy: allowAll}]
`
	agent := strings.Replace(agentYAML, "  policies:\n", "  server:\n    max_chain_duration_ms: 100\n  policies:\n", 1)
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agent, KernelYAML: failureKernelYAML(1500, 2000, routes),
		AgentBin: testenv.Build(t, testenv.TestAgentPackage)})
	cfg := envoyConfig
	cfg.MessageTimeout = 3 * time.Second
	c := e.Dial(t, cfg)
	s := play(c, "/deaf", request("/deaf"))
	if got := s.outcome(); got != "500 policy_agent_timeout" || s.latency > 300*time.Millisecond+margin {
		t.Errorf("/deaf: %s after %v, want 500 policy_agent_timeout once the policy returned (300ms)", got, s.latency)
	}
	s = play(c, "/deaf-deny", request("/deaf-deny"))
	if got := s.outcome(); got != "403 forbidden" {
		t.Errorf("/deaf-deny on a fail-open agent: %s after %v, want the late denial", got, s.latency)
	}
	if got := agentMetric(t, e, `policy_agent_policy_failures_total{policy="testDeafSleep",reason="timeout"}`); got != 2 {
		t.Errorf("agent timeouts counted: %v, want 2", got)
	}
	if got := agentMetric(t, e, `policy_agent_executions_total{policy="allowAll",status="ok"}`); got != 0 {
		t.Errorf("the chain went on after its deadline: allowAll ran %v times", got)
	}
	alive(t, e)
}
