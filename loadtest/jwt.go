package loadtest

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// Scenarios: which request chain the kernel+agent targets run.
const (
	// scenarioAPIKey is apiKeyAuth + rateLimit, the default.
	scenarioAPIKey = "apikey"
	// scenarioJWT is jwtValidation (RS256, a 2048-bit key) + rateLimit: the token is verified
	// on every request.
	scenarioJWT = "jwt"
	// scenarioJWTCached is scenarioJWT with the jwtValidation entry cached by the
	// authorization header (docs/policies/caching.md). The traffic carries one token, so every
	// request after the first is a cache hit: the best case, which bounds what the cache can
	// save.
	scenarioJWTCached = "jwt-cached"
)

// jwtSetup is the key and token of a JWT scenario.
type jwtSetup struct {
	publicPEM string
	token     string
}

func newJWTSetup() (*jwtSetup, error) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return nil, err
	}
	tok, err := jwt.NewWithClaims(jwt.SigningMethodRS256, jwt.MapClaims{
		"iss": "https://auth.loadtest.example", "aud": "loadtest", "sub": "loadtest-user",
		"iat": time.Now().Unix(), "exp": time.Now().Add(24 * time.Hour).Unix(),
	}).SignedString(key)
	if err != nil {
		return nil, err
	}
	return &jwtSetup{publicPEM: string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})), token: tok}, nil
}

// agentSection is the jwtValidation section of the agent config.
func (j *jwtSetup) agentSection() string {
	return fmt.Sprintf(`      jwtValidation:
        issuer: "https://auth.loadtest.example"
        audience: "loadtest"
        public_key_pem: %q
`, j.publicPEM)
}

// firstEntry is the chain's first entry in a JWT scenario.
func jwtEntry(cached bool) string {
	e := `        - policy: "jwtValidation"
          metadata:
            claims_to_headers: {sub: X-User-ID}
`
	if cached {
		e += `          cache: {key: 'request.headers["authorization"]', ttl: 60s}
`
	}
	return e
}

// configs turns the apikey scenario's agent and kernel configs into the JWT scenario's; a nil
// setup leaves them as they are.
func (j *jwtSetup) configs(agentCfg, kernelCfg string, cached bool) (string, string) {
	if j == nil {
		return agentCfg, kernelCfg
	}
	agentCfg = strings.Replace(agentCfg, "      apiKeyAuth:\n", j.agentSection()+"      apiKeyAuth:\n", 1)
	return agentCfg, strings.Replace(kernelCfg, kernelAPIKeyEntry, jwtEntry(cached), 1)
}

// traffic is the default traffic with the token instead of the API key.
func (j *jwtSetup) traffic(tr *Traffic) *Traffic {
	for i, h := range tr.RequestHeaders {
		if h[0] == "x-api-key" {
			tr.RequestHeaders[i] = [2]string{"authorization", "Bearer " + j.token}
		}
	}
	return tr
}

// scenarioChain names the request chain of a scenario, from the default one.
func scenarioChain(scenario, chain string) string {
	switch scenario {
	case scenarioJWT:
		return strings.Replace(chain, "apiKeyAuth", "jwtValidation", 1)
	case scenarioJWTCached:
		return strings.Replace(chain, "apiKeyAuth", "jwtValidation (cached)", 1)
	}
	return chain
}
