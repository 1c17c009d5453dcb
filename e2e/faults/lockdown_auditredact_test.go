package faults

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

// lockdownRedactAgentYAML: the key and the JWT secret come from the environment; %s is more
// auditLog settings.
const lockdownRedactAgentYAML = `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  policies:
    config:
      apiKeyAuth:
        keys: [{key_env: LOCKDOWN_API_KEY, user_id: lockdown-user}]
      jwtValidation:
        hmac_secret_env: LOCKDOWN_JWT_SECRET
      auditLog:
        sink: file
        path: "{{DIR}}/audit.log"
%s`

// lockdownRedactKernelYAML carries the credentials in headers of the route's choosing.
const lockdownRedactKernelYAML = `policy_kernel:
  agents:
    - name: a
      socket_path: "{{SOCK}}"
      timeout_ms: 150
      health_check_interval_ms: 200
  route_policies:
    - route_name: /key
      request_policy_chain:
        - {policy: auditLog}
        - {policy: apiKeyAuth, metadata: {header_name: X-Partner}}
      response_policy_chain: [{policy: auditLog}]
    - route_name: /jwt
      request_policy_chain:
        - {policy: auditLog}
        - {policy: jwtValidation, metadata: {header: X-Identity, prefix: "", issuer: "https://auth.example.com", audience: api}}
      response_policy_chain: [{policy: auditLog}]
`

// TestLockdownAuditRedaction: credentials under names in no fixed list never reach the audit
// log: an API key in apiKeyAuth's configured header_name, a whole JWT in jwtValidation's
// configured header (allowed and denied alike), CSRF, session and AWS session tokens, and query
// parameters such as key, code, sig and token. In allow-list mode only the named headers are
// recorded.
func TestLockdownAuditRedaction(t *testing.T) {
	const apiKey = "LEAK-APIKEY-7f3a"
	const jwtSecret = "LEAK-hmac-secret-0123456789abcdef0123456789"
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"iss": "https://auth.example.com", "aud": "api", "sub": "alice",
		"exp": time.Now().Add(time.Hour).Unix()}).SignedString([]byte(jwtSecret))
	if err != nil {
		t.Fatal(err)
	}
	leaks := map[string]string{
		"api key":              apiKey,
		"jwt":                  tok,
		"jwt signature":        tok[strings.LastIndexByte(tok, '.')+1:],
		"csrf token":           "LEAK-CSRF-1",
		"session token":        "LEAK-SESSION-2",
		"aws session token":    "LEAK-AMZ-3",
		"query key":            "LEAK-QKEY-4",
		"query code":           "LEAK-QCODE-5",
		"query sig":            "LEAK-QSIG-6",
		"query token":          "LEAK-QTOKEN-7",
		"client secret header": "LEAK-CLIENTSECRET-8",
	}
	query := "?key=" + leaks["query key"] + "&code=" + leaks["query code"] + "&sig=" + leaks["query sig"] + "&token=" + leaks["query token"] + "&page=2"
	for _, mode := range []struct{ name, settings string }{
		{"redact", ""},
		{"allow", "        headers: {mode: allow, names: [user-agent, x-partner]}\n"},
	} {
		t.Run(mode.name, func(t *testing.T) {
			e := testenv.StartEnv(t, testenv.Options{
				AgentYAML:  fmt.Sprintf(lockdownRedactAgentYAML, mode.settings),
				KernelYAML: lockdownRedactKernelYAML,
				AgentEnv:   []string{"LOCKDOWN_API_KEY=" + apiKey, "LOCKDOWN_JWT_SECRET=" + jwtSecret},
			})
			c := e.Dial(t, envoyConfig)
			common := [][2]string{
				{"user-agent", "lockdown-test"},
				{"x-csrf-token", leaks["csrf token"]},
				{"x-session-token", leaks["session token"]},
				{"x-amz-security-token", leaks["aws session token"]},
				{"x-client-secret", leaks["client secret header"]},
			}
			for _, tc := range []struct {
				route, header, value, want string
			}{
				{"/key", "x-partner", apiKey, "upstream"},
				{"/key", "x-partner", apiKey + "-wrong", "403 forbidden"},
				{"/jwt", "x-identity", tok, "upstream"},
				{"/jwt", "x-identity", tok + "x", "401 invalid_token"},
			} {
				req := request(tc.route+query, append([][2]string{{tc.header, tc.value}}, common...)...)
				req.Attributes["xds.route_name"] = tc.route
				if s := play(c, tc.route, req); s.outcome() != tc.want {
					t.Fatalf("%s with %s: %s, want %s", tc.route, tc.header, s.outcome(), tc.want)
				}
			}
			path := filepath.Join(e.Dir, "audit.log")
			var data string
			testenv.WaitFor(t, 10*time.Second, "four audit records", func() bool {
				b, _ := os.ReadFile(path)
				data = string(b)
				return strings.Count(data, "\n") >= 4
			})
			for what, v := range leaks {
				if strings.Contains(data, v) {
					t.Errorf("%s in the audit log", what)
				}
			}
			if strings.Contains(data, "LEAK") {
				t.Errorf("a credential in the audit log")
			}
			if !strings.Contains(data, `"user-agent":"lockdown-test"`) || !strings.Contains(data, "page=2") {
				t.Errorf("the audit log lost what is not a credential:\n%s", data)
			}
			recorded := strings.Contains(data, `"x-csrf-token"`)
			if mode.name == "allow" {
				if recorded || !strings.Contains(data, `"x-partner":"[REDACTED]"`) {
					t.Errorf("allow-list mode: want only user-agent and x-partner (redacted):\n%s", data)
				}
			} else if !recorded {
				t.Errorf("redact mode lost the redacted headers' names:\n%s", data)
			}
			if t.Failed() {
				t.Logf("audit log:\n%s", data)
			}
		})
	}
}
