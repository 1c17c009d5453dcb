package faults

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// Attacks on the policy set the kernel believes its agent has: an agent replaced by a build
// that lacks a policy, a misspelled policy while the agent is down, and configs that cannot
// serve a route but would report ready.

// noKeyAuthAgent is policy-agent without apiKeyAuth.
const noKeyAuthAgent = "github.com/policy-engine/policy-engine/internal/testpolicies/cmd/policy-agent-nokeyauth"

// plainAgentYAML configures no policy, so that every agent build accepts it.
const plainAgentYAML = `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  observability:
    metrics_address: "{{AGENT_METRICS}}"
`

// kernelProc is a kernel the test starts next to the environment's, on the same agent.
type kernelProc struct {
	*testenv.Proc
	addr, metrics, config string
}

var kernelN atomic.Int32

// startKernel starts another kernel with yaml on e's agent socket and waits until it listens;
// wait is its --agent-wait.
func startKernel(t *testing.T, e *testenv.Env, yaml string, wait time.Duration) *kernelProc {
	t.Helper()
	kbin, _ := testenv.Binaries(t)
	k := &kernelProc{addr: testenv.FreeAddr(t), metrics: testenv.FreeAddr(t),
		config: filepath.Join(e.Dir, fmt.Sprintf("kernel-%d.yaml", kernelN.Add(1)))}
	e.WriteConfig(t, k.config, yaml)
	k.Proc = testenv.Start(t, kbin, nil, "--config", k.config, "--listen", k.addr, "--metrics-listen", k.metrics, "--admin-listen", "127.0.0.1:0", "--agent-wait", wait.String())
	testenv.WaitDial(t, k.Proc, "tcp", k.addr)
	return k
}

func (k *kernelProc) get(path string) (int, string) {
	return testenv.HTTPGet("http://" + k.metrics + path)
}

func (k *kernelProc) dial(t *testing.T) *envoytest.Client {
	t.Helper()
	c, err := envoytest.Dial(k.addr, envoyConfig)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// unkeyed is a request without a key, or with a wrong one, on path: it must never reach the
// upstream of a route whose chain holds apiKeyAuth.
func unkeyed(path string, n int) *envoytest.Request {
	switch n % 3 {
	case 0:
		return request(path)
	case 1:
		return request(path, [2]string{"x-api-key", "wrong-key"})
	}
	return keyed(path)
}

// isKeyed tells the requests unkeyed made with the right key.
func isKeyed(n int) bool { return n%3 == 2 }

// TestBypassAgentReplacedWithoutPolicy replaces the agent, under traffic, by a build that lacks
// apiKeyAuth, with a health-check interval of 5 s: no request without the right key reaches
// the upstream at any moment, and once the kernel knows the new policy set the route answers
// invalid_route. Without the fix, the new agent skipped the policy it lacked and served the
// route until the next health check.
func TestBypassAgentReplacedWithoutPolicy(t *testing.T) {
	kernelYAML := `policy_kernel:
  server:
    message_timeout_ms: 500
  agents:
    - name: closed
      socket_path: "{{SOCK}}"
      timeout_ms: 400
      retry: {max_attempts: 3, backoff_ms: 10}
      health_check_interval_ms: 5000
  route_policies:
    - route_name: /keyed
      request_policy_chain: [{policy: apiKeyAuth}]
`
	replacement := testenv.Build(t, noKeyAuthAgent)
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: kernelYAML})
	c := e.Dial(t, envoyConfig)
	var leaked atomic.Int32
	tr := startTraffic(c, 4, 2*time.Millisecond, func(w, n int) (string, *envoytest.Request) {
		return "/keyed", unkeyed("/keyed", w+n)
	})
	time.Sleep(300 * time.Millisecond)
	e.Agent.Kill()
	e.WriteConfig(t, e.AgentConfig, plainAgentYAML)
	e.StartAgentBin(t, replacement)
	back := time.Now()
	time.Sleep(2 * time.Second)
	shots := tr.finish()
	alive(t, e)
	for _, s := range shots {
		if !s.kernelAnswered() {
			t.Errorf("%s: %s", s.route, s.outcome())
			continue
		}
		if s.res.Forwarded != nil && !s.res.LocalReply && testenv.Header(s.res.Forwarded.Headers, "x-user-id") == "" {
			if leaked.Add(1) <= 5 {
				t.Errorf("request without the right key reached the upstream at %v (%v after the new agent was up)",
					s.start.Format(time.StampMilli), s.start.Sub(back).Round(time.Millisecond))
			}
		}
	}
	tl := count(shots)
	tl.report(t, "agent replaced by a build without apiKeyAuth (health interval 5 s)")
	if tl.outcomes["500 invalid_route"] == 0 {
		t.Errorf("no request met the route marked invalid: %v", tl.outcomes)
	}
	if leaked.Load() > 0 {
		t.Errorf("%d requests without the right key reached the upstream", leaked.Load())
	}
}

