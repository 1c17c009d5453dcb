package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

const shadowAgentYAML = `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  policies:
    config:
      apiKeyAuth:
        keys:
          - key_sha256: "a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873"  # demo-key-123
            user_id: demo-user
      jwtValidation:
        hmac_secret_env: E2E_JWT_SECRET
        algorithms: [HS256]
  observability:
    metrics_address: "{{AGENT_METRICS}}"
`

// shadowKernelYAML has, for each of apiKeyAuth, jwtValidation and rateLimit, a route that
// enforces the policy and a twin whose entry is in shadow ({{MODE}}), so that the same traffic
// on both shows what enforcing would have refused.
const shadowKernelYAML = `policy_kernel:
  agents:
    - name: default-agent
      socket_path: "{{SOCK}}"
      timeout_ms: 150
      health_check_interval_ms: 200
  route_policies:
    - route_name: key-enforce
      request_policy_chain:
        - policy: apiKeyAuth
          metadata: {header_name: X-API-Key, user_id_header: X-User-ID}
    - route_name: key-shadow
      request_policy_chain:
        - policy: apiKeyAuth
          mode: {{MODE}}
          metadata: {header_name: X-API-Key, user_id_header: X-User-ID}
    - route_name: jwt-enforce
      request_policy_chain:
        - policy: jwtValidation
          metadata: {issuer: "https://auth.example.com", audience: api}
    - route_name: jwt-shadow
      mode: shadow
      request_policy_chain:
        - policy: jwtValidation
          metadata: {issuer: "https://auth.example.com", audience: api}
    - route_name: rl-enforce
      request_policy_chain:
        - policy: rateLimit
          metadata: {requests_per_second: 0.001, burst: 3, response_headers: true}
    - route_name: rl-shadow
      request_policy_chain:
        - policy: rateLimit
          mode: shadow
          metadata: {requests_per_second: 0.001, burst: 3, response_headers: true}
`

