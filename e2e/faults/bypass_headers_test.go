package faults

import (
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// bypassHeadersYAML routes identity, path and header-value attacks. Requests carry no
// xds.route_name attribute, so routes are found by path, as the kernel does when Envoy's route
// name is not one of its routes.
const bypassHeadersYAML = `policy_kernel:
  server: {message_timeout_ms: 1000}
  agents:
    - name: default-agent
      socket_path: "{{SOCK}}"
      timeout_ms: 800
      health_check_interval_ms: 2000
  default_policy:
    request_policy_chain: [{policy: allowAll}]
  route_policies:
    - route_name: /optional
      request_policy_chain: [{policy: apiKeyAuth, metadata: {required: false}}]
    - route_name: /keyed
      request_policy_chain: [{policy: apiKeyAuth}]
    - route_name: /api/v1/admin
      request_policy_chain: [{policy: apiKeyAuth}]
    - route_name: /api/v1
      request_policy_chain: [{policy: allowAll}]
    - route_name: /ctl
      request_policy_chain:
        - {policy: testSetHeader, metadata: {name: x-ctl, value: "a\x01b"}}
        - {policy: testSetHeader, metadata: {name: x-del, value: "a\x7fb"}}
        - {policy: testTag, metadata: {tag: ok}}
    - route_name: /ctl-deny
      request_policy_chain: [{policy: testSetHeader, metadata: {name: x-ctl, value: "a\x01b", deny_status: 403}}]
`

func startBypassHeaders(t *testing.T) (*testenv.Env, *envoytest.Client) {
	t.Helper()
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: bypassHeadersYAML, AgentBin: testenv.Build(t, testenv.TestAgentPackage)})
	return e, e.Dial(t, envoyConfig)
}

// headerNames lists the names of hs whose name, with '_' read as '-', is name.
func headerNames(hs [][2]string, name string) []string {
	var out []string
	for _, h := range hs {
		if strings.ReplaceAll(strings.ToLower(h[0]), "_", "-") == name {
			out = append(out, h[0]+": "+h[1])
		}
	}
	return out
}

// TestBypassSpoofedIdentityHeaders sends identity headers that only apiKeyAuth may set: the
// upstream must see apiKeyAuth's value or none, in no spelling.
func TestBypassSpoofedIdentityHeaders(t *testing.T) {
	e, c := startBypassHeaders(t)
	f := func(name, path string, want []string, hs ...[2]string) {
		t.Helper()
		s := play(c, path, request(path, hs...))
		if s.outcome() != "upstream" {
			t.Errorf("%s: %s, want upstream", name, s.outcome())
			return
		}
		got := headerNames(s.res.Forwarded.Headers, "x-user-id")
		if strings.Join(got, "; ") != strings.Join(want, "; ") {
			t.Errorf("%s: upstream saw %q, want %q", name, got, want)
		}
	}
	spoof := [2]string{"x-user-id", "admin"}
	key := [2]string{"x-api-key", "fault-key-1"}
	f("required:false, no key, X-User-ID", "/optional", nil, spoof)
	f("required:false, no key, x_user_id", "/optional", nil, [2]string{"x_user_id", "admin"})
	f("required:false, no key, x-user_id", "/optional", nil, [2]string{"x-user_id", "admin"})
	f("required:false, no key, X_USER_ID", "/optional", nil, [2]string{"X_USER_ID", "admin"})
	f("required:false, valid key, X-User-ID", "/optional", []string{"x-user-id: fault-user"}, spoof, key)
	f("valid key, X_User_ID beside it", "/keyed", []string{"x-user-id: fault-user"}, key, [2]string{"X_User_ID", "admin"})
	f("valid key, X-User-ID and x_user_id", "/keyed", []string{"x-user-id: fault-user"}, spoof, key, [2]string{"x_user_id", "admin"})
	f("valid key, repeated X-User-ID", "/keyed", []string{"x-user-id: fault-user"}, spoof, spoof, key)
	alive(t, e)
}