// TestBypassMisspelledPolicyAgentDown starts a kernel whose route names "apiKeyauth" while its
// agent is down, then starts the agent: the route is refused (route_not_validated) until the
// kernel has checked it, then answers invalid_route; no request reaches the upstream, and the
// kernel is never ready. Without the fix, the agent skipped the unknown policy and the route
// was served until the next health check.
func TestBypassMisspelledPolicyAgentDown(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: twoAgents(400, 500, keyRoutes)})
	e.Agent.Kill()
	k := startKernel(t, e, `policy_kernel:
  server:
    message_timeout_ms: 500
  agents:
    - name: closed
      socket_path: "{{SOCK}}"
      timeout_ms: 400
      health_check_interval_ms: 5000
    - name: open
      socket_path: "{{SOCK}}"
      timeout_ms: 400
      health_check_interval_ms: 5000
      fail_open: true
  route_policies:
    - route_name: /closed
      agent: closed
      request_policy_chain: [{policy: apiKeyauth}]
    - route_name: /open
      agent: open
      request_policy_chain: [{policy: apiKeyauth}]
`, 0)
	c := k.dial(t)
	for _, route := range []string{"/closed", "/open"} {
		if s := play(c, route, request(route)); s.outcome() != "500 route_not_validated" {
			t.Errorf("%s before the agent was reached: %s, want 500 route_not_validated", route, s.outcome())
		}
	}
	if code, body := k.get("/health/ready"); code != 503 {
		t.Errorf("ready with the agent down and routes unchecked: %d %s", code, body)
	}
	e.StartAgent(t)
	up := time.Now()
	var shots []shot
	for n := 0; time.Since(up) < 2*time.Second; n++ {
		route := []string{"/closed", "/open"}[n%2]
		shots = append(shots, play(c, route, unkeyed(route, n/2)))
		time.Sleep(5 * time.Millisecond)
	}
	alive(t, e)
	bad := 0
	for _, s := range shots {
		if (!s.kernelAnswered() || s.res.Forwarded != nil) && bad < 5 {
			bad++
			t.Errorf("%s at %v after the agent was up: %s", s.route, s.start.Sub(up).Round(time.Millisecond), s.outcome())
		}
	}
	tl := count(shots)
	tl.report(t, "misspelled policy, agent down at kernel start")
	if tl.outcomes["500 invalid_route"] == 0 {
		t.Errorf("the route was never checked against the agent: %v", tl.outcomes)
	}
	code, body := k.get("/health/ready")
	if code != 503 || !strings.Contains(body, "apiKeyauth") {
		t.Errorf("ready with an invalid route: %d %s", code, body)
	}
	if _, m := k.get("/metrics"); testenv.Metric(m, "policy_kernel_invalid_routes") != 2 {
		t.Errorf("policy_kernel_invalid_routes is %v, want 2", testenv.Metric(m, "policy_kernel_invalid_routes"))
	}
}

// badEntryAgentYAML has apiKeyAuth and a jwtValidation without any key source of its own.
const badEntryAgentYAML = `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  policies:
    config:
      apiKeyAuth:
        keys: [{key: fault-key-1, user_id: fault-user}]
  observability:
    metrics_address: "{{AGENT_METRICS}}"
`

// singleRoute is a kernel config with one fail-closed agent and one route on chain.
func singleRoute(chain string) string {
	return `policy_kernel:
  server:
    message_timeout_ms: 500
  agents:
    - name: closed
      socket_path: "{{SOCK}}"
      timeout_ms: 400
      health_check_interval_ms: 200
  route_policies:
    - route_name: /ok
      request_policy_chain: [{policy: allowAll}]
    - route_name: /bad
      request_policy_chain:
` + chain
}

