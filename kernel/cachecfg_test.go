package kernel

import (
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

const cacheConfig = `policy_kernel:
  agents: [{name: a, socket_path: /unused.sock}]
  route_policies:
    - route_name: one
      request_policy_chain:
        - policy: auth
          metadata: {header_name: X-API-Key}
          cache: {key: 'request.headers["x-api-key"]', ttl: 30s, max_entries: 100}
        - policy: allowAll
    - route_name: two
      request_policy_chain:
        - policy: auth
          metadata: {header_name: X-API-Key}
          cache: {key: 'request.headers["x-api-key"]', ttl: 30s, max_entries: 100}
        - policy: allowAll
`

func cacheInfo(features string) *agentv1.GetAgentConfigResponse {
	info := testInfo()
	info.AgentMetadata = map[string]string{"features": features}
	return info
}

func scopeOf(t *testing.T, k *testKernel, route string) *agentv1.CacheSpec {
	t.Helper()
	r := k.s.Snapshot().route(route, "/x")
	if r == nil || r.invalid != "" {
		t.Fatalf("route %q: %+v", route, r)
	}
	c := r.request.policies[0].GetCache()
	if c.GetScope() == "" {
		t.Fatalf("route %q: no scope in %v", route, c)
	}
	return c
}

// TestCacheSentWithScope checks that a cached entry goes to the agent with its settings and a
// scope that differs per route and changes with any entry of the chain, and only then.
func TestCacheSentWithScope(t *testing.T) {
	k := newTestKernel(t, cacheConfig, &fakeAgent{info: cacheInfo("when,cache")})
	one, two := scopeOf(t, k, "one"), scopeOf(t, k, "two")
	if one.GetTtlMs() != 30000 || one.GetMaxEntries() != 100 || len(one.GetKey()) != 1 || one.GetKey()[0] != `request.headers["x-api-key"]` {
		t.Fatalf("spec %v", one)
	}
	if one.GetScope() == two.GetScope() {
		t.Fatal("two routes share a cache scope")
	}
	// An agent keeps a chain by its id with the policies it first came with, scope included:
	// two routes' chains that differ only by their scopes must not share an id, or one route
	// would run on the other's cached results.
	ro, rt := k.s.Snapshot().route("one", "/x"), k.s.Snapshot().route("two", "/x")
	if ro.request.ids[partAll] == 0 || ro.request.ids[partAll] == rt.request.ids[partAll] {
		t.Fatalf("chain ids %d and %d for two routes' chains with different scopes", ro.request.ids[partAll], rt.request.ids[partAll])
	}
	if k.s.Snapshot().route("one", "/x").request.policies[1].GetCache() != nil {
		t.Fatal("an entry without cache got one")
	}
	same := newTestKernel(t, cacheConfig, &fakeAgent{info: cacheInfo("cache")})
	if scopeOf(t, same, "one").GetScope() != one.GetScope() {
		t.Fatal("the same chain got another scope")
	}
	for name, edit := range map[string][2]string{
		"ttl":         {"ttl: 30s, max_entries: 100}\n        - policy: allowAll\n    - route_name: two", "ttl: 31s, max_entries: 100}\n        - policy: allowAll\n    - route_name: two"},
		"later entry": {"- policy: allowAll\n    - route_name: two", "- policy: allowAll\n          on_failure: continue\n    - route_name: two"},
		"metadata":    {"metadata: {header_name: X-API-Key}\n          cache: {key: 'request.headers[\"x-api-key\"]', ttl: 30s, max_entries: 100}\n        - policy: allowAll\n    - route_name: two", "metadata: {header_name: X-Key}\n          cache: {key: 'request.headers[\"x-api-key\"]', ttl: 30s, max_entries: 100}\n        - policy: allowAll\n    - route_name: two"},
	} {
		cfg := strings.Replace(cacheConfig, edit[0], edit[1], 1)
		if cfg == cacheConfig {
			t.Fatalf("%s: edit not applied", name)
		}
		changed := newTestKernel(t, cfg, &fakeAgent{info: cacheInfo("cache")})
		if scopeOf(t, changed, "one").GetScope() == one.GetScope() {
			t.Errorf("%s changed, the scope did not", name)
		}
		if scopeOf(t, changed, "two").GetScope() != two.GetScope() {
			t.Errorf("%s of another route changed this route's scope", name)
		}
	}
}

// TestCacheNeedsAgentFeature checks that a route caching an entry on an agent that does not
// advertise the cache feature is invalid.
func TestCacheNeedsAgentFeature(t *testing.T) {
	k := newTestKernel(t, cacheConfig, &fakeAgent{info: cacheInfo("when")})
	r := k.s.Snapshot().route("one", "/x")
	if !strings.Contains(r.invalid, `agent "a" does not support cache`) {
		t.Fatalf("route invalid = %q", r.invalid)
	}
}

// TestCacheEntryKey checks that entries differing only by their cache settings get their own
// agent verdicts, and that the scope does not matter to them.
func TestCacheEntryKey(t *testing.T) {
	a := &agentv1.Policy{Name: "auth"}
	b := &agentv1.Policy{Name: "auth", Cache: &agentv1.CacheSpec{Key: []string{"request.method"}, TtlMs: 1}}
	c := &agentv1.Policy{Name: "auth", Cache: &agentv1.CacheSpec{Key: []string{"request.method"}, TtlMs: 1, Scope: "x"}}
	if entryKey(a, 0) == entryKey(b, 0) {
		t.Fatal("cache settings not in the entry key")
	}
	if entryKey(b, 0) != entryKey(c, 0) {
		t.Fatal("the scope is in the entry key")
	}
}

// TestCacheInConfigDump checks that /config shows an entry's cache with its scope.
func TestCacheInConfigDump(t *testing.T) {
	k := newTestKernel(t, cacheConfig, &fakeAgent{info: cacheInfo("cache")})
	d := dumpChain(k.s.Snapshot().route("one", "/x").request.policies)
	if c := d[0].Cache; c == nil || c.TTL != "30s" || c.Scope == "" || c.MaxEntries != 100 || d[1].Cache != nil {
		t.Fatalf("dump %+v", d)
	}
}

// TestCacheKeyShapes: a cache key is one CEL expression or a list of them; any other shape is
// an error at its line that names what was found.
func TestCacheKeyShapes(t *testing.T) {
	for key, want := range map[string]string{
		`{a: b}`:        `kernel.yaml:7: policy_kernel.route_policies[0].request_policy_chain[0].cache.key: want a CEL expression or a list of them, got a map`,
		`['x', [y]]`:    `kernel.yaml:7: policy_kernel.route_policies[0].request_policy_chain[0].cache.key: want a CEL expression (a string), got a list`,
		`['x', {y: z}]`: `kernel.yaml:7: policy_kernel.route_policies[0].request_policy_chain[0].cache.key: want a CEL expression (a string), got a map`,
	} {
		_, err := ParseConfig("kernel.yaml", []byte(`policy_kernel:
  agents: [{name: a, socket_path: /unused.sock}]
  route_policies:
    - route_name: one
      request_policy_chain:
        - policy: auth
          cache: {key: `+key+`, ttl: 30s, max_entries: 100}
`))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", key, err, want)
		}
	}
	if got := nodeKind(&yaml.Node{Kind: yaml.ScalarNode}); got != "value" {
		t.Errorf("scalar: %s", got)
	}
}
