package faults

import (
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

// Attacks on chain entries with when conditions: a client's own identity header on a route
// whose authenticating entry its condition skips, and an agent that would ignore conditions.

// noWhenAgent is policy-agent that does not advertise the when feature, as an older build.
const noWhenAgent = "github.com/policy-engine/policy-engine/internal/testpolicies/cmd/policy-agent-nowhen"

// TestBypassWhenSkippedOwner sends a GET with its own X-User-ID, in several spellings, on a
// route whose apiKeyAuth runs on writes only: the entry is skipped, but the header it owns
// never reaches the upstream (the kernel, which skips chains whose conditions are all false,
// sends such a request to the agent, which strips it). A GET without one is let through
// without the agent; a POST without a key is refused.
func TestBypassWhenSkippedOwner(t *testing.T) {
	kernelYAML := `policy_kernel:
  agents:
    - name: closed
      socket_path: "{{SOCK}}"
      timeout_ms: 500
  route_policies:
    - route_name: /profile
      request_policy_chain:
        - policy: apiKeyAuth
          when: 'request.method != "GET"'
`
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: kernelYAML})
	c := e.Dial(t, envoyConfig)
	for _, h := range []string{"x-user-id", "X-User-Id", "x_user_id", "X_USER-ID"} {
		s := play(c, "/profile", request("/profile", [2]string{h, "admin"}))
		if s.outcome() != "upstream" {
			t.Fatalf("%s: %s", h, s.outcome())
		}
		for _, fh := range s.res.Forwarded.Headers {
			if fh[1] == "admin" {
				t.Errorf("%s: the client's value reached the upstream as %s", h, fh[0])
			}
		}
	}
	if s := play(c, "/profile", request("/profile")); s.outcome() != "upstream" {
		t.Fatalf("GET: %s", s.outcome())
	}
	post := request("/profile", [2]string{"x-user-id", "admin"})
	post.Method = "POST"
	if s := play(c, "/profile", post); s.outcome() != "401 unauthorized" {
		t.Fatalf("POST without a key: %s", s.outcome())
	}
	_, body := e.Get(t, "/metrics")
	if !strings.Contains(body, `policy_kernel_chains_skipped_total{route="/profile",agent="closed",phase="request"} 1`) {
		t.Errorf("the GET without an owned header was not skipped by the kernel:\n%s", body)
	}
	alive(t, e)
}

// TestBypassWhenOldAgent puts an agent that does not advertise the when feature behind a
// route whose entries have conditions: it would run them on every request. The route is
// refused (the kernel is not ready and says why; requests get invalid_route); the routes
// without conditions serve.
func TestBypassWhenOldAgent(t *testing.T) {
	bin := testenv.Build(t, noWhenAgent)
	kernelYAML := `policy_kernel:
  agents:
    - name: closed
      socket_path: "{{SOCK}}"
  route_policies:
    - route_name: /writes
      request_policy_chain:
        - policy: apiKeyAuth
          when: 'request.method != "GET"'
    - route_name: /keyed
      request_policy_chain: [{policy: apiKeyAuth}]
`
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: kernelYAML, AgentBin: bin, NotReady: true})
	testenv.WaitFor(t, testenv.StartTimeout, "the route to be refused", func() bool {
		code, body := e.Get(t, "/health/ready")
		return code == 503 && strings.Contains(body, `does not evaluate when conditions`)
	})
	c := e.Dial(t, envoyConfig)
	for _, m := range []string{"GET", "POST"} {
		r := request("/writes")
		r.Method = m
		if s := play(c, "/writes", r); s.outcome() != "500 invalid_route" {
			t.Fatalf("%s on the route with a condition: %s", m, s.outcome())
		}
	}
	if s := play(c, "/keyed", keyed("/keyed")); !served(s) {
		t.Fatalf("route without conditions: %s", s.outcome())
	}
	alive(t, e)
}
