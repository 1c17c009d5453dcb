package faults

import (
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// An agent that is fail_open must not become a bypass on demand: a policy that waits on a
// backend (the issuer's JWK Set, Redis) answers with its own decision inside the agent's
// timeout, so that the kernel never gives up on the agent and lets the request through.

// stallTime is how long the JWK Set server takes to answer while it stalls.
const stallTime = 2 * time.Second

// jwksServer serves one JWK Set per path and, for the paths set to stall, answers each fetch
// only after stallTime.
type jwksServer struct {
	srv   *httptest.Server
	mu    sync.Mutex
	sets  map[string][]byte
	stall map[string]bool
	hits  map[string]int
}

func newJWKSServer(t *testing.T) *jwksServer {
	t.Helper()
	s := &jwksServer{sets: map[string][]byte{}, stall: map[string]bool{}, hits: map[string]int{}}
	s.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.hits[r.URL.Path]++
		set, stall := s.sets[r.URL.Path], s.stall[r.URL.Path]
		s.mu.Unlock()
		if stall {
			select {
			case <-time.After(stallTime):
			case <-r.Context().Done():
				return
			}
		}
		if set == nil {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/jwk-set+json")
		w.Write(set)
	}))
	t.Cleanup(s.srv.Close)
	return s
}

// serve publishes the public keys by kid at path; stall makes every fetch of it slow.
func (s *jwksServer) serve(path string, stall bool, keys map[string]*rsa.PrivateKey) {
	type jwk struct {
		Kty string `json:"kty"`
		Kid string `json:"kid"`
		Use string `json:"use"`
		Alg string `json:"alg"`
		N   string `json:"n"`
		E   string `json:"e"`
	}
	var set struct {
		Keys []jwk `json:"keys"`
	}
	for kid, k := range keys {
		set.Keys = append(set.Keys, jwk{Kty: "RSA", Kid: kid, Use: "sig", Alg: "RS256",
			N: base64.RawURLEncoding.EncodeToString(k.N.Bytes()),
			E: base64.RawURLEncoding.EncodeToString(big.NewInt(int64(k.E)).Bytes())})
	}
	b, _ := json.Marshal(set)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sets[path], s.stall[path] = b, stall
}

func (s *jwksServer) setStall(path string, stall bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stall[path] = stall
}

func (s *jwksServer) fetches(path string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.hits[path]
}

const bypassAgentYAML = `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  policies:
    config:
      jwtValidation:
        issuer: "https://auth.example.com"
        audience: "api-service"
  observability:
    metrics_address: "{{AGENT_METRICS}}"
`

// bypassKernelYAML has one fail-open agent with the default 150 ms timeout and a route per JWK
// Set path: jwtValidation with the set as its key source, then roleCheck for admin.
func bypassKernelYAML(jwksURL string, paths ...string) string {
	var routes strings.Builder
	for _, p := range paths {
		fmt.Fprintf(&routes, `    - route_name: %[1]s
      request_policy_chain:
        - policy: jwtValidation
          metadata: {jwks_url: "%[2]s%[1]s"}
        - policy: roleCheck
          metadata: {required_roles: ["admin"]}
`, p, jwksURL)
	}
	return `policy_kernel:
  server:
    message_timeout_ms: 1000
  agents:
    - name: open
      socket_path: "{{SOCK}}"
      timeout_ms: 150
      health_check_interval_ms: 2000
      fail_open: true
  route_policies:
` + routes.String()
}

// minter signs tokens for the test's issuer and audience.
type minter struct {
	t   *testing.T
	now time.Time
}

func (m minter) token(key *rsa.PrivateKey, kid string, roles ...string) string {
	m.t.Helper()
	tok := jwt.NewWithClaims(jwt.SigningMethodRS256, jwt.MapClaims{
		"iss": "https://auth.example.com", "aud": "api-service", "sub": "mallory",
		"exp": m.now.Add(time.Hour).Unix(), "iat": m.now.Unix(), "roles": roles,
	})
	if kid != "" {
		tok.Header["kid"] = kid
	}
	s, err := tok.SignedString(key)
	if err != nil {
		m.t.Fatal(err)
	}
	return s
}

func bearer(path, tok string) *envoytest.Request {
	return request(path, [2]string{"authorization", "Bearer " + tok})
}

// agentBound is the latest a fail-open agent's policy may answer: the agent timeout, and the
// margin a busy machine needs.
const agentBound = 150*time.Millisecond + margin

