package ratelimit

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// testFactory is a factory whose local store runs on clk.
func testFactory(clk *manualClock) *Factory {
	return &Factory{local: newLocalStore(1000, clk.Now)}
}

func mustBuild(t *testing.T, f *Factory, md map[string]string) *RateLimit {
	t.Helper()
	p, err := f.Build(md)
	if err != nil {
		t.Fatalf("Build(%v): %v", md, err)
	}
	return p.(*RateLimit)
}

func request(route, ip string) *policy.Context {
	return &policy.Context{Phase: agentv1.PolicyPhase_REQUEST, RouteName: route, ClientIP: ip, Headers: map[string]string{}}
}

func execute(t *testing.T, p policy.Policy, c *policy.Context) policy.Result {
	t.Helper()
	r, err := p.Execute(context.Background(), c)
	if err != nil {
		t.Fatalf("Execute: %v", err)
	}
	return r
}

// immediate returns the result's immediate response, or nil.
func immediate(r policy.Result) *agentv1.ImmediateResponse {
	for _, in := range r.Instructions {
		if ir := in.GetImmediateResponse(); ir != nil {
			return ir
		}
	}
	return nil
}

// states returns the SET_STATE instructions of a result as a map.
func states(r policy.Result) map[string]string {
	m := map[string]string{}
	for _, in := range r.Instructions {
		if s := in.GetState(); s != nil {
			m[s.GetKey()] = s.GetValue()
		}
	}
	return m
}

// setHeaders returns the SET_HEADER instructions of a result as a map.
func setHeaders(r policy.Result) map[string]string {
	m := map[string]string{}
	for _, in := range r.Instructions {
		if in.GetType() == agentv1.InstructionType_SET_HEADER {
			m[in.GetHeader().GetKey()] = in.GetHeader().GetValue()
		}
	}
	return m
}

func TestExecuteDenies(t *testing.T) {
	clk := newManualClock()
	p := mustBuild(t, testFactory(clk), map[string]string{"requests_per_second": "0.5", "burst": "2"})
	for i := range 2 {
		r := execute(t, p, request("users", "192.0.2.1"))
		if r.Status != agentv1.StatusCode_OK || len(r.Instructions) != 0 {
			t.Fatalf("request %d within the burst: got %v", i, r)
		}
	}
	r := execute(t, p, request("users", "192.0.2.1"))
	ir := immediate(r)
	if r.Status != agentv1.StatusCode_POLICY_DENIED || ir == nil || ir.GetStatusCode() != 429 {
		t.Fatalf("request over the burst: got %v, want a 429", r)
	}
	// The next token comes in 2s; the bucket is full again in 4s.
	want := map[string]string{
		"retry-after": "2", "ratelimit-limit": "2", "ratelimit-remaining": "0", "ratelimit-reset": "4",
		"content-type": "application/json",
	}
	if !reflect.DeepEqual(ir.GetHeaders(), want) {
		t.Fatalf("429 headers: got %v, want %v", ir.GetHeaders(), want)
	}
	var body policy.ErrorBody
	if err := json.Unmarshal(ir.GetBody(), &body); err != nil || body.Error != "rate_limited" {
		t.Fatalf("429 body %q: %v", ir.GetBody(), err)
	}
	// Retry-After rounds up: 1.5s left is 2.
	clk.Advance(500 * time.Millisecond)
	if h := immediate(execute(t, p, request("users", "192.0.2.1"))).GetHeaders(); h["retry-after"] != "2" || h["ratelimit-reset"] != "4" {
		t.Fatalf("after 0.5s: retry-after %q, reset %q, want 2 and 4 (rounded up)", h["retry-after"], h["ratelimit-reset"])
	}
	clk.Advance(1500 * time.Millisecond)
	if r := execute(t, p, request("users", "192.0.2.1")); r.Status != agentv1.StatusCode_OK {
		t.Fatalf("after the refill of one token: got %v", r)
	}
	// Another client has its own bucket.
	if r := execute(t, p, request("users", "192.0.2.2")); r.Status != agentv1.StatusCode_OK {
		t.Fatalf("another client: got %v", r)
	}
}

