package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/agent/policy"
	"github.com/rs/zerolog"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// Runs of the cacheable test policies.
var cacheRuns atomic.Int64

func init() {
	// t.cached allows and sets a header and a state key from the request's "k" header; its
	// metadata "want" chooses: "deny" denies, "error" fails, "expire:<ms>" sets Expires that
	// far ahead, "noreuse" marks the result not reusable, "sleep" sleeps past a short deadline.
	registerModule(policy.Module{Name: "t.cached", Version: "0.0.1", Phases: policy.Both, Cacheable: true}, func(s testSettings) funcPolicy {
		return func(ctx context.Context, c *policy.Context) (policy.Result, error) {
			cacheRuns.Add(1)
			k := c.Headers["k"]
			r := policy.Allow(policy.SetHeader("x-seen", k), policy.SetState("seen", k))
			switch {
			case s.Want == "deny":
				return policy.Deny(401, "no", "denied "+k, nil), nil
			case s.Want == "error":
				return policy.Result{}, errors.New("broken")
			case s.Want == "noreuse":
				return policy.NotReusable(r), nil
			case s.Want == "sleep":
				time.Sleep(s.Sleep)
			case strings.HasPrefix(s.Want, "expire:"):
				var ms int
				fmt.Sscanf(s.Want, "expire:%d", &ms)
				r.Expires = time.Now().Add(time.Duration(ms) * time.Millisecond)
			}
			return r, nil
		}
	})
	registerModule(policy.Module{Name: "t.counter", Version: "0.0.1", Phases: policy.Both, NotCacheable: "it counts every request"}, func(testSettings) funcPolicy {
		return func(context.Context, *policy.Context) (policy.Result, error) { return policy.Allow(), nil }
	})
}

func cached(pol *agentv1.Policy, scope string, ttl time.Duration, key ...string) *agentv1.Policy {
	if len(key) == 0 {
		key = []string{`request.headers["k"]`}
	}
	pol.Cache = &agentv1.CacheSpec{Key: key, TtlMs: ttl.Milliseconds(), Scope: scope}
	return pol
}

func keyed(r *agentv1.PolicyRequest, k string) *agentv1.PolicyRequest {
	r.Context.Headers = map[string]string{"k": k}
	return r
}

func runs(t *testing.T, f func()) int64 {
	t.Helper()
	before := cacheRuns.Load()
	f()
	return cacheRuns.Load() - before
}

func TestCacheReplaysResult(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	pol := cached(p("t.cached"), "s1", time.Minute)
	var first, second *agentv1.PolicyResponse
	if n := runs(t, func() {
		first = e.Execute(context.Background(), keyed(req(pol, p("t.setHeader", "key", "after", "value", "1")), "alice"))
		second = e.Execute(context.Background(), keyed(req(pol, p("t.setHeader", "key", "after", "value", "1")), "alice"))
	}); n != 1 {
		t.Fatalf("policy ran %d times for two requests of one key, want 1", n)
	}
	if first.String() != second.String() {
		t.Fatalf("a hit answers differently:\n%v\n%v", first, second)
	}
	if got := second.GetInstructions()[0].GetHeader().GetValue(); got != "alice" {
		t.Fatalf("replayed header %q", got)
	}
	if n := runs(t, func() { e.Execute(context.Background(), keyed(req(pol), "bob")) }); n != 1 {
		t.Fatalf("another key ran the policy %d times, want 1", n)
	}
	// Another scope (route or config) never sees the results of the first.
	if n := runs(t, func() { e.Execute(context.Background(), keyed(req(cached(p("t.cached"), "s2", time.Minute)), "alice")) }); n != 1 {
		t.Fatalf("another scope reused a result (%d runs)", n)
	}
	if v := metricValue(t, e, `policy_agent_cache_requests_total{policy="t.cached",route="",result="hit"}`); v != 1 {
		t.Fatalf("hits = %v, want 1", v)
	}
	if v := metricValue(t, e, `policy_agent_cache_requests_total{policy="t.cached",route="",result="miss"}`); v != 3 {
		t.Fatalf("misses = %v, want 3", v)
	}
}