// TestBypassPathVariants sends spellings of /api/v1/admin that an upstream may read as that
// path, without a route-name attribute: each must get the admin route's refusal (401 from
// apiKeyAuth), not the allowAll of /api/v1 or of the default policy.
func TestBypassPathVariants(t *testing.T) {
	e, c := startBypassHeaders(t)
	defaultBefore := metric(t, e, `policy_kernel_default_route_requests_total{route_name=""}`)
	for _, path := range []string{
		"/api/v1/admin",
		"//api/v1/admin",
		"/api//v1/admin",
		"/api/v1//admin",
		"/api/v1/admin//",
		"/./api/v1/admin",
		"/api/./v1/admin",
		"/api/v1/./admin",
		"/api/v1/admin/.",
		"/api/v1/x/../admin",
		"/api/v1/users/../admin/",
		"/../api/v1/admin",
		"/api/v1/%2e/admin",
		"/api/v1/x/%2E%2E/admin",
		"/%61pi/v1/admin",
		"/api/v1/%61dmin",
		"/api/v1/%61%64%6D%69%6E",
		"/API/V1/ADMIN",
		"/Api/v1/Admin/x",
		"/api/v1/admin;jsessionid=1",
		"/api/v1;x=1/admin",
		"/api;/v1;/admin;/users",
		"/api/v1/admin%2Fusers",
		"/api%2Fv1%2Fadmin",
		"/api%2fv1%2fadmin",
		"/api/v1%5Cadmin",
		"/api/v1\\admin",
		"/api/v1/admin?x=1",
		"/api/v1/x/..%2Fadmin",
	} {
		s := play(c, path, request(path))
		if got := s.outcome(); got != "401 unauthorized" {
			t.Errorf("%q: %s, want 401 unauthorized", path, got)
		}
	}
	// Paths that are not the admin route stay where they were.
	for path, want := range map[string]string{
		"/api/v1/users":      "upstream",
		"/api/v1/administer": "upstream",
		"/api/v1/admin%252F": "upstream", // decoded once, as Envoy does: the segment is "admin%2F"
		"/elsewhere":         "upstream",
	} {
		if got := play(c, path, request(path)).outcome(); got != want {
			t.Errorf("%q: %s, want %s", path, got, want)
		}
	}
	// One request of the last loop fell to the default policy: counted by its (absent) route name.
	if got := metric(t, e, `policy_kernel_default_route_requests_total{route_name=""}`) - defaultBefore; got != 1 {
		t.Errorf("policy_kernel_default_route_requests_total grew by %v, want 1", got)
	}
	alive(t, e)
}

// TestBypassDefaultRouteCounted sends route names the kernel does not know: each request served
// by the default policy is counted by its route name, and each name is logged once.
func TestBypassDefaultRouteCounted(t *testing.T) {
	e, c := startBypassHeaders(t)
	for range 3 {
		req := request("/nowhere")
		req.Attributes["xds.route_name"] = "envoy-only-route"
		if got := play(c, "/nowhere", req).outcome(); got != "upstream" {
			t.Fatalf("unknown route: %s, want upstream (default allowAll)", got)
		}
	}
	// A name the kernel does not know whose path is a kernel route takes that route.
	req := request("/api/v1/admin")
	req.Attributes["xds.route_name"] = "envoy-only-route"
	if got := play(c, "/api/v1/admin", req).outcome(); got != "401 unauthorized" {
		t.Errorf("unknown route name on the admin path: %s, want 401 unauthorized", got)
	}
	if got := metric(t, e, `policy_kernel_default_route_requests_total{route_name="envoy-only-route"}`); got != 3 {
		t.Errorf(`policy_kernel_default_route_requests_total{route_name="envoy-only-route"} = %v, want 3`, got)
	}
	testenv.WaitFor(t, testenv.StartTimeout, "the unknown route name logged", func() bool {
		return strings.Count(e.Kernel.Logs.String(), `"route_name":"envoy-only-route"`) == 1
	})
	alive(t, e)
}