func TestExecuteResponseHeaders(t *testing.T) {
	clk := newManualClock()
	f := testFactory(clk)
	p := mustBuild(t, f, map[string]string{"requests_per_second": "1", "burst": "10", "response_headers": "true"})
	c := request("users", "192.0.2.1")
	r := execute(t, p, c)
	st := states(r)
	if r.Status != agentv1.StatusCode_OK || st[stateKey] == "" {
		t.Fatalf("allowed request: got %v, want a %q state", r, stateKey)
	}
	fl, ok := parseFields(st[stateKey])
	if !ok || fl.limit != 10 || fl.remaining != 9 {
		t.Fatalf("recorded fields %q: want limit 10, remaining 9", st[stateKey])
	}
	// The response phase, 300ms later, reports the reset from its own time: 0.7s left → 1.
	for _, entry := range []*RateLimit{p, mustBuild(t, f, nil)} {
		clk.Advance(150 * time.Millisecond)
		resp := &policy.Context{Phase: agentv1.PolicyPhase_RESPONSE, State: st, Response: &policy.ResponseContext{Status: 200}}
		got := setHeaders(execute(t, entry, resp))
		want := map[string]string{"ratelimit-limit": "10", "ratelimit-remaining": "9", "ratelimit-reset": "1"}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("response headers: got %v, want %v", got, want)
		}
	}
	// After the reset time the reset is 0, not negative.
	clk.Advance(time.Hour)
	resp0 := &policy.Context{Phase: agentv1.PolicyPhase_RESPONSE, State: st, Response: &policy.ResponseContext{Status: 200}}
	if got := setHeaders(execute(t, p, resp0))["ratelimit-reset"]; got != "0" {
		t.Fatalf("response long after the reset: ratelimit-reset %q, want 0", got)
	}
	// Without recorded fields the response phase does nothing.
	resp := &policy.Context{Phase: agentv1.PolicyPhase_RESPONSE, Response: &policy.ResponseContext{Status: 200}}
	if r := execute(t, p, resp); len(r.Instructions) != 0 {
		t.Fatalf("response without recorded fields: got %v", r.Instructions)
	}
	// With no time between the phases, the reset is the bucket's own: exactly 100s, not 101
	// from rounding twice.
	clk.Advance(123456) // a time that is not a whole millisecond
	slow := mustBuild(t, f, map[string]string{"requests_per_second": "0.01", "burst": "1", "response_headers": "true"})
	same := &policy.Context{Phase: agentv1.PolicyPhase_RESPONSE, State: states(execute(t, slow, request("users", "192.0.2.5"))), Response: &policy.ResponseContext{Status: 200}}
	if got := setHeaders(execute(t, slow, same))["ratelimit-reset"]; got != "100" {
		t.Fatalf("response right after the request: ratelimit-reset %q, want 100", got)
	}
	// response_headers off: no state.
	q := mustBuild(t, f, map[string]string{"requests_per_second": "1", "burst": "10"})
	if r := execute(t, q, request("users", "192.0.2.9")); len(r.Instructions) != 0 {
		t.Fatalf("response_headers off: got instructions %v", r.Instructions)
	}
}

// TestExecuteMostRestrictive runs two entries in one chain: the fields recorded are those of
// the bucket with fewer requests remaining.
func TestExecuteMostRestrictive(t *testing.T) {
	clk := newManualClock()
	f := testFactory(clk)
	perIP := mustBuild(t, f, map[string]string{"requests_per_second": "1", "burst": "5", "response_headers": "true"})
	perRoute := mustBuild(t, f, map[string]string{"requests_per_second": "100", "burst": "100", "key": "route", "response_headers": "true"})
	c := request("users", "192.0.2.1")
	c.State = map[string]string{}
	for _, p := range []*RateLimit{perRoute, perIP} {
		for k, v := range states(execute(t, p, c)) {
			c.State[k] = v
		}
	}
	if fl, _ := parseFields(c.State[stateKey]); fl.limit != 5 || fl.remaining != 4 {
		t.Fatalf("after both entries: fields %q, want the per-IP bucket's 5/4", c.State[stateKey])
	}
	// In the other order, the per-route entry must not overwrite the stricter fields.
	c.State = map[string]string{}
	for _, p := range []*RateLimit{perIP, perRoute} {
		for k, v := range states(execute(t, p, c)) {
			c.State[k] = v
		}
	}
	if fl, _ := parseFields(c.State[stateKey]); fl.limit != 5 || fl.remaining != 3 {
		t.Fatalf("after both entries in reverse: fields %q, want the per-IP bucket's 5/3", c.State[stateKey])
	}
}

func TestOnMissingKey(t *testing.T) {
	clk := newManualClock()
	f := testFactory(clk)
	md := func(action string) map[string]string {
		m := map[string]string{"requests_per_second": "1", "burst": "2", "key": "state:user_id"}
		if action != "" {
			m["on_missing_key"] = action
		}
		return m
	}
	anon := func() *policy.Context { return request("users", "192.0.2.1") }

	// Default: one bucket shared by every request without the key.
	shared := mustBuild(t, f, md(""))
	for i, want := range []agentv1.StatusCode{agentv1.StatusCode_OK, agentv1.StatusCode_OK, agentv1.StatusCode_POLICY_DENIED} {
		c := anon()
		c.ClientIP = "192.0.2." + string(rune('1'+i)) // different clients, same shared bucket
		if got := execute(t, shared, c).Status; got != want {
			t.Fatalf("shared, request %d: got %v, want %v", i, got, want)
		}
	}
	// A request with the key still has its own bucket.
	c := anon()
	c.State = map[string]string{"user_id": "u-1"}
	if got := execute(t, shared, c).Status; got != agentv1.StatusCode_OK {
		t.Fatalf("keyed request after the shared bucket ran out: got %v", got)
	}

	allow := mustBuild(t, f, md("allow"))
	for range 5 {
		if r := execute(t, allow, anon()); r.Status != agentv1.StatusCode_OK || len(r.Instructions) != 0 {
			t.Fatalf("allow: got %v", r)
		}
	}

	deny := mustBuild(t, f, md("deny"))
	ir := immediate(execute(t, deny, anon()))
	var body policy.ErrorBody
	_ = json.Unmarshal(ir.GetBody(), &body)
	if ir.GetStatusCode() != 429 || body.Error != "rate_limit_key_missing" || ir.GetHeaders()["retry-after"] != "" {
		t.Fatalf("deny: got status %d, body %q, headers %v", ir.GetStatusCode(), ir.GetBody(), ir.GetHeaders())
	}
}

