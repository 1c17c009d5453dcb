package ratelimit

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// scriptCalls is how many times Redis ran the bucket script (EVALSHA and EVAL).
func scriptCalls(t *testing.T, r *testenv.Redis) int64 {
	t.Helper()
	info, err := redisClient(t, r).Info(context.Background(), "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, line := range strings.Split(info, "\r\n") {
		for _, cmd := range []string{"cmdstat_evalsha:", "cmdstat_eval:"} {
			if rest, ok := strings.CutPrefix(line, cmd); ok {
				calls, _, _ := strings.Cut(strings.TrimPrefix(rest, "calls="), ",")
				x, _ := strconv.ParseInt(calls, 10, 64)
				n += x
			}
		}
	}
	return n
}

func overLimitFactory(t *testing.T, r *testenv.Redis, entries string) *Factory {
	t.Helper()
	extra := ""
	if entries != "" {
		extra = `, "over_limit_cache_entries": ` + entries
	}
	raw := fmt.Sprintf(`{"redis": {"address": %q, "timeout_ms": 1000%s}}`, r.Addr, extra)
	f, err := New(policy.Config{Raw: json.RawMessage(raw), Shared: &sync.Map{}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.(*Factory).Close() })
	return f.(*Factory)
}

// TestRedisOverLimitCache checks the local over-limit cache against a real Redis: after the
// first refusal, later requests of the key are refused without a Redis call, with the same
// answer; other keys still ask Redis; the key is allowed again once its bucket allows, which
// for GCRA is the refusal's retry-after.
func TestRedisOverLimitCache(t *testing.T) {
	r := testenv.StartRedis(t, "")
	f := overLimitFactory(t, r, "")
	// 4 requests a second, burst 1: a refused key allows again within 250 ms.
	p := mustBuild(t, f, map[string]string{"requests_per_second": "4", "burst": "1", "backend": "redis", "on_backend_error": "deny"})
	if res := execute(t, p, request("users", "192.0.2.1")); res.Status != agentv1.StatusCode_OK {
		t.Fatalf("first request: %v", res)
	}
	start := time.Now()
	first := immediate(execute(t, p, request("users", "192.0.2.1")))
	if first.GetStatusCode() != 429 {
		t.Fatalf("second request: %v", first)
	}
	calls, local := scriptCalls(t, r), localOverLimit.Get()
	for i := range 20 {
		ir := immediate(execute(t, p, request("users", "192.0.2.1")))
		if ir.GetStatusCode() != 429 || ir.GetHeaders()["retry-after"] != "1" || ir.GetHeaders()["ratelimit-limit"] != "1" {
			t.Fatalf("refusal %d from the cache: %v", i, ir)
		}
	}
	if time.Since(start) < 200*time.Millisecond { // else some refusals may have been Redis's
		if got := scriptCalls(t, r) - calls; got != 0 {
			t.Fatalf("%d Redis calls for keys over their limit, want 0", got)
		}
		if got := localOverLimit.Get() - local; got != 20 {
			t.Fatalf("local over-limit refusals counted %d, want 20", got)
		}
	}
	// Another key still asks Redis.
	if res := execute(t, p, request("users", "192.0.2.2")); res.Status != agentv1.StatusCode_OK {
		t.Fatalf("another key: %v", res)
	}
	// Allowed again once the bucket allows: 250 ms after the refusal (Redis's clock).
	time.Sleep(time.Until(start.Add(300 * time.Millisecond)))
	if res := execute(t, p, request("users", "192.0.2.1")); res.Status != agentv1.StatusCode_OK {
		t.Fatalf("after retry-after: %v", res)
	}
}

// TestRedisOverLimitCacheNeverEarly checks that the remembered time is when Redis allows again
// and no later than that by more than the clock's steps: a key is polled until it is allowed,
// and every local refusal must have been one Redis would give.
func TestRedisOverLimitCacheNeverEarly(t *testing.T) {
	r := testenv.StartRedis(t, "")
	f := overLimitFactory(t, r, "")
	p := mustBuild(t, f, map[string]string{"requests_per_second": "10", "burst": "2", "backend": "redis", "on_backend_error": "deny"})
	for round := range 3 {
		for execute(t, p, request("users", "192.0.2.9")).Status == agentv1.StatusCode_OK {
		}
		refused := time.Now()
		for execute(t, p, request("users", "192.0.2.9")).Status != agentv1.StatusCode_OK {
			time.Sleep(time.Millisecond)
		}
		// At 10/s a refused key allows again after at most 100 ms.
		if d := time.Since(refused); d > 150*time.Millisecond {
			t.Fatalf("round %d: allowed again after %v, want at most 100 ms", round, d)
		}
	}
}

// TestRedisOverLimitCacheOff checks over_limit_cache_entries: 0: every refusal asks Redis.
func TestRedisOverLimitCacheOff(t *testing.T) {
	r := testenv.StartRedis(t, "")
	f := overLimitFactory(t, r, "0")
	p := mustBuild(t, f, map[string]string{"requests_per_second": "0.01", "burst": "1", "backend": "redis"})
	execute(t, p, request("users", "192.0.2.1"))
	calls := scriptCalls(t, r)
	for range 5 {
		if ir := immediate(execute(t, p, request("users", "192.0.2.1"))); ir.GetStatusCode() != 429 {
			t.Fatal("not refused")
		}
	}
	if got := scriptCalls(t, r) - calls; got != 5 {
		t.Fatalf("%d Redis calls, want 5", got)
	}
	if _, err := New(policy.Config{Raw: json.RawMessage(`{"redis": {"address": "127.0.0.1:1", "over_limit_cache_entries": -1}}`)}); err == nil || !strings.Contains(err.Error(), "over_limit_cache_entries") {
		t.Fatalf("negative size: %v", err)
	}
}

// TestOverLimitCacheBounded checks that the cache holds at most its size, making room by
// dropping refusals that ended.
func TestOverLimitCacheBounded(t *testing.T) {
	c := newOverLimitCache(3)
	l := limit{burst: 1}
	now := time.Now().UnixNano()
	for i := range 10 {
		c.remember(fmt.Sprint(i), decision{retryAfter: time.Second, reset: time.Second}, now)
	}
	if c.n.Load() != 3 || c.keys.Size() != 3 {
		t.Fatalf("%d keys, want 3", c.keys.Size())
	}
	if _, ok := c.refused("9", l, now); ok {
		t.Fatal("a key past the bound was kept")
	}
	later := now + int64(2*time.Second)
	c.remember("new", decision{retryAfter: time.Second}, later)
	if _, ok := c.refused("new", l, later); !ok || c.n.Load() != 1 {
		t.Fatalf("ended refusals not purged: %d keys", c.n.Load())
	}
	if _, ok := c.refused("new", l, later+int64(time.Second)); ok || c.n.Load() != 0 {
		t.Fatal("a refusal outlived its retry-after")
	}
}
