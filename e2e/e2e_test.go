// Package e2e runs the real policy-agent and policy-kernel binaries over a real Unix socket and
// a real TCP port, and drives them with a client that behaves exactly like Envoy's ext_proc
// filter.
package e2e

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

const agentYAML = `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  policies:
    config:
      apiKeyAuth:
        keys:
          - key_sha256: "a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873"  # demo-key-123
            user_id: demo-user
          - key_env: E2E_ADMIN_KEY
            user_id: admin-user
  observability:
    metrics_address: "{{AGENT_METRICS}}"
`

const kernelYAML = `policy_kernel:
  agents:
    - name: default-agent
      socket_path: "{{SOCK}}"
      timeout_ms: 150
      health_check_interval_ms: 200
  route_policies:
    - route_name: /api/v1/users
      request_policy_chain:
        - policy: apiKeyAuth
          metadata:
            header_name: X-API-Key
            required: true
      response_policy_chain:
        - policy: addSecurityHeaders
          metadata:
            headers:
              X-Content-Type-Options: nosniff
              X-Frame-Options: DENY
    - route_name: users-by-name
      request_policy_chain:
        - policy: apiKeyAuth
          metadata: {header_name: X-Named-Key}
    - route_name: /api/v1/broken
      request_policy_chain:
        - policy: policyThatDoesNotExist
  default_policy:
    request_policy_chain:
      - policy: allowAll
    response_policy_chain: []
`

// envoyConfig is the ext_proc filter config the README shows, but for the message timeout:
// the kernel answers within its own server.message_timeout_ms (200 ms), and this Envoy waits a
// second, so that a loaded CI machine under the race detector makes an answer late rather
// than a 504. The kernel's budget is asserted where it is set (kernel tests).
var envoyConfig = envoytest.FilterConfig{
	AllowModeOverride: true,
	RequestAttributes: []string{"xds.route_name", "source.address"},
	MessageTimeout:    time.Second,
}

func start(t *testing.T) (*testenv.Env, *envoytest.Client) {
	t.Helper()
	// The config has an invalid route on purpose, so the kernel is never ready: wait instead
	// until the agent has checked every route, and only the broken one is refused.
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: kernelYAML, AgentEnv: []string{"E2E_ADMIN_KEY=admin-secret"}, NotReady: true})
	testenv.WaitFor(t, testenv.StartTimeout, "the routes to be checked against the agent", func() bool {
		code, body := e.Get(t, "/health/ready")
		return code == 503 && strings.Contains(body, `"invalid_routes":["route \"/api/v1/broken\"`) && !strings.Contains(body, "unvalidated") && !strings.Contains(body, "is not reachable")
	})
	return e, e.Dial(t, envoyConfig)
}

