package e2e

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// costlyWhen is a condition over the cost limit on every request.
const costlyWhen = `[1,2,3,4,5,6,7,8,9,10].all(a, [1,2,3,4,5,6,7,8,9,10].all(b, [1,2,3,4,5,6,7,8,9,10].all(c, [1,2,3,4,5,6,7,8,9,10].all(d, a+b+c+d > 0))))`

const whenKernelYAML = `policy_kernel:
  agents:
    - name: default-agent
      socket_path: "{{SOCK}}"
      timeout_ms: 500
  route_policies:
    # A write-only rate limit: GETs are never limited.
    - route_name: /api/orders
      request_policy_chain:
        - policy: rateLimit
          when: 'request.method != "GET"'
          metadata: {requests_per_second: 0.001, burst: 2}
    # One chain for a whole API: a key only under /api/shared/admin.
    - route_name: /api/shared
      request_policy_chain:
        - policy: apiKeyAuth
          when: 'request.url_path.startsWith("/api/shared/admin")'
          metadata: {header_name: X-API-Key}
    # roleCheck only when jwtValidation verified a token (it may let a request without one in).
    - route_name: /api/maybe-user
      request_policy_chain:
        - policy: jwtValidation
          metadata:
            issuer: "https://auth.example.com"
            audience: "api-service"
            required: false
            claims_to_headers: {sub: X-User-ID}
        - policy: roleCheck
          when: '"jwt.claims" in state'
          metadata: {required_roles: ["admin"]}
    # jwtValidation on writes only: its X-User-ID must never come from the client.
    - route_name: /api/profile
      request_policy_chain:
        - policy: jwtValidation
          when: 'request.method == "POST"'
          metadata:
            issuer: "https://auth.example.com"
            audience: "api-service"
            claims_to_headers: {sub: X-User-ID}
    # Conditions over the cost limit.
    - route_name: /api/costly-auth
      request_policy_chain:
        - policy: apiKeyAuth
          when: '` + costlyWhen + `'
          on_failure: continue
    - route_name: /api/costly-soft
      request_policy_chain:
        - policy: allowAll
          when: '` + costlyWhen + `'
          on_failure: continue
      response_policy_chain:
        - policy: addSecurityHeaders
`

func whenAgentYAML(t *testing.T) string {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	whenKey = key
	der, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	pemText := string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	var indented []string
	for _, l := range strings.Split(strings.TrimSpace(pemText), "\n") {
		indented = append(indented, "          "+l)
	}
	return `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  policies:
    config:
      apiKeyAuth:
        keys:
          - key_sha256: "a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873"  # demo-key-123
            user_id: demo-user
      jwtValidation:
        public_key_pem: |
` + strings.Join(indented, "\n") + `
  observability:
    metrics_address: "{{AGENT_METRICS}}"
`
}

var whenKey *rsa.PrivateKey

