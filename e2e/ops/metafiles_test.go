package ops

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// signingKey is an EC key with the JWK Set that publishes it under kid.
type signingKey struct {
	kid  string
	priv *ecdsa.PrivateKey
}

func newSigningKey(t *testing.T, kid string) signingKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return signingKey{kid: kid, priv: k}
}

func (k signingKey) jwks(t *testing.T) string {
	t.Helper()
	point, err := k.priv.PublicKey.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	b64 := base64.RawURLEncoding.EncodeToString
	return fmt.Sprintf(`{"keys":[{"kty":"EC","crv":"P-256","kid":%q,"use":"sig","alg":"ES256","x":%q,"y":%q}]}`, k.kid, b64(point[1:33]), b64(point[33:]))
}

func (k signingKey) token(t *testing.T) string {
	t.Helper()
	tok := jwt.NewWithClaims(jwt.SigningMethodES256, jwt.MapClaims{
		"iss": "https://issuer.example", "sub": "alice", "exp": time.Now().Add(time.Hour).Unix(),
	})
	tok.Header["kid"] = k.kid
	s, err := tok.SignedString(k.priv)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestAgentFollowsRouteJWKSFile: a jwks_file named in a route's metadata in the kernel's config
// (not in the agent's own config) is followed too: when the kubelet swaps the file, the agent
// drops the compiled entry and the next request is judged by the new key set.
func TestAgentFollowsRouteJWKSFile(t *testing.T) {
	k1, k2 := newSigningKey(t, "k1"), newSigningKey(t, "k2")
	dir := t.TempDir()
	keys := testenv.NewKubeDir(t, filepath.Join(dir, "keys"), map[string]string{"jwks.json": k1.jwks(t)})
	kernelYAML := fmt.Sprintf(`policy_kernel:
  server: {message_timeout_ms: 1000}
  agents:
    - name: default-agent
      socket_path: "{{SOCK}}"
      timeout_ms: 800
  route_policies:
    - route_name: /jwt
      request_policy_chain:
        - policy: jwtValidation
          metadata: {issuer: "https://issuer.example", jwks_file: %q}
`, keys.Path("jwks.json"))
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
`, KernelYAML: kernelYAML, WatchConfig: true})
	c := e.Dial(t, envoytest.FilterConfig{AllowModeOverride: true, RequestAttributes: []string{"xds.route_name"}, MessageTimeout: time.Second})
	status := func(tok string) int {
		t.Helper()
		req := &envoytest.Request{Path: "/jwt", Headers: [][2]string{{"authorization", "Bearer " + tok}},
			Attributes: map[string]string{"xds.route_name": "/jwt"}}
		res, err := c.Do(context.Background(), req, nil)
		if err != nil {
			t.Fatal(err)
		}
		return res.Status
	}
	if got := status(k1.token(t)); got != 200 {
		t.Fatalf("k1 before the swap: %d, want 200", got)
	}
	if got := status(k2.token(t)); got != 401 {
		t.Fatalf("k2 before the swap: %d, want 401", got)
	}
	keys.Update(t, map[string]string{"jwks.json": k2.jwks(t)})
	testenv.WaitFor(t, 10*time.Second, "the new key set to be in force", func() bool { return status(k2.token(t)) == 200 })
	if got := status(k1.token(t)); got != 401 {
		t.Errorf("k1 after the swap: %d, want 401", got)
	}
	testenv.WaitFor(t, 5*time.Second, "the agent to log the rebuilt entry", func() bool {
		return strings.Contains(e.Agent.Output(), "files named by chain entries changed")
	})
}
