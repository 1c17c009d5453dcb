package faults

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/redis/go-redis/v9"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// Chain entries with a cache (docs/policies/caching.md), over the real binaries: a cached
// result never outlives what it was decided on (a token's exp, the kernel's chain, the
// agent's keys), memory stays within its bounds whatever the clients send, and a policy that
// cannot be cached is refused at load.

func cacheRequests(t *testing.T, e *testenv.Env, policy, route, result string) float64 {
	t.Helper()
	return agentMetric(t, e, fmt.Sprintf(`policy_agent_cache_requests_total{policy=%q,route=%q,result=%q}`, policy, route, result))
}

// TestCacheJWTHonoursExp caches jwtValidation's results for 60 s on a token that expires in
// about 2 s: the second request is answered from the cache, and once exp has passed the token
// is refused, although the TTL has not.
func TestCacheJWTHonoursExp(t *testing.T) {
	issuer, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	keys := newJWKSServer(t)
	keys.serve("/keys", false, map[string]*rsa.PrivateKey{"k1": issuer})
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: bypassAgentYAML, KernelYAML: `policy_kernel:
  server: {message_timeout_ms: 1000}
  agents: [{name: a, socket_path: "{{SOCK}}", timeout_ms: 800}]
  route_policies:
    - route_name: /jwt
      request_policy_chain:
        - policy: jwtValidation
          metadata: {jwks_url: "` + keys.srv.URL + `/keys", leeway: 0s}
          cache: {key: 'request.headers["authorization"]', ttl: 60s}
`})
	c := e.Dial(t, envoyConfig)
	exp := time.Now().Add(2 * time.Second).Truncate(time.Second).Add(time.Second)
	tok := jwt.NewWithClaims(jwt.SigningMethodRS256, jwt.MapClaims{
		"iss": "https://auth.example.com", "aud": "api-service", "sub": "alice",
		"exp": exp.Unix(), "iat": time.Now().Unix(),
	})
	tok.Header["kid"] = "k1"
	signed, err := tok.SignedString(issuer)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if s := play(c, "/jwt", bearer("/jwt", signed)); s.outcome() != "upstream" {
			t.Fatalf("request %d before exp: %s", i, s.outcome())
		}
	}
	if hits := cacheRequests(t, e, "jwtValidation", "/jwt", "hit"); hits != 2 {
		t.Fatalf("cache hits = %v, want 2", hits)
	}
	// exp is a whole second: the token is invalid from exp + 1 s at the latest.
	time.Sleep(time.Until(exp.Add(1100 * time.Millisecond)))
	if s := play(c, "/jwt", bearer("/jwt", signed)); s.outcome() != "401 invalid_token" {
		t.Fatalf("after exp, within the TTL: %s, want 401 invalid_token", s.outcome())
	}
	// The refusal of an expired token is cached in turn.
	if s := play(c, "/jwt", bearer("/jwt", signed)); s.outcome() != "401 invalid_token" {
		t.Fatalf("after exp, again: %s", s.outcome())
	}
	if hits := cacheRequests(t, e, "jwtValidation", "/jwt", "hit"); hits != 3 {
		t.Fatalf("cache hits = %v, want 3", hits)
	}
}

const cacheAgentYAML = `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  policies:
    config:
      apiKeyAuth:
        keys: [{key: cache-key-1, user_id: %s}]
  observability:
    metrics_address: "{{AGENT_METRICS}}"
`

func cacheKernelYAML(userHeader string) string {
	return `policy_kernel:
  server: {message_timeout_ms: 1000}
  agents: [{name: a, socket_path: "{{SOCK}}", timeout_ms: 800}]
  route_policies:
    - route_name: /api
      request_policy_chain:
        - policy: apiKeyAuth
          metadata: {header_name: X-API-Key, user_id_header: ` + userHeader + `}
          cache: {key: 'request.headers["x-api-key"]', ttl: 60s}
`
}