// TestBypassControlCharacterValues has a policy set header values with a control byte and DEL,
// which Envoy refuses with a 500 for the whole reply: the kernel drops those mutations, counts
// them, and sends the rest.
func TestBypassControlCharacterValues(t *testing.T) {
	e, c := startBypassHeaders(t)
	series := `policy_kernel_mutations_rejected_total{route="/ctl",agent="default-agent"}`
	before := metric(t, e, series)
	s := play(c, "/ctl", request("/ctl"))
	if s.outcome() != "upstream" {
		t.Fatalf("/ctl: %s, want upstream", s.outcome())
	}
	fw := s.res.Forwarded.Headers
	if got := testenv.Header(fw, "x-test-tag"); got != "ok" {
		t.Errorf("x-test-tag = %q, want ok: the rest of the reply must be applied", got)
	}
	for _, h := range []string{"x-ctl", "x-del"} {
		if got := headerNames(fw, h); got != nil {
			t.Errorf("upstream saw %q", got)
		}
	}
	if got := metric(t, e, series) - before; got != 2 {
		t.Errorf("%s grew by %v, want 2", series, got)
	}

	// The same value on a policy's local reply: the header is dropped, the reply stays.
	series = `policy_kernel_mutations_rejected_total{route="/ctl-deny",agent="default-agent"}`
	before = metric(t, e, series)
	s = play(c, "/ctl-deny", request("/ctl-deny"))
	if got := s.outcome(); got != "403 denied" {
		t.Fatalf("/ctl-deny: %s, want 403 denied", got)
	}
	if got := testenv.Header(s.res.Headers, "x-test-ok"); got != "ok" {
		t.Errorf("x-test-ok = %q on the local reply, want ok", got)
	}
	if got := testenv.Header(s.res.Headers, "x-ctl"); got != "" {
		t.Errorf("x-ctl = %q on the local reply, want none", got)
	}
	if got := metric(t, e, series) - before; got != 1 {
		t.Errorf("%s grew by %v, want 1", series, got)
	}
	alive(t, e)
}

// TestBypassSpoofedIdentityFailOpen kills the agent of a fail-open route whose apiKeyAuth is
// optional: the kernel lets requests through without the agent, and must still remove the
// client's own identity headers, in every spelling, as the agent would have.
func TestBypassSpoofedIdentityFailOpen(t *testing.T) {
	const kernelYAML = `policy_kernel:
  server: {message_timeout_ms: 1000}
  agents:
    - name: open
      socket_path: "{{SOCK}}"
      timeout_ms: 300
      health_check_interval_ms: 500
      fail_open: true
  route_policies:
    - route_name: /optional
      request_policy_chain: [{policy: apiKeyAuth, metadata: {required: false}}]
`
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: kernelYAML})
	c := e.Dial(t, envoyConfig)
	e.Agent.Kill()
	for _, spoof := range [][2]string{{"x-user-id", "admin"}, {"x_user_id", "admin"}, {"X_User-Id", "admin"}} {
		s := play(c, "/optional", request("/optional", spoof, [2]string{"x-other", "kept"}))
		if s.outcome() != "upstream" {
			t.Errorf("%s with the agent down: %s, want upstream (fail_open)", spoof[0], s.outcome())
			continue
		}
		if got := headerNames(s.res.Forwarded.Headers, "x-user-id"); len(got) > 0 {
			t.Errorf("%s with the agent down: the upstream saw %q, want no identity header", spoof[0], got)
		}
		if testenv.Header(s.res.Forwarded.Headers, "x-other") != "kept" {
			t.Errorf("%s with the agent down: another header was removed too", spoof[0])
		}
	}
	if n := metric(t, e, `policy_kernel_requests_total{route="/optional",agent="open",status="fail_open"}`); n < 3 {
		t.Errorf("fail_open requests counted: %v, want 3", n)
	}
	t.Logf("reliability: bypass: spoofed identity header on a fail-open route with the agent down → removed by the kernel")
}