func whenToken(t *testing.T, roles ...string) string {
	t.Helper()
	now := time.Now()
	tok, err := jwt.NewWithClaims(jwt.SigningMethodRS256, jwt.MapClaims{"iss": "https://auth.example.com", "aud": "api-service", "sub": "alice",
		"exp": now.Add(time.Hour).Unix(), "iat": now.Unix(), "roles": roles}).SignedString(whenKey)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// doMethod is do with a method.
func doMethod(t *testing.T, c *envoytest.Client, method, path string, headers ...[2]string) *envoytest.Result {
	t.Helper()
	req := &envoytest.Request{Method: method, Path: path, Authority: "api.example.com", Headers: headers,
		Attributes: map[string]string{"source.address": "192.0.2.10:40000"}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := c.Do(ctx, req, func(*envoytest.Forwarded) *envoytest.Response {
		return &envoytest.Response{Status: 200, Headers: [][2]string{{"content-type", "application/json"}}, Body: []byte(`{"ok":true}`)}
	})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// metricSum sums the series of a /metrics page whose line starts with prefix.
func metricSum(body, prefix string) float64 {
	sum := 0.0
	for _, l := range strings.Split(body, "\n") {
		if rest, ok := strings.CutPrefix(l, prefix); ok {
			if i := strings.LastIndexByte(rest, ' '); i >= 0 {
				v, _ := strconv.ParseFloat(rest[i+1:], 64)
				sum += v
			}
		}
	}
	return sum
}

// agentChains is how many request chains the agent has run: each observes its headers' size
// (every one of the first 64, which the test stays under).
func agentChains(t *testing.T, e *testenv.Env) float64 {
	t.Helper()
	_, body := e.GetAgent(t, "/metrics")
	return metricSum(body, `policy_agent_context_size_bytes_count{type="request_headers"}`)
}

// TestWhenConditions runs chains with when conditions through the real binaries.
func TestWhenConditions(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: whenAgentYAML(t), KernelYAML: whenKernelYAML})
	c := e.Dial(t, envoyConfig)
	upstream := func(r *envoytest.Result) bool { return r.Forwarded != nil && !r.LocalReply }

	t.Run("write-only rate limit", func(t *testing.T) {
		for i := range 5 {
			if r := doMethod(t, c, "GET", "/api/orders"); !upstream(r) {
				t.Fatalf("GET %d: %d %s", i, r.Status, r.Body)
			}
		}
		var codes []int
		for range 4 {
			codes = append(codes, doMethod(t, c, "POST", "/api/orders").Status)
		}
		if codes[0] != 200 || codes[1] != 200 || codes[2] != 429 || codes[3] != 429 {
			t.Fatalf("POST statuses %v, want 200 200 429 429", codes)
		}
		if r := doMethod(t, c, "GET", "/api/orders"); !upstream(r) {
			t.Fatalf("GET after the POST limit: %d", r.Status)
		}
	})

	t.Run("key on admin paths only, all-skipped chains do not cross", func(t *testing.T) {
		before := agentChains(t, e)
		for _, p := range []string{"/api/shared/public", "/api/shared/items?page=2", "/api/shared"} {
			if r := doMethod(t, c, "GET", p); !upstream(r) {
				t.Fatalf("%s: %d %s", p, r.Status, r.Body)
			}
		}
		if after := agentChains(t, e); after != before {
			t.Fatalf("the agent ran %v chains for requests whose every entry was skipped", after-before)
		}
		_, km := e.Get(t, "/metrics")
		if n := metricSum(km, `policy_kernel_chains_skipped_total{route="/api/shared",agent="default-agent",phase="request"}`); n != 3 {
			t.Errorf("kernel skips counted %v, want 3", n)
		}
		if r := doMethod(t, c, "GET", "/api/shared/admin/users"); r.Status != 401 || upstream(r) {
			t.Fatalf("admin without a key: %d %s", r.Status, r.Body)
		}
		if r := doMethod(t, c, "GET", "/api/shared/admin/users", [2]string{"x-api-key", "demo-key-123"}); !upstream(r) || testenv.Header(r.Forwarded.Headers, "x-user-id") != "demo-user" {
			t.Fatalf("admin with a key: %d %s", r.Status, r.Body)
		}
		if after := agentChains(t, e); after != before+2 {
			t.Fatalf("the agent ran %v chains, want 2", after-before)
		}
	})

	t.Run("condition on state", func(t *testing.T) {
		if r := doMethod(t, c, "GET", "/api/maybe-user"); !upstream(r) {
			t.Fatalf("no token (roleCheck skipped): %d %s", r.Status, r.Body)
		}
		bearer := func(tok string) [2]string { return [2]string{"authorization", "Bearer " + tok} }
		if r := doMethod(t, c, "GET", "/api/maybe-user", bearer(whenToken(t, "reader"))); r.Status != 403 || upstream(r) {
			t.Fatalf("reader token (roleCheck ran): %d %s", r.Status, r.Body)
		}
		if r := doMethod(t, c, "GET", "/api/maybe-user", bearer(whenToken(t, "admin"))); !upstream(r) || testenv.Header(r.Forwarded.Headers, "x-user-id") != "alice" {
			t.Fatalf("admin token: %d %s", r.Status, r.Body)
		}
	})

	t.Run("owned headers stripped on a skipped entry", func(t *testing.T) {
		for _, h := range []string{"x-user-id", "X_User_Id"} {
			r := doMethod(t, c, "GET", "/api/profile", [2]string{h, "mallory"})
			if !upstream(r) {
				t.Fatalf("%s: %d %s", h, r.Status, r.Body)
			}
			for _, fh := range r.Forwarded.Headers {
				if strings.Contains(fh[1], "mallory") {
					t.Fatalf("the client's %s reached the upstream: %v", h, r.Forwarded.Headers)
				}
			}
		}
		if r := doMethod(t, c, "POST", "/api/profile", [2]string{"x-user-id", "mallory"}); r.Status != 401 || upstream(r) {
			t.Fatalf("POST without a token: %d", r.Status)
		}
	})

	t.Run("cost limit", func(t *testing.T) {
		// An enforcing entry whose condition fails denies, whatever on_failure says.
		if r := doMethod(t, c, "GET", "/api/costly-auth"); r.Status != 500 || upstream(r) || errorCode(t, r.Body) != "policy_error" {
			t.Fatalf("enforcing: %d %s", r.Status, r.Body)
		}
		// A policy that does not enforce follows on_failure: continue.
		if r := doMethod(t, c, "GET", "/api/costly-soft"); !upstream(r) || testenv.Header(r.Headers, "x-content-type-options") != "nosniff" {
			t.Fatalf("on_failure continue: %d %s", r.Status, r.Body)
		}
		if !strings.Contains(e.Agent.Logs.String(), "cost limit") {
			t.Errorf("the agent did not log the failed condition:\n%s", e.Agent.Logs.String())
		}
	})
}

// TestWhenBadExpressionRefused: a condition that does not compile stops the kernel at start,
// and --validate reports it with file, line, key and the compiler's message.
func TestWhenBadExpressionRefused(t *testing.T) {
	kbin, _ := testenv.Binaries(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "kernel.yaml")
	os.WriteFile(cfg, []byte(`policy_kernel:
  agents: [{name: a, socket_path: `+filepath.Join(dir, "none.sock")+`}]
  route_policies:
    - route_name: /a
      request_policy_chain:
        - policy: apiKeyAuth
          when: 'request.method == 1'
`), 0o600)
	want := regexp.MustCompile(`kernel\.yaml:7: policy_kernel\.route_policies\[0\]\.request_policy_chain\[0\]\.when: invalid condition: .*no matching overload`)
	out, err := exec.Command(kbin, "--config", cfg).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !want.MatchString(fatalErrors(t, out)) {
		t.Fatalf("start: %v\n%s", err, out)
	}
	out, err = exec.Command(kbin, "--validate", "--config", cfg).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !want.Match(out) {
		t.Fatalf("--validate: %v\n%s", err, out)
	}
}