func TestCacheDenialReplayed(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	pol := cached(p("t.cached", "want", "deny"), "d", time.Minute)
	var resp *agentv1.PolicyResponse
	if n := runs(t, func() {
		e.Execute(context.Background(), keyed(req(pol), "eve"))
		resp = e.Execute(context.Background(), keyed(req(pol), "eve"))
	}); n != 1 {
		t.Fatalf("denial not reused: %d runs", n)
	}
	if resp.GetStatus().GetCode() != agentv1.StatusCode_POLICY_DENIED || resp.GetMessage() != "denied eve" {
		t.Fatalf("replayed denial = %v", resp)
	}
}

func TestCacheNeverKeepsFailuresOrUnreusable(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	for _, want := range []string{"error", "noreuse"} {
		pol := cached(p("t.cached", "want", want), "f-"+want, time.Minute)
		if n := runs(t, func() {
			e.Execute(context.Background(), keyed(req(pol), "x"))
			e.Execute(context.Background(), keyed(req(pol), "x"))
		}); n != 2 {
			t.Errorf("%s: %d runs, want 2 (never cached)", want, n)
		}
	}
	// A result that came after the chain's deadline is not kept.
	pol := cached(p("t.cached", "want", "sleep", "sleep", "30ms"), "late", time.Minute)
	r := keyed(req(pol), "x")
	r.DeadlineMs = 10
	if n := runs(t, func() {
		if got := e.Execute(context.Background(), r).GetStatus().GetCode(); got != agentv1.StatusCode_TIMEOUT {
			t.Errorf("late run answered %v", got)
		}
		e.Execute(context.Background(), r)
	}); n != 2 {
		t.Errorf("late result reused: %d runs", n)
	}
}

func TestCacheHonoursExpiry(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	pol := cached(p("t.cached", "want", "expire:80"), "exp", time.Minute)
	if n := runs(t, func() {
		e.Execute(context.Background(), keyed(req(pol), "x"))
		e.Execute(context.Background(), keyed(req(pol), "x"))
	}); n != 1 {
		t.Fatalf("%d runs before expiry, want 1", n)
	}
	time.Sleep(100 * time.Millisecond)
	if n := runs(t, func() { e.Execute(context.Background(), keyed(req(pol), "x")) }); n != 1 {
		t.Fatalf("result reused past its expiry")
	}
	// The TTL bounds a result without an expiry.
	short := cached(p("t.cached"), "ttl", 50*time.Millisecond)
	e.Execute(context.Background(), keyed(req(short), "y"))
	time.Sleep(70 * time.Millisecond)
	if n := runs(t, func() { e.Execute(context.Background(), keyed(req(short), "y")) }); n != 1 {
		t.Fatalf("result reused past its TTL")
	}
}

func TestCacheKeyReadsStateAndUncachedOnKeyError(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	// The key reads the state an earlier entry set.
	pol := cached(p("t.cached"), "st", time.Minute, `state["who"]`)
	mk := func(who string) *agentv1.PolicyRequest {
		return keyed(req(p("t.state", "key", "who", "value", who), pol), "h")
	}
	if n := runs(t, func() {
		e.Execute(context.Background(), mk("a"))
		e.Execute(context.Background(), mk("a"))
		e.Execute(context.Background(), mk("b"))
	}); n != 2 {
		t.Fatalf("%d runs, want 2 (one per state value)", n)
	}
	// A key that cannot be computed (the header is absent) runs the policy every time.
	abs := cached(p("t.cached"), "abs", time.Minute, `request.headers["absent"]`)
	if n := runs(t, func() {
		e.Execute(context.Background(), keyed(req(abs), "x"))
		e.Execute(context.Background(), keyed(req(abs), "x"))
	}); n != 2 {
		t.Fatalf("%d runs, want 2", n)
	}
	if v := metricValue(t, e, `policy_agent_cache_requests_total{policy="t.cached",route="",result="uncached"}`); v != 2 {
		t.Fatalf("uncached = %v", v)
	}
}