// TestBypassSlowJWKS attacks a fail-open agent whose jwtValidation takes its keys from a JWK
// Set server that stalls 2 s: forged tokens (signed with the attacker's key, with the issuer's
// kid or a made-up one) sent while the first fetch runs, and while a refetch runs that a
// made-up kid started. None may reach the upstream: the policy answers 503 jwks_unavailable
// while it has no keys and 401 for a kid it does not know, inside the agent timeout, so the
// kernel never falls back to fail_open; roleCheck after it is never skipped; and made-up kids
// cause at most one refetch.
func TestBypassSlowJWKS(t *testing.T) {
	issuer, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	attacker, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	keys := newJWKSServer(t)
	keys.serve("/first", true, map[string]*rsa.PrivateKey{"k1": issuer})
	keys.serve("/refetch", false, map[string]*rsa.PrivateKey{"k1": issuer})
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: bypassAgentYAML, KernelYAML: bypassKernelYAML(keys.srv.URL, "/first", "/refetch")})
	c := e.Dial(t, envoyConfig)
	m := minter{t: t, now: time.Now()}
	check := func(phase string, s shot, want ...string) {
		t.Helper()
		got := s.outcome()
		if got == "upstream" {
			t.Errorf("%s: %s: a forged token reached the upstream (latency %v)", phase, s.route, s.latency)
			return
		}
		if s.latency > agentBound {
			t.Errorf("%s: %s: answered after %v, beyond the agent timeout and a margin", phase, s.route, s.latency)
		}
		for _, w := range want {
			if got == w {
				return
			}
		}
		t.Errorf("%s: %s: %s, want one of %q", phase, s.route, got, want)
	}

	// The first fetch: the first request on /first compiles its chain entry, which starts
	// fetching the set; the server holds that fetch for 2 s.
	forged := map[string]string{
		"attacker key, issuer's kid": m.token(attacker, "k1", "admin"),
		"attacker key, made-up kid":  m.token(attacker, "made-up-1", "admin"),
		"attacker key, no kid":       m.token(attacker, "", "admin"),
	}
	start := time.Now()
	for time.Since(start) < stallTime*3/4 {
		for name, tok := range forged {
			check("first fetch, "+name, play(c, "/first", bearer("/first", tok)), "503 jwks_unavailable")
		}
	}
	if n := keys.fetches("/first"); n != 1 {
		t.Errorf("/first: %d fetches during the first one, want 1", n)
	}

	// A refetch: the set is in use, then stalls; tokens with made-up kids start a refetch.
	if s := play(c, "/refetch", bearer("/refetch", m.token(issuer, "k1", "admin"))); s.outcome() != "upstream" {
		t.Fatalf("/refetch with the issuer's admin token: %s", s.outcome())
	}
	keys.setStall("/refetch", true)
	before := keys.fetches("/refetch")
	start = time.Now()
	for i := 0; time.Since(start) < stallTime*3/4; i++ {
		check("refetch, made-up kid", play(c, "/refetch", bearer("/refetch", m.token(attacker, fmt.Sprintf("made-up-%d", i), "admin"))), "401 invalid_token")
		check("refetch, attacker key with the issuer's kid", play(c, "/refetch", bearer("/refetch", m.token(attacker, "k1", "admin"))), "401 invalid_token")
		// roleCheck still runs after jwtValidation: a genuine token without the role is refused.
		check("refetch, issuer's token without the admin role", play(c, "/refetch", bearer("/refetch", m.token(issuer, "k1", "reader"))), "403 forbidden")
	}
	if n := keys.fetches("/refetch") - before; n > 1 {
		t.Errorf("/refetch: made-up kids caused %d fetches, want at most 1", n)
	}
	// The issuer's tokens are still served meanwhile.
	if s := play(c, "/refetch", bearer("/refetch", m.token(issuer, "k1", "admin"))); s.outcome() != "upstream" {
		t.Errorf("/refetch with the issuer's admin token during the refetch: %s", s.outcome())
	}
	for _, route := range []string{"/first", "/refetch"} {
		if n := metric(t, e, `policy_kernel_requests_total{route="`+route+`",agent="open",status="fail_open"}`); n != 0 {
			t.Errorf("%s: %v requests let through by fail_open", route, n)
		}
	}
	alive(t, e)
}

const bypassRedisAgentYAML = `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  policies:
    config:
      rateLimit:
        redis: {address: "%s", timeout_ms: 1000}
  observability:
    metrics_address: "{{AGENT_METRICS}}"
`

const bypassRedisKernelYAML = `policy_kernel:
  server:
    message_timeout_ms: 1000
  agents:
    - name: open
      socket_path: "{{SOCK}}"
      timeout_ms: 150
      health_check_interval_ms: 2000
      fail_open: true
  route_policies:
    - route_name: /deny
      request_policy_chain:
        - policy: rateLimit
          metadata: {requests_per_second: 1000, burst: 1000, key: route, backend: redis, on_backend_error: deny}
    - route_name: /local
      request_policy_chain:
        - policy: rateLimit
          metadata: {requests_per_second: 0.01, burst: 2, key: route, backend: redis, on_backend_error: local}
`

// TestBypassSlowRedis freezes the Redis of a fail-open agent's rateLimit whose Redis timeout
// (1 s) is longer than the agent timeout (150 ms). The policy must still decide by its
// on_backend_error inside the agent timeout: deny answers 503, local limits with the agent's
// own bucket. A frozen Redis must not become an agent timeout that fail_open lets through.
func TestBypassSlowRedis(t *testing.T) {
	redis := testenv.StartRedis(t, "")
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: fmt.Sprintf(bypassRedisAgentYAML, redis.Addr), KernelYAML: bypassRedisKernelYAML})
	c := e.Dial(t, envoyConfig)
	if s := play(c, "/deny", request("/deny")); s.outcome() != "upstream" {
		t.Fatalf("/deny with Redis up: %s", s.outcome())
	}
	redis.Pause()
	defer redis.Resume()
	var local []string
	for range 6 {
		s := play(c, "/deny", request("/deny"))
		if got := s.outcome(); got != "503 rate_limit_unavailable" {
			t.Errorf("/deny with Redis frozen: %s, want 503 rate_limit_unavailable", got)
		}
		if s.latency > agentBound {
			t.Errorf("/deny: answered after %v, beyond the agent timeout and a margin", s.latency)
		}
		s = play(c, "/local", request("/local"))
		local = append(local, s.outcome())
	}
	// The local bucket holds 2 requests; the rest are limited.
	want := []string{"upstream", "upstream", "429 rate_limited", "429 rate_limited", "429 rate_limited", "429 rate_limited"}
	if strings.Join(local, ", ") != strings.Join(want, ", ") {
		t.Errorf("/local with Redis frozen: %q, want %q", local, want)
	}
	for _, route := range []string{"/deny", "/local"} {
		if n := metric(t, e, `policy_kernel_requests_total{route="`+route+`",agent="open",status="fail_open"}`); n != 0 {
			t.Errorf("%s: %v requests let through by fail_open", route, n)
		}
	}
	alive(t, e)
}
