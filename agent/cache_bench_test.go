package agent_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/rs/zerolog"

	"github.com/policy-engine/policy-engine/agent"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
)

// BenchmarkJWTCache runs a jwtValidation (RS256) chain in the executor: "uncached" verifies
// the token on every request; "hit" answers from the entry's cache (the key: the
// authorization header); "miss" computes a key that is new every time, so it verifies and
// stores, the cost of a cache that never hits.
func BenchmarkJWTCache(b *testing.B) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		b.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	pub := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
	cfg, err := agent.ParseConfig("bench.yaml", fmt.Appendf(nil, `agent_core:
  name: bench
  socket_path: unused.sock
  policies:
    config:
      jwtValidation:
        issuer: https://auth.example.com
        audience: api
        public_key_pem: %q
`, pub))
	if err != nil {
		b.Fatal(err)
	}
	exec := agent.NewExecutor(logging.New(io.Discard, "agent", zerolog.ErrorLevel))
	if err := exec.Load(cfg.AgentCore, "bench"); err != nil {
		b.Fatal(err)
	}
	defer exec.Close()
	tok, err := jwt.NewWithClaims(jwt.SigningMethodRS256, jwt.MapClaims{
		"iss": "https://auth.example.com", "aud": "api", "sub": "bench-user",
		"exp": time.Now().Add(time.Hour).Unix(), "iat": time.Now().Unix(), "roles": []string{"reader"},
	}).SignedString(key)
	if err != nil {
		b.Fatal(err)
	}
	headers := map[string]string{"authorization": "Bearer " + tok, "user-agent": "bench/1.0", "accept": "application/json"}
	rc := &agentv1.RequestContext{Headers: headers, Method: "GET", Path: "/api/v1/users/42", Scheme: "https", Authority: "api.example.com"}
	entry := func(cache *agentv1.CacheSpec) *agentv1.PolicyRequest {
		return &agentv1.PolicyRequest{Phase: agentv1.PolicyPhase_REQUEST, Context: rc, RouteName: "/api", DeadlineMs: 150,
			Policies: []*agentv1.Policy{{Name: "jwtValidation", Cache: cache}}}
	}
	byToken := &agentv1.CacheSpec{Key: []string{`request.headers["authorization"]`}, TtlMs: 60000, Scope: "bench-hit"}
	byRequest := &agentv1.CacheSpec{Key: []string{`request.headers["authorization"]`, `request.headers["x-n"]`}, TtlMs: 60000, Scope: "bench-miss"}
	if resp := exec.Execute(context.Background(), entry(byToken)); !strings.Contains(resp.String(), "bench-user") {
		b.Fatalf("reply %v", resp)
	}
	for _, c := range []struct {
		name string
		req  *agentv1.PolicyRequest
		vary bool
	}{
		{"uncached", entry(nil), false},
		{"hit", entry(byToken), false},
		{"miss", entry(byRequest), true},
	} {
		b.Run(c.name, func(b *testing.B) {
			ctx := context.Background()
			b.ReportAllocs()
			n := 0
			for b.Loop() {
				if c.vary {
					n++
					headers["x-n"] = strconv.Itoa(n)
				}
				resp := exec.Execute(ctx, c.req)
				if resp.GetStatus().GetCode() != agentv1.StatusCode_OK || len(resp.GetInstructions()) != 3 {
					b.Fatalf("reply %v", resp)
				}
			}
			delete(headers, "x-n")
		})
	}
}