func TestCacheBounds(t *testing.T) {
	core := testCore()
	core.ResourceLimits.MaxCacheBytes = 1 << 30
	e, _ := newTestExecutor(t, core)
	pol := cached(p("t.cached"), "b", time.Minute)
	pol.Cache.MaxEntries = 10
	for i := range 100 {
		e.Execute(context.Background(), keyed(req(pol), fmt.Sprint(i)))
	}
	c, _ := e.snap.Load().caches.byScope.Load("b")
	if len(c.items) != 10 {
		t.Fatalf("%d entries, want 10", len(c.items))
	}
	if v := metricValue(t, e, `policy_agent_cache_evictions_total{policy="t.cached",route="",reason="bound"}`); v != 90 {
		t.Fatalf("evictions = %v, want 90", v)
	}
	// The most recent keys stay.
	if n := runs(t, func() { e.Execute(context.Background(), keyed(req(pol), "99")) }); n != 0 {
		t.Fatal("the most recent key was evicted")
	}
	// Bytes: an entry bound of about three results.
	pb := cached(p("t.cached"), "bytes", time.Minute)
	pb.Cache.MaxBytes = 3 * resultSize(policy.Allow(policy.SetHeader("x-seen", "10"), policy.SetState("seen", "10")))
	for i := range 20 {
		e.Execute(context.Background(), keyed(req(pb), fmt.Sprint(10+i)))
	}
	cb, _ := e.snap.Load().caches.byScope.Load("bytes")
	if len(cb.items) != 3 || cb.bytes > pb.Cache.MaxBytes {
		t.Fatalf("%d entries of %d bytes, want 3 within %d", len(cb.items), cb.bytes, pb.Cache.MaxBytes)
	}
}

func TestCacheGlobalBound(t *testing.T) {
	core := testCore()
	one := resultSize(policy.Allow(policy.SetHeader("x-seen", "10"), policy.SetState("seen", "10")))
	core.ResourceLimits.MaxCacheBytes = 5 * one
	e, _ := newTestExecutor(t, core)
	for s := range 4 {
		pol := cached(p("t.cached"), fmt.Sprint("g", s), time.Minute)
		for i := range 10 {
			e.Execute(context.Background(), keyed(req(pol), fmt.Sprint(10+i)))
		}
	}
	if got := e.snap.Load().caches.bytes.Load(); got > core.ResourceLimits.MaxCacheBytes {
		t.Fatalf("caches hold %d bytes, over the agent's bound of %d", got, core.ResourceLimits.MaxCacheBytes)
	}
}