// TestCacheInvalidatedByReloads caches apiKeyAuth's results for 60 s: a kernel reload that
// changes the entry (the user id header) makes the next request run the policy again with
// the new settings, and an agent reload that removes the key refuses it at once.
func TestCacheInvalidatedByReloads(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: fmt.Sprintf(cacheAgentYAML, "alice"), KernelYAML: cacheKernelYAML("X-User-ID")})
	c := e.Dial(t, envoyConfig)
	call := func(what, wantHeader, wantUser string) {
		t.Helper()
		s := play(c, "/api", request("/api", [2]string{"x-api-key", "cache-key-1"}))
		if s.outcome() != "upstream" || testenv.Header(s.res.Forwarded.Headers, wantHeader) != wantUser {
			t.Fatalf("%s: %s, forwarded %v; want %s: %s", what, s.outcome(), s.res.Forwarded, wantHeader, wantUser)
		}
	}
	call("first", "x-user-id", "alice")
	call("cached", "x-user-id", "alice")
	if hits := cacheRequests(t, e, "apiKeyAuth", "/api", "hit"); hits != 1 {
		t.Fatalf("hits = %v, want 1", hits)
	}

	// The kernel's chain changes: a new scope, the policy runs with its new metadata.
	writeAtomically(t, e, e.KernelConfig, cacheKernelYAML("X-Account"))
	e.Reload(t, "config reloaded")
	misses := cacheRequests(t, e, "apiKeyAuth", "/api", "miss")
	call("after the kernel reload", "x-account", "alice")
	if got := cacheRequests(t, e, "apiKeyAuth", "/api", "miss"); got != misses+1 {
		t.Fatalf("misses %v → %v: the changed entry was answered from the old cache", misses, got)
	}
	call("cached again", "x-account", "alice")

	// The agent's keys change: every cached result is dropped.
	writeAtomically(t, e, e.AgentConfig, fmt.Sprintf(strings.Replace(cacheAgentYAML, "key: cache-key-1", "key: cache-key-2", 1), "alice"))
	e.Agent.Reload(t, "config reloaded")
	if s := play(c, "/api", request("/api", [2]string{"x-api-key", "cache-key-1"})); s.outcome() != "403 forbidden" {
		t.Fatalf("a removed key after the agent reload: %s, want 403 forbidden", s.outcome())
	}
}

// TestCacheMemoryBound sends 100,000 distinct keys to an
// entry whose cache keeps at most 1,000 results and 256 KiB: the agent's gauges stay within
// the bounds, and every result it let go is counted as an eviction.
func TestCacheMemoryBound(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: `policy_kernel:
  server: {message_timeout_ms: 1000}
  agents: [{name: a, socket_path: "{{SOCK}}", timeout_ms: 800}]
  route_policies:
    - route_name: /many
      request_policy_chain:
        - policy: allowAll
          cache: {key: 'request.headers["x-client"]', ttl: 60s, max_entries: 1000, max_bytes: 262144}
`})
	c := e.Dial(t, envoyConfig)
	total := 100000
	var next, refused atomic.Int64
	var wg sync.WaitGroup
	deadline := time.Now().Add(3 * time.Minute)
	start := time.Now()
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				n := next.Add(1)
				if n > int64(total) || time.Now().After(deadline) {
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				res, err := c.Do(ctx, request("/many", [2]string{"x-client", fmt.Sprintf("client-%d", n)}), okUpstream)
				cancel()
				if err != nil || res.LocalReply {
					refused.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	sent := min(next.Load()-1, int64(total))
	t.Logf("reliability: cache memory bound: %d distinct keys in %v, %d not answered upstream", sent, time.Since(start).Round(time.Millisecond), refused.Load())
	if refused.Load() > 0 {
		t.Fatalf("%d requests were not let through", refused.Load())
	}
	entries, bytes := agentMetric(t, e, "policy_agent_cache_entries"), agentMetric(t, e, "policy_agent_cache_bytes")
	evicted := agentMetric(t, e, `policy_agent_cache_evictions_total{policy="allowAll",route="/many",reason="bound"}`)
	misses := cacheRequests(t, e, "allowAll", "/many", "miss")
	t.Logf("reliability: cache memory bound: entries=%v bytes=%v evictions=%v misses=%v", entries, bytes, evicted, misses)
	if entries > 1000 || bytes > 262144 {
		t.Fatalf("the cache holds %v results and %v bytes, over its bounds of 1000 and 262144", entries, bytes)
	}
	if misses != float64(sent) || evicted != misses-entries {
		t.Fatalf("misses %v, evictions %v, entries %v: every result stored and let go must be counted (sent %d)", misses, evicted, entries, sent)
	}
}

// TestCacheRefusesUncacheablePolicy checks that a chain caching rateLimit is refused: the
// agent says why, --validate reports it at its line, and the route is invalid (refused) on a
// running kernel.
func TestCacheRefusesUncacheablePolicy(t *testing.T) {
	const kernel = `policy_kernel:
  agents: [{name: a, socket_path: "{{SOCK}}"}]
  route_policies:
    - route_name: /limited
      request_policy_chain:
        - policy: rateLimit
          metadata: {requests_per_second: 10}
          cache: {key: source.address, ttl: 10s}
`
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: kernel, NotReady: true})
	kbin, _ := testenv.Binaries(t)
	out, err := exec.Command(kbin, "--validate", "--config", e.KernelConfig).CombinedOutput()
	want := filepath.Base(e.KernelConfig) + ":6: policy_kernel.route_policies[0].request_policy_chain[0]: agent \"a\" cannot run this entry: policy rateLimit cannot be cached: it counts every request"
	if err == nil || !strings.Contains(string(out), want) {
		t.Fatalf("--validate: %v\n%s\nwant a line with %q", err, out, want)
	}
	c := e.Dial(t, envoyConfig)
	testenv.WaitFor(t, 10*time.Second, "the route to be checked", func() bool {
		s := play(c, "/limited", request("/limited"))
		return s.outcome() == "500 invalid_route"
	})
}