var badChains = map[string]string{
	"unknown policy": "        - policy: apiKeyauth\n",
	"burst 0":        "        - policy: rateLimit\n          metadata: {requests_per_second: 10, burst: 0}\n",
	"jwt no keys":    "        - policy: jwtValidation\n",
}

// TestBypassReadyWhileUnable starts kernels whose route cannot serve (an unknown policy, a
// setting its policy refuses, a jwtValidation with no key source): none is ready, each names
// the route, counts it in policy_kernel_invalid_routes, and refuses the route without calling
// the agent; a fail-closed agent that goes down makes the kernel not ready. Without the fix,
// each was ready and then answered 500 policy_error on every request of the route.
func TestBypassReadyWhileUnable(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: badEntryAgentYAML, KernelYAML: singleRoute("        - policy: apiKeyAuth\n")})
	for name, chain := range badChains {
		t.Run(name, func(t *testing.T) {
			k := startKernel(t, e, singleRoute(chain), 5*time.Second)
			time.Sleep(500 * time.Millisecond) // a few health checks
			code, body := k.get("/health/ready")
			if code != 503 || !strings.Contains(body, `\"/bad\"`) {
				t.Errorf("ready: %d %s", code, body)
			}
			if _, m := k.get("/metrics"); testenv.Metric(m, "policy_kernel_invalid_routes") != 1 {
				t.Errorf("policy_kernel_invalid_routes is not 1")
			}
			c := k.dial(t)
			if s := play(c, "/bad", request("/bad")); s.outcome() != "500 invalid_route" {
				t.Errorf("/bad: %s, want 500 invalid_route", s.outcome())
			}
			if s := play(c, "/ok", request("/ok")); s.outcome() != "upstream" {
				t.Errorf("/ok: %s", s.outcome())
			}
		})
	}
	t.Run("reload with a bad entry", func(t *testing.T) {
		for name, chain := range badChains {
			writeAtomically(t, e, e.KernelConfig, singleRoute(chain))
			if got := e.Kernel.Reload(t, "config reloaded", "config reload failed"); got != "config reload failed" {
				t.Errorf("%s: reload %q, want it refused", name, got)
			}
		}
		testenv.WaitFor(t, 3*time.Second, "ready on the good config in force", func() bool {
			code, _ := e.Get(t, "/health/ready")
			return code == 200
		})
	})
	t.Run("fail-closed agent down", func(t *testing.T) {
		e.Agent.Kill()
		testenv.WaitFor(t, 3*time.Second, "not ready", func() bool { code, _ := e.Get(t, "/health/ready"); return code == 503 })
		e.StartAgent(t)
		testenv.WaitFor(t, 5*time.Second, "ready again", func() bool { code, _ := e.Get(t, "/health/ready"); return code == 200 })
	})
}

// TestBypassValidateBadEntries runs --validate on configs with entries their policies refuse:
// rateLimit with burst: 0 and a jwtValidation without a key source. Each is reported with
// file, line and key, and the exit status is 1.
func TestBypassValidateBadEntries(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: badEntryAgentYAML, KernelYAML: singleRoute("        - policy: apiKeyAuth\n")})
	kbin, _ := testenv.Binaries(t)
	f := func(name, chain, want string) {
		t.Helper()
		path := filepath.Join(e.Dir, name+".yaml")
		e.WriteConfig(t, path, singleRoute(chain))
		out, err := exec.Command(kbin, "--validate", "--config", path).CombinedOutput()
		ee, ok := err.(*exec.ExitError)
		if !ok || ee.ExitCode() != 1 || !strings.Contains(string(out), name+".yaml:"+want) {
			t.Errorf("--validate %s: %v\n%s\nwant %q", name, err, out, name+".yaml:"+want)
		}
	}
	f("burst0", badChains["burst 0"], `15: policy_kernel.route_policies[1].request_policy_chain[0].metadata.burst: policy "rateLimit"`)
	f("jwtnokeys", badChains["jwt no keys"], `14: policy_kernel.route_policies[1].request_policy_chain[0]: agent "closed" cannot run this entry: policy "jwtValidation": invalid metadata: key source: none`)
}