func TestCacheDroppedOnReloadAndWhenIdle(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	pol := cached(p("t.cached"), "r", time.Minute)
	e.Execute(context.Background(), keyed(req(pol), "x"))
	old := e.snap.Load().caches
	if err := e.Load(testCore(), "v2"); err != nil {
		t.Fatal(err)
	}
	if n := runs(t, func() { e.Execute(context.Background(), keyed(req(pol), "x")) }); n != 1 {
		t.Fatal("a result survived an agent config reload")
	}
	if old.bytes.Load() != 0 || old.byScope.Size() != 0 {
		t.Fatalf("the replaced config's caches still hold %d bytes in %d caches", old.bytes.Load(), old.byScope.Size())
	}
	// A scope unused for its TTL (a chain the kernel no longer sends) is dropped whole.
	idle := cached(p("t.cached"), "idle", 100*time.Millisecond)
	e.Execute(context.Background(), keyed(req(idle), "x"))
	caches := e.snap.Load().caches
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, ok := caches.byScope.Load("idle")
		if !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("an idle scope was not dropped")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestValidateChainsRefusesUncacheable(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	spec := &agentv1.CacheSpec{Key: []string{`request.headers["k"]`}, TtlMs: 1000}
	got := e.ValidateChains([]*agentv1.ChainEntry{
		{Policy: &agentv1.Policy{Name: "t.counter", Cache: spec}, Phase: agentv1.PolicyPhase_REQUEST},
		{Policy: &agentv1.Policy{Name: "t.cached", Cache: spec}, Phase: agentv1.PolicyPhase_REQUEST},
		{Policy: &agentv1.Policy{Name: "t.cached", Cache: &agentv1.CacheSpec{Key: []string{`request.nope`}, TtlMs: 1000}}, Phase: agentv1.PolicyPhase_REQUEST},
		{Policy: &agentv1.Policy{Name: "t.cached", Cache: &agentv1.CacheSpec{Key: []string{`request.method`}}}, Phase: agentv1.PolicyPhase_REQUEST},
	})
	if got[0] != "policy t.counter cannot be cached: it counts every request" {
		t.Errorf("uncacheable: %q", got[0])
	}
	if got[1] != "" {
		t.Errorf("cacheable refused: %q", got[1])
	}
	if !strings.Contains(got[2], "invalid cache key") {
		t.Errorf("bad key: %q", got[2])
	}
	if !strings.Contains(got[3], "ttl") {
		t.Errorf("no ttl: %q", got[3])
	}
	if f := e.Describe().GetAgentMetadata()["features"]; !strings.Contains(","+f+",", ",cache,") {
		t.Errorf("features = %q", f)
	}
}

// TestCacheConcurrent runs many chains on a few keys at once (go test -race): hits share the
// stored result read-only while misses store.
func TestCacheConcurrent(t *testing.T) {
	e := NewExecutor(logging.New(&testenv.SyncBuffer{}, "agent", zerolog.DebugLevel))
	if err := e.Load(testCore(), "v1"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	pol := cached(p("t.cached"), "conc", time.Minute)
	pol.Cache.MaxEntries = 3
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 200 {
				k := fmt.Sprint((w + i) % 5)
				resp := e.Execute(context.Background(), keyed(req(pol, p("t.setHeader", "key", "after", "value", k)), k))
				if _, err := proto.Marshal(resp); err != nil || resp.GetInstructions()[0].GetHeader().GetValue() != k {
					t.Errorf("key %s: %v %v", k, resp, err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// TestCacheGlobalBoundReclaimsStaleScopes checks that when the agent's bound is reached, the
// results of scopes no longer used (a replaced kernel config) make room for the ones in use.
func TestCacheGlobalBoundReclaimsStaleScopes(t *testing.T) {
	core := testCore()
	one := resultSize(policy.Allow(policy.SetHeader("x-seen", "10"), policy.SetState("seen", "10")))
	core.ResourceLimits.MaxCacheBytes = 10 * one
	e, _ := newTestExecutor(t, core)
	old := cached(p("t.cached"), "old", time.Minute)
	for i := range 10 {
		e.Execute(context.Background(), keyed(req(old), fmt.Sprint(10+i)))
	}
	time.Sleep(5 * time.Millisecond)
	cur := cached(p("t.cached"), "new", time.Minute)
	for i := range 10 {
		e.Execute(context.Background(), keyed(req(cur), fmt.Sprint(10+i)))
	}
	caches := e.snap.Load().caches
	n, _ := caches.byScope.Load("new")
	o, _ := caches.byScope.Load("old")
	if len(n.items) != 10 || len(o.items) != 0 || caches.bytes.Load() > core.ResourceLimits.MaxCacheBytes {
		t.Fatalf("new scope holds %d, old %d, %d bytes of %d", len(n.items), len(o.items), caches.bytes.Load(), core.ResourceLimits.MaxCacheBytes)
	}
}
