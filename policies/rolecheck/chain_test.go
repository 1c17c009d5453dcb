package rolecheck_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/rs/zerolog"

	"github.com/policy-engine/policy-engine/agent"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/policies/jwtvalidation"
	_ "github.com/policy-engine/policy-engine/policies/rolecheck"
)

// TestChainThroughExecutor runs the specification's /api/v1/admin chain (jwtValidation, then
// roleCheck admin) through the agent's executor, with keys fetched from a JWK Set server, and
// shows the state hand-off: roleCheck decides on the claims jwtValidation recorded.
func TestChainThroughExecutor(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	var hits atomic.Int64
	jwks, _ := json.Marshal(map[string]any{"keys": []any{map[string]any{
		"kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256",
		"n": base64.RawURLEncoding.EncodeToString(key.N.Bytes()),
		"e": base64.RawURLEncoding.EncodeToString(big.NewInt(int64(key.E)).Bytes()),
	}}})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		hits.Add(1)
		_, _ = w.Write(jwks)
	}))
	defer srv.Close()

	cfg, err := agent.ParseConfig("agent.yaml", []byte(`
agent_core:
  name: test-agent
  socket_path: unused.sock
  policies:
    fail_on_unknown: true
    config:
      jwtValidation:
        jwks_url: "`+srv.URL+`/jwks.json"
        jwks_refresh_interval: 1h
        leeway: 10s
`))
	if err != nil {
		t.Fatal(err)
	}
	exec := agent.NewExecutor(logging.New(io.Discard, "agent", zerolog.InfoLevel))
	if err := exec.Load(cfg.AgentCore, "v1"); err != nil {
		t.Fatal(err)
	}
	defer exec.Close()

	token := func(roles ...string) string {
		now := time.Now()
		tok := jwt.NewWithClaims(jwt.SigningMethodRS256, jwt.MapClaims{
			"iss": "https://auth.example.com", "aud": "api-service", "sub": "alice",
			"iat": now.Unix(), "exp": now.Add(time.Hour).Unix(), "roles": roles,
		})
		tok.Header["kid"] = "k1"
		s, err := tok.SignedString(key)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	adminChain := []*agentv1.Policy{
		{Name: "jwtValidation", Metadata: map[string]string{
			"issuer": "https://auth.example.com", "audience": "api-service",
			"claims_to_headers": `{"sub":"X-User-ID"}`,
		}},
		{Name: "roleCheck", Metadata: map[string]string{"required_roles": `["admin"]`}},
	}
	execute := func(chain []*agentv1.Policy, hdrs map[string]string) *agentv1.PolicyResponse {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return exec.Execute(ctx, &agentv1.PolicyRequest{
			RequestId: "req-1", RouteName: "/api/v1/admin", Phase: agentv1.PolicyPhase_REQUEST, DeadlineMs: 2000,
			Policies: chain,
			Context:  &agentv1.RequestContext{Method: "GET", Path: "/api/v1/admin/users", Headers: hdrs},
		})
	}
	immediate := func(resp *agentv1.PolicyResponse) *agentv1.ImmediateResponse {
		t.Helper()
		for _, in := range resp.GetInstructions() {
			if ir := in.GetImmediateResponse(); ir != nil {
				return ir
			}
		}
		t.Fatalf("no immediate response in %v", resp)
		return nil
	}

	t.Run("admin passes", func(t *testing.T) {
		resp := execute(adminChain, map[string]string{"authorization": "Bearer " + token("admin", "reader"), "x-user-id": "spoofed"})
		if resp.GetStatus().GetCode() != agentv1.StatusCode_OK {
			t.Fatalf("status %v: %s", resp.GetStatus(), resp.GetMessage())
		}
		var userHeader string
		state := map[string]string{}
		for _, in := range resp.GetInstructions() {
			switch in.GetType() {
			case agentv1.InstructionType_SET_HEADER:
				if in.GetHeader().GetKey() == "x-user-id" {
					userHeader = in.GetHeader().GetValue()
				}
			case agentv1.InstructionType_SET_STATE:
				state[in.GetState().GetKey()] = in.GetState().GetValue()
			case agentv1.InstructionType_IMMEDIATE_RESPONSE:
				t.Fatalf("unexpected denial %s", in.GetImmediateResponse().GetBody())
			}
		}
		if userHeader != "alice" || state[jwtvalidation.StateUserID] != "alice" || state[jwtvalidation.StateAuthMethod] != "jwt" {
			t.Errorf("x-user-id %q, state %v", userHeader, state)
		}
		if resp.GetMetadata()["auth_method"] != "jwt" {
			t.Errorf("metadata %v", resp.GetMetadata())
		}
	})
	t.Run("reader is refused by roleCheck", func(t *testing.T) {
		resp := execute(adminChain, map[string]string{"authorization": "Bearer " + token("reader")})
		if resp.GetStatus().GetCode() != agentv1.StatusCode_POLICY_DENIED || resp.GetStatus().GetPolicyName() != "roleCheck" {
			t.Fatalf("status %v", resp.GetStatus())
		}
		if ir := immediate(resp); ir.GetStatusCode() != 403 || string(ir.GetBody()) != `{"error":"forbidden","message":"insufficient role"}` {
			t.Errorf("answer %d %s", ir.GetStatusCode(), ir.GetBody())
		}
	})
	t.Run("no token is refused by jwtValidation", func(t *testing.T) {
		resp := execute(adminChain, map[string]string{})
		if resp.GetStatus().GetPolicyName() != "jwtValidation" {
			t.Fatalf("status %v", resp.GetStatus())
		}
		ir := immediate(resp)
		if ir.GetStatusCode() != 401 || ir.GetHeaders()["www-authenticate"] != "Bearer" {
			t.Errorf("answer %d %v %s", ir.GetStatusCode(), ir.GetHeaders(), ir.GetBody())
		}
	})
	t.Run("roleCheck without jwtValidation fails closed", func(t *testing.T) {
		resp := execute(adminChain[1:], map[string]string{"authorization": "Bearer " + token("admin")})
		if ir := immediate(resp); ir.GetStatusCode() != 403 || string(ir.GetBody()) != `{"error":"forbidden","message":"no verified token claims"}` {
			t.Errorf("answer %d %s", ir.GetStatusCode(), ir.GetBody())
		}
	})
	t.Run("optional token, no token, roleCheck fails closed", func(t *testing.T) {
		chain := []*agentv1.Policy{
			{Name: "jwtValidation", Metadata: map[string]string{"required": "false"}},
			adminChain[1],
		}
		resp := execute(chain, map[string]string{})
		if resp.GetStatus().GetPolicyName() != "roleCheck" || immediate(resp).GetStatusCode() != 403 {
			t.Errorf("status %v", resp.GetStatus())
		}
	})
	t.Run("reload keeps the key set", func(t *testing.T) {
		if err := exec.Load(cfg.AgentCore, "v2"); err != nil {
			t.Fatal(err)
		}
		resp := execute(adminChain, map[string]string{"authorization": "Bearer " + token("admin")})
		if resp.GetStatus().GetCode() != agentv1.StatusCode_OK {
			t.Fatalf("after reload: %v %s", resp.GetStatus(), resp.GetMessage())
		}
		if n := hits.Load(); n != 1 {
			t.Errorf("JWK set fetched %d times across a reload, want 1", n)
		}
	})
	t.Run("health", func(t *testing.T) {
		if err := exec.HealthCheck(t.Context()); err != nil {
			t.Errorf("HealthCheck: %v", err)
		}
		var names []string
		for _, p := range exec.Describe().GetSupportedPolicies() {
			names = append(names, p.GetName())
			if p.GetMetadataSchema() == "" || !json.Valid([]byte(p.GetMetadataSchema())) {
				t.Errorf("policy %s publishes schema %q", p.GetName(), p.GetMetadataSchema())
			}
		}
		if len(names) < 2 {
			t.Errorf("policies %v", names)
		}
	})
}