// TestShadowCountsWhatEnforceRefuses sends the same requests to each enforcing route and its
// shadow twin through the real binaries: the shadow routes let every request through
// unchanged, and count and log exactly the requests that their enforcing twins refused. Then
// a reload that changes the mode alone makes the shadow entry enforce.
func TestShadowCountsWhatEnforceRefuses(t *testing.T) {
	const secret = "e2e-shadow-jwt-secret-0123456789abcdef"
	kernelCfg := func(mode string) string { return strings.ReplaceAll(shadowKernelYAML, "{{MODE}}", mode) }
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: shadowAgentYAML, KernelYAML: kernelCfg("shadow"), AgentEnv: []string{"E2E_JWT_SECRET=" + secret}})
	c := e.Dial(t, envoyConfig)

	sign := func(claims jwt.MapClaims) string {
		tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte(secret))
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	now := time.Now()
	good := sign(jwt.MapClaims{"iss": "https://auth.example.com", "aud": "api", "sub": "alice", "exp": now.Add(time.Hour).Unix()})
	expired := sign(jwt.MapClaims{"iss": "https://auth.example.com", "aud": "api", "sub": "alice", "exp": now.Add(-time.Hour).Unix()})
	foreign := sign(jwt.MapClaims{"iss": "https://evil.example.com", "aud": "api", "sub": "alice", "exp": now.Add(time.Hour).Unix()})

	type traffic struct {
		policy  string
		route   string // without -enforce or -shadow
		headers [][][2]string
	}
	none := [][2]string{}
	cases := []traffic{
		{"apiKeyAuth", "key", [][][2]string{
			{{"x-api-key", "demo-key-123"}}, none, {{"x-api-key", "wrong"}}, {{"x-api-key", "demo-key-123"}, {"x-user-id", "mallory"}},
		}},
		{"jwtValidation", "jwt", [][][2]string{
			{{"authorization", "Bearer " + good}}, none, {{"authorization", "Bearer " + expired}}, {{"authorization", "Bearer " + foreign}}, {{"authorization", "Bearer garbage"}},
		}},
		{"rateLimit", "rl", [][][2]string{none, none, none, none, none, none}},
	}
	agentMetric := func(series string) float64 {
		t.Helper()
		code, body := e.GetAgent(t, "/metrics")
		if code != 200 {
			t.Fatalf("agent /metrics: %d", code)
		}
		return testenv.Metric(body, series)
	}
	totalRefused := 0
	for _, tc := range cases {
		refused := 0
		for i, h := range tc.headers {
			enf := do(t, c, "/"+tc.route, tc.route+"-enforce", h...)
			sh := do(t, c, "/"+tc.route, tc.route+"-shadow", h...)
			if enf.Status != 200 {
				refused++
			}
			if sh.Status != 200 || sh.Forwarded == nil {
				t.Fatalf("%s request %d: the shadow route answered %d %s", tc.policy, i, sh.Status, sh.Body)
			}
			// Nothing the shadow entry decides reaches the request: no header it sets, and the
			// identity header it owns is still stripped from what the client sent.
			if v := testenv.Header(sh.Forwarded.Headers, "x-user-id"); v != "" {
				t.Errorf("%s request %d: x-user-id %q reached the upstream", tc.policy, i, v)
			}
			if v := testenv.Header(sh.Headers, "ratelimit-remaining") + testenv.Header(sh.Headers, "x-ratelimit-remaining"); v != "" {
				t.Errorf("%s request %d: a shadow rate-limit header reached the client: %q", tc.policy, i, v)
			}
		}
		if refused == 0 || refused == len(tc.headers) {
			t.Fatalf("%s: the enforcing route refused %d of %d: the traffic tests nothing", tc.policy, refused, len(tc.headers))
		}
		totalRefused += refused
		prefix := `policy_agent_shadow_decisions_total{policy="` + tc.policy + `",route="` + tc.route + `-shadow",decision=`
		deny, allow, errs := agentMetric(prefix+`"deny"}`), agentMetric(prefix+`"allow"}`), agentMetric(prefix+`"error"}`)
		if int(deny) != refused || int(allow) != len(tc.headers)-refused || errs != 0 {
			t.Errorf("%s: shadow counted deny=%v allow=%v error=%v; the enforcing twin refused %d of %d", tc.policy, deny, allow, errs, refused, len(tc.headers))
		}
		// The enforcing routes are not counted as shadow.
		if v := agentMetric(`policy_agent_shadow_decisions_total{policy="` + tc.policy + `",route="` + tc.route + `-enforce",decision="deny"}`); v != 0 {
			t.Errorf("%s: enforcing route counted as shadow: %v", tc.policy, v)
		}
	}
	// One log line per would-be refusal (fewer than the throttle's limit a second).
	testenv.WaitFor(t, 5*time.Second, "the shadow log lines", func() bool {
		return strings.Count(e.Agent.Logs.String(), "shadow policy would have refused") >= totalRefused
	})
	logs := e.Agent.Logs.String()
	if n := strings.Count(logs, "shadow policy would have refused"); n != totalRefused {
		t.Errorf("%d shadow log lines, want %d", n, totalRefused)
	}
	for _, s := range []string{good, expired, "demo-key-123", secret} {
		if strings.Contains(logs, s) || strings.Contains(e.Kernel.Logs.String(), s) {
			t.Errorf("a credential reached the logs: %.12s...", s)
		}
	}
	if !strings.Contains(logs, `"route":"key-shadow"`) || !strings.Contains(logs, `"status":401`) || !strings.Contains(logs, `"status":429`) {
		t.Errorf("shadow log lines lack the route or the status:\n%s", logs)
	}

	// Enforcing is a reload that changes the mode and nothing else.
	e.WriteConfig(t, e.KernelConfig, kernelCfg("enforce"))
	e.Reload(t, "config reloaded")
	if r := do(t, c, "/key", "key-shadow"); r.Status != 401 || r.Forwarded != nil {
		t.Fatalf("after the switch to enforce: %d %s", r.Status, r.Body)
	}
	if r := do(t, c, "/key", "key-shadow", [2]string{"x-api-key", "demo-key-123"}); r.Status != 200 || testenv.Header(r.Forwarded.Headers, "x-user-id") != "demo-user" {
		t.Fatalf("after the switch to enforce, a valid key: %d", r.Status)
	}
	// And back: a rollback is the same reload.
	e.WriteConfig(t, e.KernelConfig, kernelCfg("shadow"))
	e.Reload(t, "config reloaded")
	if r := do(t, c, "/key", "key-shadow"); r.Status != 200 {
		t.Fatalf("after the rollback to shadow: %d %s", r.Status, r.Body)
	}
}
