package bench

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/policy-engine/policy-engine/agent"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	_ "github.com/policy-engine/policy-engine/policies/all"
)

const agentYAML = `agent_core:
  name: bench
  socket_path: /unused.sock
  policies:
    config:
      apiKeyAuth:
        keys: [{key: bench-key, user_id: bench-user}]
      jwtValidation:
        public_key_pem: |
%s
      auditLog:
        sink: file
        path: %s
`

func executor(b *testing.B) *agent.Executor {
	b.Helper()
	pub, err := os.ReadFile("../config/demo/jwt-demo-public.pem")
	if err != nil {
		b.Fatal(err)
	}
	var lines []string
	for _, l := range strings.Split(strings.TrimSpace(string(pub)), "\n") {
		lines = append(lines, "          "+l)
	}
	cfg, err := agent.ParseConfig("bench.yaml", []byte(
		strings.Replace(strings.Replace(agentYAML, "%s", strings.Join(lines, "\n"), 1), "%s", b.TempDir()+"/audit.log", 1)))
	if err != nil {
		b.Fatal(err)
	}
	e := agent.NewExecutor(logging.New(os.Stderr, "agent", 3))
	if err := e.Load(cfg.AgentCore, "bench"); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(e.Close)
	return e
}

func demoToken(b *testing.B) string {
	b.Helper()
	data, err := os.ReadFile("../config/demo/jwt-demo-private.pem")
	if err != nil {
		b.Fatal(err)
	}
	block, _ := pem.Decode(data)
	key, err := x509.ParseECPrivateKey(block.Bytes)
	if err != nil {
		b.Fatal(err)
	}
	tok, err := jwt.NewWithClaims(jwt.SigningMethodES256, jwt.MapClaims{"iss": "https://auth.example.com", "aud": "api-service",
		"sub": "bench", "roles": []string{"admin"}, "exp": time.Now().Add(time.Hour).Unix()}).SignedString(key)
	if err != nil {
		b.Fatal(err)
	}
	return tok
}

// run executes req on e in parallel b.N times and fails on any answer but OK.
func run(b *testing.B, e *agent.Executor, mk func() *agentv1.PolicyRequest) {
	b.Helper()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if r := e.Execute(context.Background(), mk()); r.GetStatus().GetCode() != agentv1.StatusCode_OK {
				b.Fatalf("chain answered %v: %s", r.GetStatus(), r.GetMessage())
			}
		}
	})
}

func headers(kv ...string) map[string]string {
	m := map[string]string{"user-agent": "bench", "accept": "*/*", "x-request-id": "r"}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m
}

// BenchmarkUsersRequestChain is the example's /api/v1/users request chain: apiKeyAuth, then
// rateLimit per user with a limit that is never hit.
func BenchmarkUsersRequestChain(b *testing.B) {
	e := executor(b)
	chain := []*agentv1.Policy{
		{Name: "apiKeyAuth", Metadata: map[string]string{"header_name": "X-API-Key", "required": "true"}},
		{Name: "rateLimit", Metadata: map[string]string{"requests_per_second": "1e9", "burst": "1000000000", "key": "state:user_id"}},
	}
	run(b, e, func() *agentv1.PolicyRequest {
		return &agentv1.PolicyRequest{Policies: chain, Phase: agentv1.PolicyPhase_REQUEST, RouteName: "/api/v1/users",
			Context: &agentv1.RequestContext{Method: "GET", Path: "/api/v1/users/7", Headers: headers("x-api-key", "bench-key")}}
	})
}

// BenchmarkUsersResponseChain is the example's /api/v1/users response chain: security headers
// and internal_id removed from a small JSON body.
func BenchmarkUsersResponseChain(b *testing.B) {
	e := executor(b)
	chain := []*agentv1.Policy{
		{Name: "addSecurityHeaders", Metadata: map[string]string{"headers": `{"X-Content-Type-Options":"nosniff","X-Frame-Options":"DENY"}`}},
		{Name: "responseBodyTransform", Metadata: map[string]string{"remove_fields": `["internal_id"]`}},
	}
	body := []byte(`{"id":7,"internal_id":"db-000123","name":"Ada","items":[{"sku":"A","internal_id":1},{"sku":"B"}]}`)
	run(b, e, func() *agentv1.PolicyRequest {
		return &agentv1.PolicyRequest{Policies: chain, Phase: agentv1.PolicyPhase_RESPONSE, RouteName: "/api/v1/users",
			Context:  &agentv1.RequestContext{Method: "GET", Path: "/api/v1/users/7", Headers: headers()},
			Response: &agentv1.ResponseContext{StatusCode: 200, Headers: map[string]string{"content-type": "application/json"}, Body: body}}
	})
}

// BenchmarkAdminRequestChain is the example's /api/v1/admin request chain: auditLog,
// jwtValidation (ES256) and roleCheck. The signature check dominates.
func BenchmarkAdminRequestChain(b *testing.B) {
	e := executor(b)
	tok := demoToken(b)
	chain := []*agentv1.Policy{
		{Name: "auditLog"},
		{Name: "jwtValidation", Metadata: map[string]string{"issuer": "https://auth.example.com", "audience": "api-service", "claims_to_headers": `{"sub":"X-User-ID"}`}},
		{Name: "roleCheck", Metadata: map[string]string{"required_roles": `["admin"]`}},
	}
	run(b, e, func() *agentv1.PolicyRequest {
		return &agentv1.PolicyRequest{Policies: chain, Phase: agentv1.PolicyPhase_REQUEST, RouteName: "/api/v1/admin",
			Context: &agentv1.RequestContext{Method: "GET", Path: "/api/v1/admin", Headers: headers("authorization", "Bearer "+tok)}}
	})
}