// TestRateLimitOverLimitCache runs rateLimit on a real Redis through the real binaries: once a
// client is over its limit, its later requests are refused by the agent without a Redis call,
// counted as local over-limit refusals, and it is allowed again when its bucket allows.
func TestRateLimitOverLimitCache(t *testing.T) {
	r := testenv.StartRedis(t, "")
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  policies:
    config:
      rateLimit:
        redis: {address: "` + r.Addr + `", timeout_ms: 500}
  observability:
    metrics_address: "{{AGENT_METRICS}}"
`, KernelYAML: `policy_kernel:
  server: {message_timeout_ms: 1000}
  agents: [{name: a, socket_path: "{{SOCK}}", timeout_ms: 800}]
  route_policies:
    - route_name: /limited
      request_policy_chain:
        - policy: rateLimit
          metadata: {requests_per_second: 2, burst: 1, backend: redis, key: "header:x-client", on_backend_error: deny}
`})
	c := e.Dial(t, envoyConfig)
	rc := redis.NewClient(&redis.Options{Addr: r.Addr, Protocol: 2, DisableIdentity: true})
	t.Cleanup(func() { _ = rc.Close() })
	scripts := func() int64 {
		info, err := rc.Info(context.Background(), "commandstats").Result()
		if err != nil {
			t.Fatal(err)
		}
		var n int64
		for _, line := range strings.Split(info, "\r\n") {
			for _, cmd := range []string{"cmdstat_evalsha:calls=", "cmdstat_eval:calls="} {
				if rest, ok := strings.CutPrefix(line, cmd); ok {
					var x int64
					fmt.Sscanf(rest, "%d", &x)
					n += x
				}
			}
		}
		return n
	}
	req := func() *envoytest.Request { return request("/limited", [2]string{"x-client", "c1"}) }
	if s := play(c, "/limited", req()); s.outcome() != "upstream" {
		t.Fatalf("first request: %s", s.outcome())
	}
	refusedAt := time.Now()
	if s := play(c, "/limited", req()); s.outcome() != "429 rate_limited" {
		t.Fatalf("second request: %s", s.outcome())
	}
	before, local := scripts(), agentMetric(t, e, `policy_agent_ratelimit_local_over_limit_total{policy="rateLimit"}`)
	n := 0
	for time.Since(refusedAt) < 350*time.Millisecond && n < 20 {
		if s := play(c, "/limited", req()); s.outcome() != "429 rate_limited" {
			t.Fatalf("refusal %d: %s", n, s.outcome())
		}
		n++
	}
	if got := scripts() - before; got != 0 {
		t.Fatalf("%d Redis calls for %d requests of a client over its limit, want 0", got, n)
	}
	if got := agentMetric(t, e, `policy_agent_ratelimit_local_over_limit_total{policy="rateLimit"}`) - local; got != float64(n) {
		t.Fatalf("local over-limit refusals counted %v, want %d", got, n)
	}
	// At 2 requests a second the bucket allows again 500 ms after the refusal.
	time.Sleep(time.Until(refusedAt.Add(600 * time.Millisecond)))
	if s := play(c, "/limited", req()); s.outcome() != "upstream" {
		t.Fatalf("after the bucket refilled: %s", s.outcome())
	}
	t.Logf("reliability: over-limit cache: %d refusals without Redis", n)
}

// TestCacheScopesDoNotCrossRoutes runs two routes whose chains are the same but for their
// cache scopes over one agent connection: a key answered on one route is a miss on the other.
// The agent keeps a chain by its id with the policies it first came with; before the chain
// ids were taken after the scopes were set, both routes' chains had one id, and the second
// route ran on the first one's scope: a hit on results it never decided.
func TestCacheScopesDoNotCrossRoutes(t *testing.T) {
	kernel := `policy_kernel:
  server: {message_timeout_ms: 1000}
  agents: [{name: a, socket_path: "{{SOCK}}", timeout_ms: 800, connections: 1}]
  route_policies:
    - route_name: /api
      request_policy_chain: &chain
        - policy: apiKeyAuth
          metadata: {header_name: X-API-Key}
          cache: {key: 'request.headers["x-api-key"]', ttl: 60s}
    - route_name: /other
      request_policy_chain: *chain
`
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: fmt.Sprintf(cacheAgentYAML, "alice"), KernelYAML: kernel})
	c := e.Dial(t, envoyConfig)
	for _, route := range []string{"/api", "/other", "/other"} {
		if s := play(c, route, request(route, [2]string{"x-api-key", "cache-key-1"})); s.outcome() != "upstream" {
			t.Fatalf("%s: %s, want upstream", route, s.outcome())
		}
	}
	for _, m := range []struct {
		route, result string
		want          float64
	}{{"/api", "miss", 1}, {"/api", "hit", 0}, {"/other", "miss", 1}, {"/other", "hit", 1}} {
		if got := cacheRequests(t, e, "apiKeyAuth", m.route, m.result); got != m.want {
			t.Errorf("route %s: %s = %v, want %v", m.route, m.result, got, m.want)
		}
	}
}