func TestScope(t *testing.T) {
	clk := newManualClock()
	f := testFactory(clk)
	perRoute := mustBuild(t, f, map[string]string{"requests_per_second": "1", "burst": "1", "key": "route"})
	if execute(t, perRoute, request("a", "192.0.2.1")).Status != agentv1.StatusCode_OK ||
		execute(t, perRoute, request("b", "192.0.2.1")).Status != agentv1.StatusCode_OK {
		t.Fatal("two routes share a bucket without a scope")
	}
	if execute(t, perRoute, request("a", "192.0.2.2")).Status != agentv1.StatusCode_POLICY_DENIED {
		t.Fatal("key route: a second client of the route got its own bucket")
	}
	scoped := mustBuild(t, f, map[string]string{"requests_per_second": "1", "burst": "1", "scope": "partners"})
	if execute(t, scoped, request("a", "192.0.2.1")).Status != agentv1.StatusCode_OK {
		t.Fatal("scoped: first request denied")
	}
	if execute(t, scoped, request("b", "192.0.2.1")).Status != agentv1.StatusCode_POLICY_DENIED {
		t.Fatal("scoped: a second route with the same scope got its own bucket")
	}
	// Same scope but another limit: its own bucket.
	other := mustBuild(t, f, map[string]string{"requests_per_second": "2", "burst": "1", "scope": "partners"})
	if execute(t, other, request("a", "192.0.2.1")).Status != agentv1.StatusCode_OK {
		t.Fatal("an entry with another limit shares a bucket")
	}
}

func TestResponseOnlyEntry(t *testing.T) {
	p := mustBuild(t, testFactory(newManualClock()), map[string]string{})
	_, err := p.Execute(context.Background(), request("a", "192.0.2.1"))
	if !errors.Is(err, errResponseOnly) {
		t.Fatalf("request phase of an entry without metadata: got %v, want %v", err, errResponseOnly)
	}
}

func TestBuild(t *testing.T) {
	f := testFactory(newManualClock())
	check := func(md map[string]string, burst int64, ident string) {
		t.Helper()
		p := mustBuild(t, f, md)
		if p.limit.burst != burst || p.ident != ident {
			t.Fatalf("Build(%v): burst %d, ident %q; want %d, %q", md, p.limit.burst, p.ident, burst, ident)
		}
	}
	check(map[string]string{"requests_per_second": "100"}, 100, "100/100/client_ip")
	check(map[string]string{"requests_per_second": "2.5"}, 3, "2.5/3/client_ip")
	check(map[string]string{"requests_per_second": "0.001"}, 1, "0.001/1/client_ip")
	check(map[string]string{"requests_per_second": "10", "burst": "1", "key": "header:X-Tenant"}, 1, "10/1/header:x-tenant")
	check(map[string]string{"requests_per_second": "1e6", "burst": "10000"}, 10000, "1e+06/10000/client_ip")
	check(map[string]string{"requests_per_second": "1", "key": "client_ip", "trust_forwarded_for": "2"}, 1, "1/1/client_ip/xff2")
}

