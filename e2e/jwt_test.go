package e2e

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

const jwtKernelYAML = `policy_kernel:
  agents:
    - name: default-agent
      socket_path: "{{SOCK}}"
  route_policies:
    - route_name: /api/v1/admin
      request_policy_chain:
        - policy: jwtValidation
          metadata:
            issuer: "https://auth.example.com"
            audience: "api-service"
            claims_to_headers:
              sub: X-User-ID
        - policy: roleCheck
          metadata:
            required_roles: ["admin"]
`

const jwtAgentYAML = `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  policies:
    config:
      jwtValidation:
        public_key_pem: |
%s
`

// TestAdminRouteJWTAndRoles runs the specification's /api/v1/admin chain through the real
// binaries: a token with the admin role passes with X-User-ID, one without it gets 403, and a
// missing, expired, foreign or alg=none token gets 401.
func TestAdminRouteJWTAndRoles(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	pemText := string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	var indented []string
	for _, l := range strings.Split(strings.TrimSpace(pemText), "\n") {
		indented = append(indented, "          "+l)
	}
	agentCfg := strings.Replace(jwtAgentYAML, "%s", strings.Join(indented, "\n"), 1)
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentCfg, KernelYAML: jwtKernelYAML})
	c := e.Dial(t, envoyConfig)

	sign := func(k any, method jwt.SigningMethod, claims jwt.MapClaims) string {
		tok, err := jwt.NewWithClaims(method, claims).SignedString(k)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	now := time.Now()
	claims := func(roles ...string) jwt.MapClaims {
		return jwt.MapClaims{"iss": "https://auth.example.com", "aud": "api-service", "sub": "alice",
			"exp": now.Add(time.Hour).Unix(), "iat": now.Unix(), "roles": roles}
	}
	bearer := func(tok string) [2]string { return [2]string{"authorization", "Bearer " + tok} }

	admin := sign(key, jwt.SigningMethodRS256, claims("admin", "reader"))
	r := do(t, c, "/api/v1/admin/settings", "", bearer(admin), [2]string{"x-user-id", "mallory"})
	if r.Status != 200 || r.Forwarded == nil {
		t.Fatalf("admin token: %d %s", r.Status, r.Body)
	}
	if v := testenv.Header(r.Forwarded.Headers, "x-user-id"); v != "alice" {
		t.Fatalf("x-user-id %q: the claim must overwrite what the client sent", v)
	}

	r = do(t, c, "/api/v1/admin", "", bearer(sign(key, jwt.SigningMethodRS256, claims("reader"))))
	if r.Status != 403 || r.Forwarded != nil || errorCode(t, r.Body) != "forbidden" {
		t.Fatalf("reader token: %d %s", r.Status, r.Body)
	}

	r = do(t, c, "/api/v1/admin", "")
	if www := testenv.Header(r.Headers, "www-authenticate"); r.Status != 401 || !strings.HasPrefix(www, "Bearer") {
		t.Fatalf("no token: %d %q", r.Status, www)
	}

	expired := claims("admin")
	expired["exp"] = now.Add(-time.Hour).Unix()
	other, _ := rsa.GenerateKey(rand.Reader, 2048)
	noneTok := sign(jwt.UnsafeAllowNoneSignatureType, jwt.SigningMethodNone, claims("admin"))
	for name, tok := range map[string]string{
		"expired":      sign(key, jwt.SigningMethodRS256, expired),
		"foreign key":  sign(other, jwt.SigningMethodRS256, claims("admin")),
		"alg none":     noneTok,
		"garbage":      "not.a.token",
		"wrong issuer": sign(key, jwt.SigningMethodRS256, jwt.MapClaims{"iss": "https://evil.example.com", "aud": "api-service", "exp": now.Add(time.Hour).Unix(), "roles": []string{"admin"}}),
	} {
		r := do(t, c, "/api/v1/admin", "", bearer(tok))
		www := testenv.Header(r.Headers, "www-authenticate")
		if r.Status != 401 || r.Forwarded != nil || !strings.Contains(www, `error="invalid_token"`) {
			t.Errorf("%s: %d %q %s", name, r.Status, www, r.Body)
		}
		if strings.Contains(string(r.Body), tok) {
			t.Errorf("%s: the answer echoes the token", name)
		}
	}
	// The token never reaches the logs.
	for _, logs := range []string{e.Agent.Logs.String(), e.Kernel.Logs.String()} {
		if strings.Contains(logs, admin) {
			t.Fatal("a token was logged")
		}
	}
}