func do(t *testing.T, c *envoytest.Client, path, route string, headers ...[2]string) *envoytest.Result {
	t.Helper()
	req := &envoytest.Request{Method: "GET", Path: path, Authority: "api.example.com", Headers: headers,
		Attributes: map[string]string{"source.address": "192.0.2.10:40000"}}
	if route != "" {
		req.Attributes["xds.route_name"] = route
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := c.Do(ctx, req, func(f *envoytest.Forwarded) *envoytest.Response {
		return &envoytest.Response{Status: 200, Headers: [][2]string{{"content-type", "application/json"}, {"x-frame-options", "SAMEORIGIN"}}, Body: []byte(`{"ok":true}`)}
	})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func errorCode(t *testing.T, body []byte) string {
	t.Helper()
	var b struct {
		Error string `json:"error"`
	}
	if err := json.Unmarshal(body, &b); err != nil {
		t.Fatalf("body %q is not the JSON error shape: %v", body, err)
	}
	return b.Error
}

func TestAPIKeyAuthAndSecurityHeaders(t *testing.T) {
	_, c := start(t)

	// No key: 401 with WWW-Authenticate, never reaching upstream.
	r := do(t, c, "/api/v1/users", "")
	if r.Status != 401 || r.Forwarded != nil || !r.LocalReply || r.ImmediateResponse == nil {
		t.Fatalf("no key: status %d forwarded %v details %q", r.Status, r.Forwarded != nil, r.Details)
	}
	if v := testenv.Header(r.Headers, "www-authenticate"); v != "API-Key" {
		t.Fatalf("no key: www-authenticate %q (headers %v)", v, r.Headers)
	}
	if errorCode(t, r.Body) != "unauthorized" {
		t.Fatalf("body %s", r.Body)
	}

	// Wrong key: 403.
	r = do(t, c, "/api/v1/users", "", [2]string{"x-api-key", "wrong-key"})
	if r.Status != 403 || r.Forwarded != nil || errorCode(t, r.Body) != "forbidden" {
		t.Fatalf("wrong key: %d %s", r.Status, r.Body)
	}
	if strings.Contains(string(r.Body), "wrong-key") {
		t.Fatal("the denial echoes the key")
	}

	// Good key: continues upstream with X-User-ID; the response gets the security headers.
	r = do(t, c, "/api/v1/users/42", "", [2]string{"x-api-key", "demo-key-123"})
	if r.Status != 200 || r.Forwarded == nil {
		t.Fatalf("good key: %d %q", r.Status, r.Details)
	}
	if v := testenv.Header(r.Forwarded.Headers, "x-user-id"); v != "demo-user" {
		t.Fatalf("upstream x-user-id %q (%v)", v, r.Forwarded.Headers)
	}
	if v := testenv.Header(r.Headers, "x-content-type-options"); v != "nosniff" {
		t.Fatalf("response headers %v", r.Headers)
	}
	if v := testenv.Header(r.Headers, "x-frame-options"); v != "DENY" {
		t.Fatalf("x-frame-options %q: the policy overwrites the upstream's value", v)
	}
	// A key from the environment.
	r = do(t, c, "/api/v1/users", "", [2]string{"x-api-key", "admin-secret"})
	if v := testenv.Header(r.Forwarded.Headers, "x-user-id"); r.Status != 200 || v != "admin-user" {
		t.Fatalf("env key: %d %q", r.Status, v)
	}
	// Every reply went out in raw_value only.
	for _, rec := range r.Received {
		for _, hm := range []interface{ String() string }{rec} {
			if strings.Contains(hm.String(), " value:") {
				t.Fatalf("a reply used value instead of raw_value: %v", rec)
			}
		}
	}
}

func TestRouteSelection(t *testing.T) {
	_, c := start(t)
	// Unknown route and path: the default policy (allowAll) lets it through.
	r := do(t, c, "/somewhere/else", "")
	if r.Status != 200 || r.Forwarded == nil {
		t.Fatalf("default policy: %d %q", r.Status, r.Details)
	}
	// With no response chain, Envoy is told to skip the response headers: one message only.
	if len(r.Sent) != 1 {
		t.Fatalf("default route sent %d messages, want 1 (response headers skipped)", len(r.Sent))
	}
	// The attribute wins over the path: this path would need X-API-Key.
	r = do(t, c, "/api/v1/users", "users-by-name", [2]string{"x-named-key", "demo-key-123"})
	if r.Status != 200 {
		t.Fatalf("attribute route: %d %s", r.Status, r.Body)
	}
	r = do(t, c, "/api/v1/users", "users-by-name", [2]string{"x-api-key", "demo-key-123"})
	if r.Status != 401 {
		t.Fatalf("attribute route must use its own chain: %d", r.Status)
	}
	// An attribute naming no configured route falls back to the path.
	r = do(t, c, "/api/v1/users", "not-configured", [2]string{"x-api-key", "demo-key-123"})
	if r.Status != 200 {
		t.Fatalf("unknown attribute: %d", r.Status)
	}
}

func TestInvalidRouteDeniedAndCounted(t *testing.T) {
	e, c := start(t)
	r := do(t, c, "/api/v1/broken", "")
	if r.Status != 500 || r.Forwarded != nil || errorCode(t, r.Body) != "invalid_route" {
		t.Fatalf("invalid route: %d %s", r.Status, r.Body)
	}
	_, metrics := e.Get(t, "/metrics")
	if !strings.Contains(metrics, `policy_kernel_requests_total{route="/api/v1/broken",agent="default-agent",status="invalid_route"} 1`) {
		t.Fatal("invalid route not counted")
	}
	if !strings.Contains(e.Kernel.Logs.String(), `policy \"policyThatDoesNotExist\" is not supported by agent \"default-agent\"`) {
		t.Fatalf("invalid route not logged:\n%s", e.Kernel.Logs.String())
	}
}

func TestAgentDownFailsClosedThenRecovers(t *testing.T) {
	e, c := start(t)
	e.Agent.Kill()
	r := do(t, c, "/api/v1/users", "", [2]string{"x-api-key", "demo-key-123"})
	if r.Status != 500 || r.Forwarded != nil {
		t.Fatalf("agent down: %d %q — a fail-closed route must not reach upstream", r.Status, r.Details)
	}
	if errorCode(t, r.Body) != "policy_agent_unavailable" {
		t.Fatalf("body %s", r.Body)
	}
	e.StartAgent(t)
	testenv.WaitFor(t, 10*time.Second, "requests to pass again", func() bool {
		return do(t, c, "/api/v1/users", "", [2]string{"x-api-key", "demo-key-123"}).Status == 200
	})
	if e.Kernel.Exited() {
		t.Fatal("kernel died")
	}
}

func TestMalformedConfigExitsNonZero(t *testing.T) {
	kbin, abin := testenv.Binaries(t)
	dir := t.TempDir()
	bad := filepath.Join(dir, "kernel.yaml")
	os.WriteFile(bad, []byte("policy_kernel:\n  agents:\n    - name: a\n      socket_path: /x.sock\n      timeout_ms: soon\n"), 0o600)
	out, err := exec.Command(kbin, "--config", bad).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Fatalf("kernel exit: %v", err)
	}
	// The process says why it stops in one JSON line, like the rest of its log.
	if errs := fatalErrors(t, out); !strings.Contains(errs, `kernel.yaml:5: policy_kernel.agents[0].timeout_ms: want an integer, got "soon"`) {
		t.Fatalf("kernel output: %s", out)
	}
	badAgent := filepath.Join(dir, "agent.yaml")
	os.WriteFile(badAgent, []byte("agent_core:\n  name: a\n  sokcet_path: /x.sock\n"), 0o600)
	out, err = exec.Command(abin, "--config", badAgent).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Fatalf("agent exit: %v", err)
	}
	if errs := fatalErrors(t, out); !strings.Contains(errs, "agent.yaml:3: agent_core.sokcet_path: unknown key") || !strings.Contains(errs, "agent_core.socket_path: missing required key") {
		t.Fatalf("agent output: %s", out)
	}
	// A key_env naming an unset variable is a clear config error, never an empty key.
	envCfg := filepath.Join(dir, "env.yaml")
	os.WriteFile(envCfg, []byte("agent_core:\n  name: a\n  socket_path: "+filepath.Join(dir, "a.sock")+"\n  policies:\n    config:\n      apiKeyAuth:\n        keys: [{key_env: E2E_UNSET_VARIABLE, user_id: u}]\n"), 0o600)
	out, _ = exec.Command(abin, "--config", envCfg, "--validate").CombinedOutput()
	if !strings.Contains(string(out), `key_env: environment variable "E2E_UNSET_VARIABLE" is not set`) {
		t.Fatalf("agent output: %s", out)
	}
}

// fatalErrors returns the errors of the one JSON line a process writes when it stops on an
// error (level error, metadata fatal: true), one a line; it fails the test when there is no
// such line or when any line of out is not JSON.
func fatalErrors(t *testing.T, out []byte) string {
	t.Helper()
	for _, l := range testenv.LogLines(t, string(out)) {
		if l.Level != "error" || l.Metadata["fatal"] != true {
			continue
		}
		var errs []string
		list, _ := l.Metadata["errors"].([]any)
		for _, e := range list {
			s, _ := e.(string)
			errs = append(errs, s)
		}
		return strings.Join(errs, "\n")
	}
	t.Fatalf("no fatal JSON line in:\n%s", out)
	return ""
}