func TestBuildErrors(t *testing.T) {
	f := testFactory(newManualClock())
	check := func(md map[string]string, want string) {
		t.Helper()
		_, err := f.Build(md)
		if err == nil || err.Error() != want {
			t.Fatalf("Build(%v):\ngot  %v\nwant %s", md, err, want)
		}
	}
	check(map[string]string{"burst": "3"}, "requests_per_second: required")
	check(map[string]string{"requests_per_second": "0"}, "requests_per_second: want a number above 0 and at most 1e+09, got 0")
	check(map[string]string{"requests_per_second": "-1"}, "requests_per_second: want a number above 0 and at most 1e+09, got -1")
	check(map[string]string{"requests_per_second": "NaN"}, "requests_per_second: want a number above 0 and at most 1e+09, got NaN")
	check(map[string]string{"requests_per_second": "+Inf"}, "requests_per_second: want a number above 0 and at most 1e+09, got +Inf")
	check(map[string]string{"requests_per_second": "2e9"}, "requests_per_second: want a number above 0 and at most 1e+09, got 2e9")
	check(map[string]string{"requests_per_second": "fast"}, `metadata key "requests_per_second": want a number, got "fast"`)
	check(map[string]string{"requests_per_second": "1", "burst": "0"}, "burst: want 1 to 1000000000, got 0")
	check(map[string]string{"requests_per_second": "1", "burst": "2000000000"}, "burst: want 1 to 1000000000, got 2000000000")
	check(map[string]string{"requests_per_second": "1", "colour": "red"}, `metadata key "colour": unknown key`)
	check(map[string]string{"requests_per_second": "1", "key": "cookie:sid"}, `key "cookie:sid": want client_ip, route, header:<name> or state:<key>`)
	check(map[string]string{"requests_per_second": "1", "on_missing_key": "ignore"}, `on_missing_key: want shared, allow or deny, got "ignore"`)
	check(map[string]string{"requests_per_second": "1", "backend": "memcached"}, `backend: want local or redis, got "memcached"`)
	check(map[string]string{"requests_per_second": "1", "backend": "redis"}, "backend: redis needs agent_core.policies.config.rateLimit.redis in the agent config")
	check(map[string]string{"requests_per_second": "1", "on_backend_error": "retry"}, `on_backend_error: want local, allow or deny, got "retry"`)
	check(map[string]string{"requests_per_second": "1e-9", "burst": "1000000000"}, "burst: 1000000000 requests at 1e-09 per second take too long to refill")
	check(map[string]string{"requests_per_second": "1000", "burst": "5"}, "burst: 5 is below the 10 requests that refill in the local clock's 10ms step; set burst to at least 10")
	// Every problem at once.
	check(map[string]string{"requests_per_second": "0", "on_missing_key": "x", "backend": "y"},
		"requests_per_second: want a number above 0 and at most 1e+09, got 0\non_missing_key: want shared, allow or deny, got \"x\"\nbackend: want local or redis, got \"y\"")
}

// TestSchemaMatchesSettings keeps the published schema and the decoded settings in step.
func TestSchemaMatchesSettings(t *testing.T) {
	var s struct {
		Properties map[string]json.RawMessage `json:"properties"`
	}
	if err := json.Unmarshal([]byte(schema), &s); err != nil {
		t.Fatalf("schema is not JSON: %v", err)
	}
	var inSchema, inSettings []string
	for k := range s.Properties {
		inSchema = append(inSchema, k)
	}
	st := reflect.TypeOf(Settings{})
	for i := range st.NumField() {
		name, _, _ := strings.Cut(st.Field(i).Tag.Get("json"), ",")
		inSettings = append(inSettings, name)
	}
	sort.Strings(inSchema)
	sort.Strings(inSettings)
	if !reflect.DeepEqual(inSchema, inSettings) {
		t.Fatalf("schema properties %v, settings fields %v", inSchema, inSettings)
	}
	m, ok := policy.Lookup(Name)
	if !ok || m.MetadataSchema != schema || m.Phases != policy.Both {
		t.Fatalf("registered module: %+v", m)
	}
}

