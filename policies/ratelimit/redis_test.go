package ratelimit

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/rs/zerolog"

	"github.com/policy-engine/policy-engine/agent"
	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// redisClient is a plain client for the test to look into Redis.
func redisClient(t testing.TB, r *testenv.Redis) *redis.Client {
	c := redis.NewClient(&redis.Options{Addr: r.Addr, Protocol: 2, DisableIdentity: true})
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func redisFactory(t *testing.T, r *testenv.Redis, shared *sync.Map, timeoutMS int) *Factory {
	t.Helper()
	return redisFactoryLog(t, r, shared, timeoutMS, nil)
}

func redisFactoryLog(t *testing.T, r *testenv.Redis, shared *sync.Map, timeoutMS int, log *logging.Logger) *Factory {
	t.Helper()
	// A small pool, so that an outage soon trips go-redis's dial circuit breaker, whose
	// recovery the outage test then covers.
	raw := fmt.Sprintf(`{"redis": {"address": %q, "timeout_ms": %d, "pool_size": 3}}`, r.Addr, timeoutMS)
	f, err := New(policy.Config{Raw: json.RawMessage(raw), Shared: shared, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.(*Factory).Close() })
	return f.(*Factory)
}

func TestRedisBucket(t *testing.T) {
	r := testenv.StartRedis(t, "")
	f := redisFactory(t, r, &sync.Map{}, 1000)
	p := mustBuild(t, f, map[string]string{"requests_per_second": "0.01", "burst": "3", "backend": "redis", "response_headers": "true", "on_backend_error": "deny"})
	for i := range 3 {
		res := execute(t, p, request("users", "192.0.2.1"))
		fl, ok := parseFields(states(res)[stateKey])
		if res.Status != agentv1.StatusCode_OK || !ok || fl.limit != 3 || fl.remaining != int64(2-i) {
			t.Fatalf("request %d: got %v, fields %+v", i, res, fl)
		}
	}
	ir := immediate(execute(t, p, request("users", "192.0.2.1")))
	h := ir.GetHeaders()
	// At 0.01/s a token takes 100s; the full bucket 300s.
	if ir.GetStatusCode() != 429 || h["retry-after"] != "100" || h["ratelimit-limit"] != "3" || h["ratelimit-remaining"] != "0" || h["ratelimit-reset"] != "300" {
		t.Fatalf("over the limit: status %d, headers %v", ir.GetStatusCode(), h)
	}
	if res := execute(t, p, request("users", "192.0.2.2")); res.Status != agentv1.StatusCode_OK {
		t.Fatalf("another client: %v", res)
	}

	// Keys are digests under the prefix, with a TTL no longer than the refill time.
	c := redisClient(t, r)
	keys, err := c.Keys(context.Background(), "*").Result()
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 2 {
		t.Fatalf("Redis holds keys %q, want one per client", keys)
	}
	for _, k := range keys {
		if !strings.HasPrefix(k, DefaultRedisKeyPrefix) || len(k) != len(DefaultRedisKeyPrefix)+32 || strings.Contains(k, "192.0.2") {
			t.Fatalf("key %q: want the prefix and a 32-digit digest", k)
		}
		ttl, err := c.PTTL(context.Background(), k).Result()
		if err != nil || ttl <= 0 || ttl > 300*time.Second {
			t.Fatalf("key %q: TTL %v, %v; want (0, 300s]", k, ttl, err)
		}
	}
	if err := f.HealthCheck(context.Background()); err != nil {
		t.Fatalf("health with Redis up: %v", err)
	}
}

// TestRedisKeyExpires checks that a key disappears once its bucket has refilled.
func TestRedisKeyExpires(t *testing.T) {
	r := testenv.StartRedis(t, "")
	f := redisFactory(t, r, &sync.Map{}, 1000)
	// Refilled one second after the request: long enough to see the key first.
	p := mustBuild(t, f, map[string]string{"requests_per_second": "1", "burst": "1", "backend": "redis", "on_backend_error": "deny"})
	if res := execute(t, p, request("users", "192.0.2.1")); res.Status != agentv1.StatusCode_OK {
		t.Fatalf("first request: %v", res)
	}
	c := redisClient(t, r)
	if n, _ := c.DBSize(context.Background()).Result(); n != 1 {
		t.Fatalf("Redis holds %d keys, want 1", n)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		n, err := c.DBSize(context.Background()).Result()
		if err == nil && n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("key still there 5s after its 1s refill: %d keys, %v", n, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestRedisSharedAcrossFactories runs two factories with separate clients, as two agents
// would have: they enforce one limit between them.
func TestRedisSharedAcrossFactories(t *testing.T) {
	r := testenv.StartRedis(t, "")
	f1 := redisFactory(t, r, &sync.Map{}, 1000)
	f2 := redisFactory(t, r, &sync.Map{}, 1000)
	if f1.redis.client == f2.redis.client {
		t.Fatal("factories with separate Shared maps share a client")
	}
	md := map[string]string{"requests_per_second": "0.01", "burst": "5", "backend": "redis", "key": "header:x-tenant", "on_backend_error": "deny"}
	p1, p2 := mustBuild(t, f1, md), mustBuild(t, f2, md)
	allowed := 0
	for i := range 20 {
		p := p1
		if i%2 == 1 {
			p = p2
		}
		c := request("users", fmt.Sprintf("192.0.2.%d", i))
		c.Headers["x-tenant"] = "acme"
		res := execute(t, p, c)
		if immediate(res).GetStatusCode() == 503 {
			t.Fatalf("request %d: Redis did not answer within timeout_ms", i)
		}
		if res.Status == agentv1.StatusCode_OK {
			allowed++
		}
	}
	if allowed != 5 {
		t.Fatalf("two agents allowed %d requests of one tenant, want the shared burst of 5", allowed)
	}
}

// testAgent is a real agent Executor loaded from an agent config file's text.
func testAgent(t *testing.T, yaml string) *agent.Executor {
	t.Helper()
	cfg, err := agent.ParseConfig("agent.yaml", []byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	e := agent.NewExecutor(logging.New(io.Discard, "agent", 0))
	if err := e.Load(cfg.AgentCore, "v1"); err != nil {
		t.Fatal(err)
	}
	return e
}

// TestRedisSharedAcrossExecutors runs two agents' executors against one Redis: a limit by
// user id (set in state by an earlier policy) holds across both, the 429 carries the
// RateLimit fields, and the response phase adds them to allowed responses.
func TestRedisSharedAcrossExecutors(t *testing.T) {
	r := testenv.StartRedis(t, "")
	cfg := fmt.Sprintf(`
agent_core:
  name: %%s
  socket_path: /nonexistent/agent.sock
  policies:
    config:
      rateLimit:
        max_local_buckets: 1000
        redis:
          address: %q
          timeout_ms: 1000
          pool_size: 4
`, r.Addr)
	a := testAgent(t, fmt.Sprintf(cfg, "agent-a"))
	b := testAgent(t, fmt.Sprintf(cfg, "agent-b"))
	md := map[string]string{"requests_per_second": "0.01", "burst": "4", "backend": "redis", "key": "state:user_id", "response_headers": "true", "on_backend_error": "deny"}
	req := func(user string) *agentv1.PolicyRequest {
		return &agentv1.PolicyRequest{
			RequestId: "r", RouteName: "users", Phase: agentv1.PolicyPhase_REQUEST,
			Policies: []*agentv1.Policy{{Name: Name, Metadata: md}},
			Context:  &agentv1.RequestContext{ClientIp: "192.0.2.1"},
			State:    map[string]string{"user_id": user},
		}
	}
	var lastState map[string]string
	allowed, denied := 0, 0
	for i := range 10 {
		e := a
		if i%2 == 1 {
			e = b
		}
		resp := e.Execute(context.Background(), req("u-1"))
		switch resp.GetStatus().GetCode() {
		case agentv1.StatusCode_OK:
			allowed++
			lastState = map[string]string{}
			for _, in := range resp.GetInstructions() {
				if s := in.GetState(); s != nil {
					lastState[s.GetKey()] = s.GetValue()
				}
			}
		case agentv1.StatusCode_POLICY_DENIED:
			denied++
			ir := resp.GetInstructions()[0].GetImmediateResponse()
			if ir.GetStatusCode() != 429 || ir.GetHeaders()["ratelimit-limit"] != "4" || ir.GetHeaders()["retry-after"] != "100" {
				t.Fatalf("denial: %v", ir)
			}
		default:
			t.Fatalf("request %d: %v", i, resp)
		}
	}
	if allowed != 4 || denied != 6 {
		t.Fatalf("two agents allowed %d and denied %d requests of one user, want 4 and 6", allowed, denied)
	}
	if resp := a.Execute(context.Background(), req("u-2")); resp.GetStatus().GetCode() != agentv1.StatusCode_OK {
		t.Fatalf("another user: %v", resp)
	}
	// Response phase, on the other agent: the fields of the last allowed request.
	resp := b.Execute(context.Background(), &agentv1.PolicyRequest{
		RequestId: "r", RouteName: "users", Phase: agentv1.PolicyPhase_RESPONSE,
		Policies: []*agentv1.Policy{{Name: Name}},
		State:    lastState,
		Response: &agentv1.ResponseContext{StatusCode: 200},
	})
	got := map[string]string{}
	for _, in := range resp.GetInstructions() {
		got[in.GetHeader().GetKey()] = in.GetHeader().GetValue()
	}
	if resp.GetStatus().GetCode() != agentv1.StatusCode_OK || got["ratelimit-limit"] != "4" || got["ratelimit-remaining"] != "0" || got["ratelimit-reset"] != "400" {
		t.Fatalf("response phase: %v, headers %v", resp, got)
	}
	if err := a.HealthCheck(context.Background()); err != nil {
		t.Fatalf("agent health with Redis up: %v", err)
	}
	a.Close()
	b.Close()
}

// TestRedisOutage stops Redis mid-test: every decision follows on_backend_error, none waits
// longer than timeout_ms plus a small bound, the errors are counted, health reports the
// outage, and a restarted Redis is used again.
func TestRedisOutage(t *testing.T) {
	r := testenv.StartRedis(t, "")
	const timeoutMS = 50
	var logs testenv.SyncBuffer
	f := redisFactoryLog(t, r, &sync.Map{}, timeoutMS, logging.New(&logs, "agent", zerolog.InfoLevel))
	base := map[string]string{"requests_per_second": "0.01", "burst": "2", "backend": "redis"}
	with := func(action string) *RateLimit {
		md := map[string]string{"on_backend_error": action}
		for k, v := range base {
			md[k] = v
		}
		return mustBuild(t, f, md)
	}
	onLocal, onAllow, onDeny := with("local"), with("allow"), with("deny")
	// The three entries have one limit, so they share buckets: each uses its own client.
	// survivorIP is used once before the outage and not during it.
	const localIP, allowIP, denyIP, survivorIP = "192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"
	// Warm up: one request each, from Redis, through a client with a long timeout (the
	// buckets are named by scope and limit, not by client), so that no warm-up request can
	// time out and still be counted later.
	slowF := redisFactory(t, r, &sync.Map{}, 1000)
	warm := func(_ *RateLimit, ip string) {
		t.Helper()
		if execute(t, mustBuild(t, slowF, base), request("users", ip)).Status != agentv1.StatusCode_OK {
			t.Fatalf("warm-up request for %s denied", ip)
		}
	}
	warm(onLocal, localIP)
	warm(onAllow, allowIP)
	warm(onDeny, denyIP)
	warm(onDeny, survivorIP)

	// Every decision must end near timeout_ms. The median shows the timeout itself (a few
	// milliseconds over it) and the 90th percentile that stragglers are rare. The hard bound
	// catches a decision that waits on something else (a retry, a dial or read timeout of
	// go-redis's defaults: 5s, 3s, 3 retries); it is loose because on a loaded machine under
	// -race the scheduler alone has delayed single decisions by up to a second.
	timeout := time.Duration(timeoutMS) * time.Millisecond
	medianBound, p90Bound, hardBound := timeout+25*time.Millisecond, timeout+100*time.Millisecond, timeout+2*time.Second
	var took []time.Duration
	timed := func(p *RateLimit, c *policy.Context) policy.Result {
		t.Helper()
		start := time.Now()
		res := execute(t, p, c)
		d := time.Since(start)
		if d > hardBound {
			t.Fatalf("a decision took %v with Redis down, want at most %v", d, hardBound)
		}
		took = append(took, d)
		return res
	}
	outage := func(name string) {
		t.Helper()
		took = took[:0]
		defer func() {
			if len(took) == 0 {
				return
			}
			slices.Sort(took)
			median, p90 := took[len(took)/2], took[len(took)*9/10]
			t.Logf("%s: %d decisions took %v to %v, median %v, 90th percentile %v (timeout_ms %d)",
				name, len(took), took[0], took[len(took)-1], median, p90, timeoutMS)
			if median > medianBound || p90 > p90Bound {
				t.Errorf("%s: median decision took %v, 90th percentile %v; want at most %v and %v", name, median, p90, medianBound, p90Bound)
			}
		}()
		errsLocal, errsAllow, errsDeny := backendErrors[errorLocal].Get(), backendErrors[errorAllow].Get(), backendErrors[errorDeny].Get()
		// local: the agent's own bucket, which Redis's warm-up did not touch: burst 2 then 429.
		ip := "192.0.2.1" + name
		for i, want := range []agentv1.StatusCode{agentv1.StatusCode_OK, agentv1.StatusCode_OK, agentv1.StatusCode_POLICY_DENIED} {
			if got := timed(onLocal, request("users", ip)).Status; got != want {
				t.Fatalf("%s: on_backend_error local, request %d: got %v, want %v", name, i, got, want)
			}
		}
		for range 10 {
			if res := timed(onAllow, request("users", allowIP)); res.Status != agentv1.StatusCode_OK || len(res.Instructions) != 0 {
				t.Fatalf("%s: on_backend_error allow: %v", name, res)
			}
			ir := immediate(timed(onDeny, request("users", denyIP)))
			if ir.GetStatusCode() != 503 || ir.GetHeaders()["retry-after"] != "1" {
				t.Fatalf("%s: on_backend_error deny: %v", name, ir)
			}
		}
		if d := backendErrors[errorLocal].Get() - errsLocal; d != 3 {
			t.Fatalf("%s: counted %d errors with action local, want 3", name, d)
		}
		if d := backendErrors[errorAllow].Get() - errsAllow; d != 10 {
			t.Fatalf("%s: counted %d errors with action allow, want 10", name, d)
		}
		if d := backendErrors[errorDeny].Get() - errsDeny; d != 10 {
			t.Fatalf("%s: counted %d errors with action deny, want 10", name, d)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		if err := f.HealthCheck(ctx); err == nil {
			t.Fatalf("%s: health check passed with Redis down", name)
		}
	}
	recovered := func(name string) {
		t.Helper()
		start := time.Now()
		deadline := start.Add(10 * time.Second)
		defer func() { t.Logf("%s: Redis used again after %v", name, time.Since(start).Round(time.Millisecond)) }()
		for execute(t, onDeny, request("users", "192.0.2.200")).Status != agentv1.StatusCode_OK {
			if time.Now().After(deadline) {
				t.Fatalf("%s: still failing 10s after Redis came back", name)
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err := f.HealthCheck(context.Background()); err != nil {
			t.Fatalf("%s: health after recovery: %v", name, err)
		}
	}

	// A Redis that does not answer: every call runs into the timeout.
	r.Pause()
	outage("paused")
	// The outage is logged once when it starts, not once per failed decision.
	if n := strings.Count(logs.String(), "rate-limit backend failed"); n != 1 {
		t.Fatalf("the outage was logged %d times, want once:\n%s", n, logs.String())
	}
	if !strings.Contains(logs.String(), `"on_backend_error":"local"`) || strings.Contains(logs.String(), "answers again") {
		t.Fatalf("outage log:\n%s", logs.String())
	}
	r.Resume()
	recovered("paused")
	if n := strings.Count(logs.String(), "rate-limit backend answers again"); n != 1 {
		t.Fatalf("the recovery was logged %d times, want once:\n%s", n, logs.String())
	}
	// Its state survived, so the warm-up request still counts: one token left, then 429.
	// (A request that timed out during the pause may still have been run by Redis after
	// it resumed, as with any client timeout, which is why this bucket was left alone.)
	if execute(t, onDeny, request("users", survivorIP)).Status != agentv1.StatusCode_OK ||
		execute(t, onDeny, request("users", survivorIP)).Status != agentv1.StatusCode_POLICY_DENIED {
		t.Fatal("after the pause: the bucket in Redis lost its state")
	}

	// A Redis that is gone: connections are refused.
	r.Kill()
	outage("stopped")
	r.Start()
	recovered("restarted")
}

// TestRedisAnswersBeforeChainDeadline freezes Redis with a timeout_ms (1 s) longer than the
// chain's deadline (150 ms): each on_backend_error still decides before the deadline, with a
// quarter of the time left for the answer's way back, so the kernel never times out on the
// agent and never applies fail_open instead.
func TestRedisAnswersBeforeChainDeadline(t *testing.T) {
	r := testenv.StartRedis(t, "")
	f := redisFactory(t, r, &sync.Map{}, 1000)
	base := map[string]string{"requests_per_second": "0.01", "burst": "1", "backend": "redis"}
	with := func(action string) *RateLimit {
		md := map[string]string{"on_backend_error": action}
		for k, v := range base {
			md[k] = v
		}
		return mustBuild(t, f, md)
	}
	if res := execute(t, with("deny"), request("users", "192.0.2.9")); res.Status != agentv1.StatusCode_OK {
		t.Fatalf("with Redis up: %v", res)
	}
	r.Pause()
	defer r.Resume()
	f2 := func(action string, want int) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
		defer cancel()
		start := time.Now()
		res, err := with(action).Execute(ctx, request("users", "192.0.2.10"))
		took := time.Since(start)
		if err != nil {
			t.Fatal(err)
		}
		if ctx.Err() != nil {
			t.Errorf("%s: decided after the chain's deadline (%v)", action, took)
		}
		if took < 60*time.Millisecond { // AnswerBy: half of the 150 ms left
			t.Errorf("%s: decided after %v: Redis was not waited for", action, took)
		}
		status := 200
		if ir := immediate(res); ir != nil {
			status = int(ir.GetStatusCode())
		}
		if status != want {
			t.Errorf("%s: %d, want %d", action, status, want)
		}
	}
	f2("deny", 503)
	f2("allow", 200)
	f2("local", 200)
	f2("local", 429)
}

// TestRedisScriptFlush checks the EVAL fallback: with the script cache flushed, decisions
// still work and load the script again.
func TestRedisScriptFlush(t *testing.T) {
	r := testenv.StartRedis(t, "")
	f := redisFactory(t, r, &sync.Map{}, 1000)
	p := mustBuild(t, f, map[string]string{"requests_per_second": "0.01", "burst": "2", "backend": "redis", "on_backend_error": "deny"})
	c := redisClient(t, r)
	ctx := context.Background()
	for i, want := range []agentv1.StatusCode{agentv1.StatusCode_OK, agentv1.StatusCode_OK, agentv1.StatusCode_POLICY_DENIED} {
		if err := c.ScriptFlush(ctx).Err(); err != nil {
			t.Fatal(err)
		}
		if got := execute(t, p, request("users", "192.0.2.1")).Status; got != want {
			t.Fatalf("request %d after SCRIPT FLUSH: got %v, want %v", i, got, want)
		}
		exists, err := c.ScriptExists(ctx, script.Hash()).Result()
		if err != nil || !exists[0] {
			t.Fatalf("request %d: script not cached again after EVAL: %v, %v", i, exists, err)
		}
	}
}

// TestRedisClientSharedAcrossReloads checks that factories made from the same settings and
// Shared map (successive configs of one agent) share one client, which is closed only when
// the last of them closes.
func TestRedisClientSharedAcrossReloads(t *testing.T) {
	r := testenv.StartRedis(t, "")
	shared := &sync.Map{}
	mk := func(timeoutMS int) *Factory {
		raw := fmt.Sprintf(`{"redis": {"address": %q, "timeout_ms": %d}}`, r.Addr, timeoutMS)
		f, err := New(policy.Config{Raw: json.RawMessage(raw), Shared: shared})
		if err != nil {
			t.Fatal(err)
		}
		return f.(*Factory)
	}
	old, next := mk(100), mk(100)
	if old.redis.client != next.redis.client {
		t.Fatal("a reload with the same settings made a new client")
	}
	other := mk(150)
	if other.redis.client == next.redis.client {
		t.Fatal("a reload with new settings kept the old client")
	}
	_ = other.Close()
	_ = old.Close()
	ctx := context.Background()
	if err := next.redis.client.Ping(ctx).Err(); err != nil {
		t.Fatalf("client closed while the newer factory holds it: %v", err)
	}
	_ = next.Close()
	if err := next.redis.client.Ping(ctx).Err(); !errors.Is(err, redis.ErrClosed) {
		t.Fatalf("client after the last factory closed: %v, want %v", err, redis.ErrClosed)
	}
}