func TestNewErrors(t *testing.T) {
	t.Setenv("RL_TEST_EMPTY", "")
	check := func(raw, want string) {
		t.Helper()
		f, err := New(policy.Config{Raw: json.RawMessage(raw), Shared: &sync.Map{}})
		if err == nil {
			_ = f.(*Factory).Close()
		}
		if err == nil || err.Error() != want {
			t.Fatalf("New(%s):\ngot  %v\nwant %s", raw, err, want)
		}
	}
	check(`{"max_local_buckets": 0}`, "max_local_buckets: must be positive, got 0")
	check(`{"max_local_buckets": 10, "colour": 1}`, `invalid JSON: json: unknown field "colour"`)
	check(`{"redis": {}}`, "redis.address: required with mode single")
	check(`{"redis": {"address": "127.0.0.1:1", "timeout_ms": 5000, "db": -1, "pool_size": -2}}`,
		"redis.timeout_ms: want 1 to 1000, got 5000\nredis.db: must not be negative, got -1\nredis.pool_size: must not be negative, got -2")
	check(`{"redis": {"address": "127.0.0.1:1", "password_env": "RL_TEST_UNSET_VARIABLE"}}`,
		`redis.password_env: environment variable "RL_TEST_UNSET_VARIABLE" is not set`)
	check(`{"redis": {"address": "127.0.0.1:1", "password_env": "RL_TEST_EMPTY"}}`,
		`redis.password_env: environment variable "RL_TEST_EMPTY" is not set`)
	// Topologies.
	check(`{"redis": {"mode": "ring", "address": "h:1"}}`, `redis.mode: want single, sentinel or cluster, got "ring"`)
	check(`{"redis": {"address": "h:1", "addresses": ["h:2"], "master_name": "m", "sentinel_password": "x"}}`,
		"redis.addresses: only for mode sentinel or cluster; mode single takes address\nredis.master_name: only for mode sentinel\n"+
			"redis.sentinel_username, sentinel_password: only for mode sentinel")
	check(`{"redis": {"address": "h"}}`, `redis.address: want host:port, got "h"`)
	check(`{"redis": {"address": "h:0"}}`, `redis.address: want a port from 1 to 65535, got "h:0"`)
	check(`{"redis": {"mode": "sentinel"}}`,
		"redis.addresses: required with mode sentinel: the Sentinels, host:port\nredis.master_name: required with mode sentinel")
	check(`{"redis": {"mode": "sentinel", "address": "h:1", "master_name": "m", "addresses": ["h:2", "h:2"]}}`,
		"redis.address: only for mode single; mode sentinel takes addresses\nredis.addresses[1]: \"h:2\" is listed twice")
	check(`{"redis": {"mode": "cluster", "addresses": ["h:1", "x"], "db": 2, "key_prefix": "{fleet}:"}}`,
		`redis.addresses[1]: want host:port, got "x"`+"\nredis.db: a Redis Cluster has only database 0, got 2\n"+
			`redis.key_prefix: must not contain { or } with mode cluster (they would put every bucket in one hash slot), got "{fleet}:"`)
	check(`{"redis": {"address": "h:1", "dial_timeout_ms": 60000}}`, "redis.dial_timeout_ms: want 1 to 30000, got 60000")
	// Secrets: both forms at once, and a reference the agent did not resolve.
	check(`{"redis": {"address": "h:1", "password": "x", "password_env": "RL_TEST_EMPTY"}}`,
		"redis.password_env: set password or password_env, not both\n"+`redis.password_env: environment variable "RL_TEST_EMPTY" is not set`)
	check(`{"redis": {"mode": "sentinel", "master_name": "m", "addresses": ["h:1"], "sentinel_password": "${env:RL_TEST_UNSET_VARIABLE}"}}`,
		"redis.sentinel_password: the secret reference ${env:RL_TEST_UNSET_VARIABLE} was not resolved")
	// TLS: files that are missing, not PEM, or half a key pair; none of their contents shows.
	dir := t.TempDir()
	notPEM := dir + "/not.pem"
	if err := os.WriteFile(notPEM, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	check(`{"redis": {"address": "h:1", "tls": {"ca_file": "`+dir+`/missing.pem", "cert_file": "`+notPEM+`"}}}`,
		"redis.tls.ca_file: open "+dir+"/missing.pem: no such file or directory\nredis.tls.cert_file, key_file: set both or neither")
	check(`{"redis": {"address": "h:1", "tls": {"ca_file": "`+notPEM+`", "cert_file": "`+notPEM+`", "key_file": "`+notPEM+`"}}}`,
		"redis.tls.ca_file: "+notPEM+" holds no PEM certificate\nredis.tls.cert_file, key_file: "+notPEM+" and "+notPEM+
			": tls: failed to find any PEM data in certificate input")
	check(`{"redis": {"address": "unix:///run/redis.sock", "tls": {}}}`, "redis.tls: not for a Unix socket address")
}

func TestRedisOptions(t *testing.T) {
	t.Setenv("RL_TEST_PASSWORD", "s3cret")
	f := func(c RedisConfig, network, addr string) {
		t.Helper()
		s, err := c.setup()
		if err != nil {
			t.Fatal(err)
		}
		cl := c.newClient(s)
		defer cl.Close()
		o := cl.(*redis.Client).Options()
		if o.Network != network || o.Addr != addr || o.PoolTimeout != time.Duration(c.TimeoutMS)*time.Millisecond ||
			o.DialTimeout != DefaultRedisDialTimeoutMS*time.Millisecond || o.MaxRetries > 0 || !o.ContextTimeoutEnabled {
			t.Fatalf("options(%+v): network %q addr %q pool timeout %v dial timeout %v retries %d", c, o.Network, o.Addr, o.PoolTimeout, o.DialTimeout, o.MaxRetries)
		}
	}
	f(RedisConfig{Address: "10.0.0.1:6379"}, "tcp", "10.0.0.1:6379")
	f(RedisConfig{Address: "unix:///run/redis.sock", TimeoutMS: 5}, "unix", "/run/redis.sock")
	f(RedisConfig{Address: "/run/redis.sock"}, "unix", "/run/redis.sock")
	c := RedisConfig{Address: "h:1", PasswordEnv: "RL_TEST_PASSWORD"}
	s, err := c.setup()
	if err != nil || s.password != "s3cret" || c.TimeoutMS != DefaultRedisTimeoutMS || c.KeyPrefix != DefaultRedisKeyPrefix || c.Mode != RedisSingle {
		t.Fatalf("defaults and password: %v, %+v", err, c)
	}
	// The shared-client key changes with the settings and the password, but never holds it.
	k1 := c.key(s)
	if strings.Contains(k1, "s3cret") {
		t.Fatal("the shared-client key holds the password")
	}
	t.Setenv("RL_TEST_PASSWORD", "other")
	s2, _ := c.setup()
	if c.key(s2) == k1 {
		t.Fatal("a new password keeps the old client")
	}
	// The other modes make the matching clients.
	sc := RedisConfig{Mode: "sentinel", MasterName: "m", Addresses: []string{"h:26379", "h2:26379"}, SentinelPassword: "sp"}
	ss, err := sc.setup()
	if err != nil {
		t.Fatal(err)
	}
	if k := sc.key(ss); strings.Contains(k, "sp\"") || k == k1 {
		t.Fatalf("sentinel key %q", k)
	}
	cl := sc.newClient(ss)
	if _, ok := cl.(*redis.Client); !ok {
		t.Fatalf("sentinel mode made a %T", cl)
	}
	_ = cl.Close()
	cc := RedisConfig{Mode: "cluster", Addresses: []string{"h:7000"}}
	cs, err := cc.setup()
	if err != nil {
		t.Fatal(err)
	}
	cl = cc.newClient(cs)
	if o := cl.(*redis.ClusterClient).Options(); o.MaxRetries > 0 || !o.DisableRoutingPolicies || o.Addrs[0] != "h:7000" {
		t.Fatalf("cluster options: %+v", o)
	}
	_ = cl.Close()
}

// TestFactoryShared checks the reload story: a second factory made from the same Shared map
// (the agent's next config) uses the same local store, the store keeps running after the
// first factory closes, and stops when the last one closes.
func TestFactoryShared(t *testing.T) {
	defer goleak.VerifyNone(t)
	shared := &sync.Map{}
	f1, err := New(policy.Config{Shared: shared})
	if err != nil {
		t.Fatal(err)
	}
	f2, err := New(policy.Config{Raw: json.RawMessage(`{"max_local_buckets": 100000}`), Shared: shared})
	if err != nil {
		t.Fatal(err)
	}
	a, b := f1.(*Factory), f2.(*Factory)
	if a.local != b.local {
		t.Fatal("two factories with the same settings have two local stores")
	}
	p := mustBuild(t, a, map[string]string{"requests_per_second": "1", "burst": "1"})
	if execute(t, p, request("r", "192.0.2.1")).Status != agentv1.StatusCode_OK {
		t.Fatal("first request denied")
	}
	_ = a.Close()
	_ = a.Close() // idempotent
	// The reloaded config's policy sees the bucket the old one used.
	q := mustBuild(t, b, map[string]string{"requests_per_second": "1", "burst": "1"})
	if execute(t, q, request("r", "192.0.2.1")).Status != agentv1.StatusCode_POLICY_DENIED {
		t.Fatal("a reload reset the bucket")
	}
	start := b.local.now()
	deadline := time.Now().Add(5 * time.Second)
	for b.local.now() == start && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if b.local.now() == start {
		t.Fatal("the store's clock stopped while a factory still holds it")
	}
	// Another cap is another store.
	f3, err := New(policy.Config{Raw: json.RawMessage(`{"max_local_buckets": 5}`), Shared: shared})
	if err != nil {
		t.Fatal(err)
	}
	if f3.(*Factory).local == b.local || f3.(*Factory).local.max != 5 {
		t.Fatal("a new max_local_buckets kept the old store")
	}
	_ = f3.(*Factory).Close()
	_ = b.Close()
	n := 0
	shared.Range(func(any, any) bool { n++; return true })
	if n != 0 {
		t.Fatalf("%d shared entries left after every factory closed", n)
	}
	if err := b.HealthCheck(context.Background()); err != nil {
		t.Fatalf("health of a factory without Redis: %v", err)
	}
}

func TestErrorActionString(t *testing.T) {
	for a, want := range map[errorAction]string{errorLocal: "local", errorAllow: "allow", errorDeny: "deny"} {
		if got := a.String(); got != want {
			t.Fatalf("errorAction(%d).String() = %q, want %q", a, got, want)
		}
	}
}

func TestParseFields(t *testing.T) {
	f := func(s string, want fields, wantOK bool) {
		t.Helper()
		got, ok := parseFields(s)
		if got != want || ok != wantOK {
			t.Fatalf("parseFields(%q) = %+v, %v; want %+v, %v", s, got, ok, want, wantOK)
		}
		if ok && formatFields(got) != s {
			t.Fatalf("formatFields(parseFields(%q)) = %q", s, formatFields(got))
		}
	}
	f("10 9 1767225600000", fields{10, 9, 1767225600000}, true)
	f("1 0 0", fields{1, 0, 0}, true)
	for _, bad := range []string{"", "10", "10 9", "10 9 x", "a 9 1", "10 b 1", "0 0 1", "10 11 1", "10 -1 1", "10 9 -1", "10  9 1", "10 9 1 2"} {
		f(bad, fields{}, false)
	}
}

// TestAllowOnBackendErrorRecordsNothing: when Redis fails and on_backend_error is allow,
// nothing is known about the bucket, so no RateLimit fields are recorded.
func TestAllowOnBackendErrorRecordsNothing(t *testing.T) {
	// Port 1 on loopback refuses connections: Redis is unreachable without a server.
	f, err := New(policy.Config{Raw: json.RawMessage(`{"redis": {"address": "127.0.0.1:1", "timeout_ms": 50}}`)})
	if err != nil {
		t.Fatal(err)
	}
	defer f.(*Factory).Close()
	p := mustBuild(t, f.(*Factory), map[string]string{"requests_per_second": "1", "backend": "redis", "on_backend_error": "allow", "response_headers": "true"})
	before := backendErrors[errorAllow].Get()
	res := execute(t, p, request("users", "192.0.2.1"))
	if res.Status != agentv1.StatusCode_OK || len(res.Instructions) != 0 {
		t.Fatalf("allow on backend error: got %v, want OK without instructions", res)
	}
	if backendErrors[errorAllow].Get() != before+1 {
		t.Fatal("backend error not counted")
	}
	if err := f.(*Factory).HealthCheck(context.Background()); err == nil || !strings.HasPrefix(err.Error(), "redis ping: ") {
		t.Fatalf("health with Redis unreachable: %v", err)
	}
}

// BenchmarkExecute measures a whole request-phase decision from all CPUs: key extraction,
// bucket lookup and the result, for clients spread over 10000 addresses; with response
// headers it also records the fields in state; with redis the buckets are in a real Redis
// (skipped when redis-server is missing). Compare two versions with benchstat:
//
//	go test -run '^$' -bench Execute -benchmem -count 10 ./policies/ratelimit/ > old.txt
//	(change the code)
//	go test -run '^$' -bench Execute -benchmem -count 10 ./policies/ratelimit/ > new.txt
//	benchstat old.txt new.txt
func BenchmarkExecute(b *testing.B) {
	ips := make([]string, 10000)
	for i := range ips {
		ips[i] = fmt.Sprintf("10.1.%d.%d", i/256, i%256)
	}
	run := func(b *testing.B, f *Factory, md map[string]string) {
		p := mustBuildB(b, f, md)
		b.ReportAllocs()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			i := rand.IntN(len(ips))
			c := &policy.Context{Phase: agentv1.PolicyPhase_REQUEST, RouteName: "users", Headers: map[string]string{}}
			for pb.Next() {
				c.ClientIP = ips[i]
				if _, err := p.Execute(context.Background(), c); err != nil {
					b.Fatal(err)
				}
				if i++; i == len(ips) {
					i = 0
				}
			}
		})
	}
	local := func(b *testing.B) *Factory {
		f, err := New(policy.Config{})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = f.(*Factory).Close() })
		return f.(*Factory)
	}
	b.Run("local", func(b *testing.B) {
		run(b, local(b), map[string]string{"requests_per_second": "1000000"})
	})
	b.Run("local/response_headers", func(b *testing.B) {
		run(b, local(b), map[string]string{"requests_per_second": "1000000", "response_headers": "true"})
	})
	b.Run("redis", func(b *testing.B) {
		r := testenv.StartRedis(b, "")
		raw := fmt.Sprintf(`{"redis": {"address": %q, "timeout_ms": 1000}}`, r.Addr)
		f, err := New(policy.Config{Raw: json.RawMessage(raw)})
		if err != nil {
			b.Fatal(err)
		}
		defer f.(*Factory).Close()
		run(b, f.(*Factory), map[string]string{"requests_per_second": "1000000", "backend": "redis", "on_backend_error": "deny"})
	})
}

// benchRedisFactory starts a real Redis of the topology (single, tls: mutual TLS, cluster: 3
// masters) and makes a factory for it. It also returns the Redis nodes, for scriptStats.
func benchRedisFactory(b *testing.B, topo string) (*Factory, []*testenv.RedisNode) {
	b.Helper()
	var raw string
	var nodes []*testenv.RedisNode
	switch topo {
	case "single":
		n := testenv.StartRedisNode(b)
		nodes = append(nodes, n)
		raw = fmt.Sprintf(`{"redis": {"address": %q, "timeout_ms": 1000}}`, n.Addr)
	case "tls":
		certs := testenv.NewRedisCerts(b)
		n := testenv.StartRedisTLS(b, certs, true)
		nodes = append(nodes, n)
		raw = fmt.Sprintf(`{"redis": {"address": %q, "timeout_ms": 1000, "tls": {"ca_file": %q, "cert_file": %q, "key_file": %q}}}`,
			n.Addr, certs.CAFile, certs.ClientCertFile, certs.ClientKeyFile)
	case "cluster":
		c := testenv.StartRedisCluster(b, 3)
		nodes = c.Nodes
		addrs, _ := json.Marshal(c.Addrs)
		raw = fmt.Sprintf(`{"redis": {"mode": "cluster", "addresses": %s, "timeout_ms": 1000}}`, addrs)
	}
	f, err := New(policy.Config{Raw: json.RawMessage(raw)})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = f.(*Factory).Close() })
	return f.(*Factory), nodes
}

// scriptStats returns how many times the nodes ran EVALSHA and the microseconds of Redis CPU
// they spent in it, from INFO commandstats.
func scriptStats(b *testing.B, nodes []*testenv.RedisNode) (calls, usec int64) {
	b.Helper()
	for _, n := range nodes {
		info, err := n.DoString("INFO", "commandstats")
		if err != nil {
			b.Fatal(err)
		}
		for _, line := range strings.Split(info, "\r\n") {
			rest, ok := strings.CutPrefix(line, "cmdstat_evalsha:")
			if !ok {
				continue
			}
			for _, kv := range strings.Split(rest, ",") {
				k, v, _ := strings.Cut(kv, "=")
				x, _ := strconv.ParseInt(v, 10, 64)
				switch k {
				case "calls":
					calls += x
				case "usec":
					usec += x
				}
			}
		}
	}
	return calls, usec
}

// BenchmarkRedisLatency measures the time one decision takes from one goroutine, one after
// the other, against a real local Redis (single, mutual TLS, 3-master cluster): what Redis
// adds to a request. It reports the median and the 99th percentile besides the mean.
func BenchmarkRedisLatency(b *testing.B) {
	for _, topo := range []string{"single", "tls", "cluster"} {
		b.Run(topo, func(b *testing.B) {
			f, _ := benchRedisFactory(b, topo)
			p := mustBuildB(b, f, map[string]string{"requests_per_second": "1000000", "backend": "redis", "on_backend_error": "deny"})
			c := &policy.Context{Phase: agentv1.PolicyPhase_REQUEST, RouteName: "users", Headers: map[string]string{}}
			ctx := context.Background()
			// Warm the pool (and, for the cluster, its slot map) before timing.
			for i := range 100 {
				c.ClientIP = fmt.Sprintf("10.2.0.%d", i)
				if _, err := p.Execute(ctx, c); err != nil {
					b.Fatal(err)
				}
			}
			took := make([]time.Duration, 0, b.N)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				c.ClientIP = benchIPs[i%len(benchIPs)]
				start := time.Now()
				res, err := p.Execute(ctx, c)
				took = append(took, time.Since(start))
				if err != nil || immediate(res).GetStatusCode() == 503 {
					b.Fatalf("decision failed: %v %v", res, err)
				}
			}
			b.StopTimer()
			sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
			b.ReportMetric(float64(took[len(took)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(took[len(took)*99/100].Microseconds()), "p99-µs")
		})
	}
}

// BenchmarkRedisThroughput measures decisions per second against a real local Redis (single,
// mutual TLS, 3-master cluster) with 16 decisions in flight per CPU, as an agent serving many
// concurrent requests has: the pool's connections carry them side by side. It also reports
// the microseconds Redis itself spent per decision (INFO commandstats).
func BenchmarkRedisThroughput(b *testing.B) {
	for _, topo := range []string{"single", "tls", "cluster"} {
		b.Run(topo, func(b *testing.B) {
			f, nodes := benchRedisFactory(b, topo)
			p := mustBuildB(b, f, map[string]string{"requests_per_second": "1000000", "backend": "redis", "on_backend_error": "deny"})
			var failed atomic.Int64
			calls0, usec0 := scriptStats(b, nodes)
			b.SetParallelism(16)
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				c := &policy.Context{Phase: agentv1.PolicyPhase_REQUEST, RouteName: "users", Headers: map[string]string{}}
				i := rand.IntN(len(benchIPs))
				for pb.Next() {
					c.ClientIP = benchIPs[i%len(benchIPs)]
					i++
					res, err := p.Execute(context.Background(), c)
					if err != nil || immediate(res).GetStatusCode() == 503 {
						failed.Add(1)
					}
				}
			})
			b.StopTimer()
			if n := failed.Load(); n > 0 {
				b.Fatalf("%d decisions failed", n)
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "decisions/s")
			// Redis's own CPU per decision: what bounds one Redis (or one master).
			calls, usec := scriptStats(b, nodes)
			if calls > calls0 {
				b.ReportMetric(float64(usec-usec0)/float64(calls-calls0), "redis-µs/decision")
			}
		})
	}
}

var benchIPs = func() []string {
	ips := make([]string, 10000)
	for i := range ips {
		ips[i] = fmt.Sprintf("10.1.%d.%d", i/256, i%256)
	}
	return ips
}()

func mustBuildB(b *testing.B, f *Factory, md map[string]string) policy.Policy {
	b.Helper()
	p, err := f.Build(md)
	if err != nil {
		b.Fatal(err)
	}
	return p
}
