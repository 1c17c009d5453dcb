package ratelimit

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/policy-engine/policy-engine/agent"
	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// factoryJSON makes a factory from the agent config section's JSON, with its own Shared map
// (as a separate agent would have) unless shared is given.
func factoryJSON(t testing.TB, raw string, log *logging.Logger) *Factory {
	t.Helper()
	f, err := New(policy.Config{Raw: json.RawMessage(raw), Shared: &sync.Map{}, Log: log})
	if err != nil {
		t.Fatalf("New(%s): %v", raw, err)
	}
	t.Cleanup(func() { _ = f.(*Factory).Close() })
	return f.(*Factory)
}

// jsonList formats addresses as a JSON array.
func jsonList(addrs []string) string {
	b, _ := json.Marshal(addrs)
	return string(b)
}

// status is a decision's answer: 200, 429, or the immediate response's status (503).
func status(res policy.Result) int {
	if ir := immediate(res); ir != nil {
		return int(ir.GetStatusCode())
	}
	return 200
}

// tenantRequest is a request of tenant in header x-tenant.
func tenantRequest(tenant string) *policy.Context {
	c := request("users", "192.0.2.1")
	c.Headers["x-tenant"] = tenant
	return c
}

// TestRedisClusterSharedLimit runs two agents' factories against a 3-master Redis Cluster,
// one knowing a single seed node, the other all three. For 24 tenants, whose buckets land in
// slots on every master, 16 concurrent requests each (half through each agent) are admitted
// exactly burst times: each bucket is one key, decided atomically on the master of its slot.
func TestRedisClusterSharedLimit(t *testing.T) {
	// Mostly waiting on Redis processes: run beside the other topology tests.
	t.Parallel()
	c := testenv.StartRedisCluster(t, 3)
	const burst, tenants, perTenant = 5, 24, 16
	f1 := factoryJSON(t, fmt.Sprintf(`{"redis": {"mode": "cluster", "addresses": %s, "timeout_ms": 1000, "key_prefix": "fleet-a:"}}`, jsonList(c.Addrs[:1])), nil)
	f2 := factoryJSON(t, fmt.Sprintf(`{"redis": {"mode": "cluster", "addresses": %s, "timeout_ms": 1000, "key_prefix": "fleet-a:"}}`, jsonList(c.Addrs)), nil)
	md := map[string]string{"requests_per_second": "0.01", "burst": fmt.Sprint(burst), "backend": "redis", "key": "header:x-tenant", "on_backend_error": "deny"}
	p1, p2 := mustBuild(t, f1, md), mustBuild(t, f2, md)
	// Each agent has served a request before the burst, as a running agent has: its slot map
	// and a few connections are there.
	for _, p := range []*RateLimit{p1, p2} {
		if got := status(execute(t, p, tenantRequest("warm-up"))); got != 200 {
			t.Fatalf("warm-up: %d", got)
		}
	}

	var allowed [tenants]atomic.Int64
	var unavailable atomic.Int64
	var wg sync.WaitGroup
	for tn := range tenants {
		for i := range perTenant {
			p := p1
			if i%2 == 1 {
				p = p2
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				res, err := p.Execute(context.Background(), tenantRequest(fmt.Sprintf("tenant-%d", tn)))
				if err != nil {
					t.Error(err)
					return
				}
				switch status(res) {
				case 200:
					allowed[tn].Add(1)
				case 503:
					unavailable.Add(1)
				}
			}()
		}
	}
	wg.Wait()
	if n := unavailable.Load(); n > 0 {
		t.Fatalf("%d decisions found the cluster unavailable", n)
	}
	for tn := range tenants {
		if n := allowed[tn].Load(); n != burst {
			t.Errorf("tenant-%d: %d of %d requests through two agents allowed, want the shared burst %d", tn, n, perTenant, burst)
		}
	}

	// Every key is <prefix>{<32 hex digits>}: the digest is the hash tag, so the slot is the
	// digest's. The buckets are spread over all three masters.
	keyRE := regexp.MustCompile(`^fleet-a:\{([0-9a-f]{32})\}$`)
	total := 0
	for _, n := range c.Nodes {
		v, err := n.Do("KEYS", "*")
		if err != nil {
			t.Fatal(err)
		}
		keys := v.([]any)
		if len(keys) == 0 {
			t.Errorf("node %s holds no bucket: the keys are not spread over the slots", n.Addr)
		}
		for _, k := range keys {
			m := keyRE.FindStringSubmatch(k.(string))
			if m == nil {
				t.Fatalf("key %q: want fleet-a:{<32 hex digits>}", k)
			}
			s1, _ := n.Do("CLUSTER", "KEYSLOT", k.(string))
			s2, _ := n.Do("CLUSTER", "KEYSLOT", m[1])
			if s1 != s2 {
				t.Fatalf("key %q is in slot %v, its digest in %v", k, s1, s2)
			}
		}
		total += len(keys)
	}
	if total != tenants+1 {
		t.Fatalf("the cluster holds %d keys, want one per tenant (%d) and the warm-up's", total, tenants)
	}
	if err := f1.HealthCheck(context.Background()); err != nil {
		t.Fatalf("health with the cluster up: %v", err)
	}
	// One master down: the health check names it.
	c.Nodes[2].Kill()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := f2.HealthCheck(ctx); err == nil || !strings.Contains(err.Error(), c.Nodes[2].Addr) {
		t.Fatalf("health with a master down: %v, want an error naming %s", err, c.Nodes[2].Addr)
	}
}

// TestRedisStartsWhileDown starts an agent's factory while its Redis (one server, the
// Sentinels, or every node of a cluster) is down: the load succeeds, every decision follows on_backend_error at
// once, health reports the outage, and once Redis is up the decisions are Redis's.
func TestRedisStartsWhileDown(t *testing.T) {
	// Mostly waiting on Redis processes: run beside the other topology tests.
	t.Parallel()
	check := func(t *testing.T, raw string, stop, start func()) {
		stop()
		f := factoryJSON(t, raw, nil)
		md := map[string]string{"requests_per_second": "0.01", "burst": "2", "backend": "redis", "key": "header:x-tenant"}
		with := func(action string) *RateLimit {
			m := map[string]string{"on_backend_error": action}
			for k, v := range md {
				m[k] = v
			}
			return mustBuild(t, f, m)
		}
		onLocal, onAllow, onDeny := with("local"), with("allow"), with("deny")
		for i, want := range []int{200, 200, 429} {
			if got := status(execute(t, onLocal, tenantRequest("down-local"))); got != want {
				t.Fatalf("Redis down, on_backend_error local, request %d: %d, want %d", i, got, want)
			}
		}
		for range 3 {
			if got := status(execute(t, onAllow, tenantRequest("down-allow"))); got != 200 {
				t.Fatalf("Redis down, on_backend_error allow: %d", got)
			}
			if got := status(execute(t, onDeny, tenantRequest("down-deny"))); got != 503 {
				t.Fatalf("Redis down, on_backend_error deny: %d", got)
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		defer cancel()
		if err := f.HealthCheck(ctx); err == nil {
			t.Fatal("health check passed with Redis down")
		}
		start()
		began := time.Now()
		testenv.WaitFor(t, 15*time.Second, "decisions by Redis", func() bool {
			return status(execute(t, onDeny, tenantRequest("up"))) == 200
		})
		t.Logf("Redis used %v after it came up", time.Since(began).Round(time.Millisecond))
		if got := status(execute(t, onDeny, tenantRequest("up"))); got != 200 {
			t.Fatalf("second request: %d", got)
		}
		if got := status(execute(t, onDeny, tenantRequest("up"))); got != 429 {
			t.Fatalf("third request of a burst of 2: %d, want 429 from Redis", got)
		}
		if err := f.HealthCheck(context.Background()); err != nil {
			t.Fatalf("health with Redis up: %v", err)
		}
	}
	t.Run("single", func(t *testing.T) {
		r := testenv.StartRedis(t, "")
		check(t, fmt.Sprintf(`{"redis": {"address": %q, "timeout_ms": 200}}`, r.Addr), r.Kill, r.Start)
	})
	t.Run("sentinel", func(t *testing.T) {
		// The Sentinels down (the master up but unknown to the agent): nothing names the
		// master until they are back.
		s := testenv.StartRedisSentinel(t, testenv.RedisSentinelOptions{})
		check(t, fmt.Sprintf(`{"redis": {"mode": "sentinel", "master_name": %q, "addresses": %s, "timeout_ms": 200}}`, s.MasterName, jsonList(s.Addrs)),
			func() {
				for _, n := range s.Sentinels {
					n.Kill()
				}
			},
			func() {
				for _, n := range s.Sentinels {
					n.Start()
				}
			})
	})
	t.Run("cluster", func(t *testing.T) {
		c := testenv.StartRedisCluster(t, 3)
		check(t, fmt.Sprintf(`{"redis": {"mode": "cluster", "addresses": %s, "timeout_ms": 200}}`, jsonList(c.Addrs)),
			func() {
				for _, n := range c.Nodes {
					n.Kill()
				}
			},
			func() {
				// The nodes come back from their nodes.conf, with their slots but no data.
				for _, n := range c.Nodes {
					n.Start()
				}
				testenv.WaitFor(t, 20*time.Second, "the cluster to be ok again", func() bool {
					for _, n := range c.Nodes {
						if info, err := n.DoString("CLUSTER", "INFO"); err != nil || !strings.Contains(info, "cluster_state:ok") {
							return false
						}
					}
					return true
				})
			})
	})
}

// TestRedisSentinelFailover runs decisions through a master watched by three Sentinels, both
// protected by passwords, while the Sentinels fail over to the replica. Every decision ends
// within its timeout; while the master changes, the decisions that fail follow
// on_backend_error (deny: 503, allow: 200, local: the agent's bucket) and nothing else; after
// it the new master decides, and a limit holds on it. Twice: SENTINEL FAILOVER, then the
// master killed.
func TestRedisSentinelFailover(t *testing.T) {
	// Mostly waiting on Redis processes: run beside the other topology tests.
	t.Parallel()
	s := testenv.StartRedisSentinel(t, testenv.RedisSentinelOptions{Password: "data-secret", SentinelPassword: "sentinel-secret"})
	var logs testenv.SyncBuffer
	const timeoutMS = 100
	f := factoryJSON(t, fmt.Sprintf(`{"redis": {"mode": "sentinel", "master_name": %q, "addresses": %s, "password": "data-secret",
		"sentinel_password": "sentinel-secret", "timeout_ms": %d, "pool_size": 8}}`, s.MasterName, jsonList(s.Addrs), timeoutMS),
		logging.New(&logs, "agent", zerolog.InfoLevel))
	md := map[string]string{"requests_per_second": "1000000", "burst": "1000000", "backend": "redis", "key": "header:x-tenant"}
	with := func(action string) *RateLimit {
		m := map[string]string{"on_backend_error": action}
		for k, v := range md {
			m[k] = v
		}
		return mustBuild(t, f, m)
	}
	onDeny, onAllow, onLocal := with("deny"), with("allow"), with("local")
	if got := status(execute(t, onDeny, tenantRequest("warm"))); got != 200 {
		t.Fatalf("before the failover: %d", got)
	}
	if err := f.HealthCheck(context.Background()); err != nil {
		t.Fatalf("health before the failover: %v", err)
	}

	failover := func(name string, do func()) {
		t.Helper()
		// Traffic from four goroutines, one per action plus a second deny, until stopped.
		type counts struct{ ok, denied, unavailable, other, slow atomic.Int64 }
		var byAction [3]counts
		var maxTook atomic.Int64
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for g, p := range []*RateLimit{onDeny, onAllow, onLocal, onDeny} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cnt := &byAction[g%3]
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					start := time.Now()
					res, err := p.Execute(context.Background(), tenantRequest(fmt.Sprintf("%s-%d-%d", name, g, i%50)))
					took := time.Since(start)
					if took > time.Duration(maxTook.Load()) {
						maxTook.Store(int64(took))
					}
					if took > time.Duration(timeoutMS)*time.Millisecond+time.Second {
						cnt.slow.Add(1)
					}
					switch {
					case err != nil:
						cnt.other.Add(1)
					case status(res) == 200:
						cnt.ok.Add(1)
					case status(res) == 503:
						cnt.unavailable.Add(1)
					default:
						cnt.other.Add(1)
					}
					time.Sleep(2 * time.Millisecond)
				}
			}()
		}
		errs := backendErrors[errorDeny].Get() + backendErrors[errorAllow].Get() + backendErrors[errorLocal].Get()
		time.Sleep(200 * time.Millisecond)
		began := time.Now()
		do()
		promoted := time.Since(began)
		// Decisions by the new master: a request of deny answered 200 by Redis, and no
		// failure counted for a while after.
		testenv.WaitFor(t, 20*time.Second, "decisions by the new master", func() bool {
			before := backendErrors[errorDeny].Get()
			time.Sleep(100 * time.Millisecond)
			return status(execute(t, onDeny, tenantRequest("probe"))) == 200 && backendErrors[errorDeny].Get() == before
		})
		recovered := time.Since(began)
		close(stop)
		wg.Wait()
		failed := backendErrors[errorDeny].Get() + backendErrors[errorAllow].Get() + backendErrors[errorLocal].Get() - errs
		d, a, l := &byAction[0], &byAction[1], &byAction[2]
		t.Logf("%s: promoted after %v, decisions by the new master after %v; slowest decision %v; failed decisions %d; "+
			"deny: %d ok, %d 503; allow: %d ok; local: %d ok",
			name, promoted.Round(time.Millisecond), recovered.Round(time.Millisecond), time.Duration(maxTook.Load()).Round(time.Millisecond),
			failed, d.ok.Load(), d.unavailable.Load(), a.ok.Load(), l.ok.Load())
		for i := range byAction {
			c := &byAction[i]
			if c.other.Load() > 0 || c.slow.Load() > 0 {
				t.Errorf("%s: action %d: %d unexpected answers, %d decisions slower than the timeout plus 1 s", name, i, c.other.Load(), c.slow.Load())
			}
		}
		if a.unavailable.Load() > 0 || l.unavailable.Load() > 0 {
			t.Errorf("%s: allow and local answered 503 (%d, %d times)", name, a.unavailable.Load(), l.unavailable.Load())
		}
		if uint64(d.unavailable.Load()) > failed {
			t.Errorf("%s: deny answered 503 %d times, more than the %d failures counted", name, d.unavailable.Load(), failed)
		}
		// The limit holds on the new master, which has the bucket.
		limited := mustBuild(t, f, map[string]string{"requests_per_second": "0.01", "burst": "3", "backend": "redis", "key": "header:x-tenant", "on_backend_error": "deny"})
		for i, want := range []int{200, 200, 200, 429} {
			if got := status(execute(t, limited, tenantRequest("after-"+name))); got != want {
				t.Fatalf("%s: after the failover, request %d: %d, want %d", name, i, got, want)
			}
		}
		if n, err := s.Master.Do("DBSIZE"); err != nil || n.(int64) == 0 {
			t.Fatalf("%s: the new master %s holds %v keys (%v)", name, s.Master.Addr, n, err)
		}
		if err := f.HealthCheck(context.Background()); err != nil {
			t.Fatalf("%s: health after the failover: %v", name, err)
		}
	}
	// A planned failover (as managed Redis does for upgrades), then a crash: the master is
	// killed and the Sentinels notice after down-after-milliseconds (1 s) and promote.
	failover("SENTINEL FAILOVER", s.Failover)
	failover("master killed", s.KillMaster)
	if strings.Contains(logs.String(), "data-secret") || strings.Contains(logs.String(), "sentinel-secret") {
		t.Fatalf("a password was logged:\n%s", logs.String())
	}

	// Wrong Sentinel credentials: the master is never found; decisions follow
	// on_backend_error and health says why, without the password.
	bad := factoryJSON(t, fmt.Sprintf(`{"redis": {"mode": "sentinel", "master_name": %q, "addresses": %s, "password": "data-secret",
		"sentinel_password": "wrong-secret", "timeout_ms": 200}}`, s.MasterName, jsonList(s.Addrs)), nil)
	if got := status(execute(t, mustBuild(t, bad, map[string]string{"requests_per_second": "1", "backend": "redis", "on_backend_error": "deny"}), request("users", "192.0.2.1"))); got != 503 {
		t.Fatalf("wrong Sentinel password: %d, want 503", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := bad.HealthCheck(ctx); err == nil || strings.Contains(err.Error(), "wrong-secret") {
		t.Fatalf("health with a wrong Sentinel password: %v", err)
	}
}

// TestRedisTLS talks to TLS-only Redis servers: with the CA (and, where the server demands
// one, the client certificate) decisions are Redis's; without the CA, with another CA, or
// without a client certificate for a server that requires one, no connection is made and
// on_backend_error decides; server_name checks the name in the server's certificate.
func TestRedisTLS(t *testing.T) {
	certs := testenv.NewRedisCerts(t)
	mtls := testenv.StartRedisTLS(t, certs, true)
	plain := testenv.StartRedisTLS(t, certs, false) // TLS without client certificates
	md := map[string]string{"requests_per_second": "0.01", "burst": "2", "backend": "redis", "on_backend_error": "deny"}
	works := func(name, addr, tlsJSON string) {
		t.Helper()
		f := factoryJSON(t, fmt.Sprintf(`{"redis": {"address": %q, "timeout_ms": 1000, "tls": %s}}`, addr, tlsJSON), nil)
		p := mustBuild(t, f, md)
		for i, want := range []int{200, 200, 429} {
			if got := status(execute(t, p, request("users", "192.0.2."+fmt.Sprint(len(name))))); got != want {
				t.Fatalf("%s: request %d: %d, want %d", name, i, got, want)
			}
		}
		if err := f.HealthCheck(context.Background()); err != nil {
			t.Fatalf("%s: health: %v", name, err)
		}
	}
	fails := func(name, raw, wantErr string) {
		t.Helper()
		f := factoryJSON(t, raw, nil)
		if got := status(execute(t, mustBuild(t, f, md), request("users", "192.0.2.1"))); got != 503 {
			t.Fatalf("%s: %d, want 503 by on_backend_error", name, got)
		}
		// The health check reports the dial's error once a dial has ended (loading the
		// system's roots, under the race detector on a busy machine, can outlast one check).
		var err error
		deadline := time.Now().Add(15 * time.Second)
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			err = f.HealthCheck(ctx)
			cancel()
			if err == nil || strings.Contains(err.Error(), wantErr) || time.Now().After(deadline) {
				break
			}
		}
		if err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Fatalf("%s: health: %v, want an error with %q", name, err, wantErr)
		}
		t.Logf("%s: %v", name, err)
	}
	ca := fmt.Sprintf(`{"ca_file": %q}`, certs.CAFile)
	mutual := fmt.Sprintf(`{"ca_file": %q, "cert_file": %q, "key_file": %q}`, certs.CAFile, certs.ClientCertFile, certs.ClientKeyFile)
	works("mTLS", mtls.Addr, mutual)
	works("TLS with the CA", plain.Addr, ca)
	works("TLS, server_name in the certificate", plain.Addr, fmt.Sprintf(`{"ca_file": %q, "server_name": "redis.test"}`, certs.CAFile))
	fails("mTLS without a client certificate", fmt.Sprintf(`{"redis": {"address": %q, "timeout_ms": 200, "tls": %s}}`, mtls.Addr, ca), "")
	fails("another CA", fmt.Sprintf(`{"redis": {"address": %q, "timeout_ms": 200, "tls": {"ca_file": %q}}}`, plain.Addr, certs.OtherCAFile),
		"certificate signed by unknown authority")
	fails("system roots only", fmt.Sprintf(`{"redis": {"address": %q, "timeout_ms": 200, "tls": {}}}`, plain.Addr),
		"certificate signed by unknown authority")
	fails("server_name not in the certificate", fmt.Sprintf(`{"redis": {"address": %q, "timeout_ms": 200, "tls": {"ca_file": %q, "server_name": "other.test"}}}`, plain.Addr, certs.CAFile),
		"other.test")
	fails("no TLS", fmt.Sprintf(`{"redis": {"address": %q, "timeout_ms": 200}}`, plain.Addr), "")
}

// TestRedisACLAndKeyPrefix loads real agent config files whose Redis passwords are
// ${env:...} and ${file:...}: the agent resolves it, the ACL user (allowed only the keys under its fleet's
// prefix and the commands the script needs) decides, and redis-cli --scan shows every key
// under the prefix. A second fleet with its own prefix shares the Redis without sharing
// buckets. A wrong password fails every decision by on_backend_error and is never logged.
func TestRedisACLAndKeyPrefix(t *testing.T) {
	n := testenv.StartRedisNode(t,
		"--user", "default", "off",
		"--user", "admin", "on", ">admin-secret", "~*", "+@all",
		"--user", "fleet-a", "on", ">fleet-a-secret", "~fleet-a:*", "+evalsha", "+eval", "+get", "+set", "+time", "+ping")
	n.Username, n.Password = "admin", "admin-secret"
	t.Setenv("RL_TEST_REDIS_PASSWORD", "fleet-a-secret")
	dir := t.TempDir()
	load := func(name, user, password, prefix string) (*agent.Executor, *testenv.SyncBuffer) {
		t.Helper()
		path := filepath.Join(dir, name+".yaml")
		yaml := fmt.Sprintf(`
agent_core:
  name: %s
  socket_path: /nonexistent/agent.sock
  policies:
    config:
      rateLimit:
        redis:
          address: %q
          username: %s
          password: %q
          key_prefix: %q
          timeout_ms: 1000
`, name, n.Addr, user, password, prefix)
		if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, _, err := agent.LoadConfig(path)
		if err != nil {
			t.Fatal(err)
		}
		var logs testenv.SyncBuffer
		e := agent.NewExecutor(logging.New(&logs, "agent", zerolog.InfoLevel))
		if err := e.Load(cfg.AgentCore, "v1"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(e.Close)
		return e, &logs
	}
	md := map[string]string{"requests_per_second": "0.01", "burst": "2", "backend": "redis", "key": "state:user_id", "on_backend_error": "deny"}
	req := func(user string) *agentv1.PolicyRequest {
		return &agentv1.PolicyRequest{
			RequestId: "r", RouteName: "users", Phase: agentv1.PolicyPhase_REQUEST,
			Policies: []*agentv1.Policy{{Name: Name, Metadata: md}},
			Context:  &agentv1.RequestContext{ClientIp: "192.0.2.1"},
			State:    map[string]string{"user_id": user},
		}
	}
	codes := func(e *agent.Executor, user string, n int) []string {
		var out []string
		for range n {
			resp := e.Execute(context.Background(), req(user))
			code := resp.GetStatus().GetCode().String()
			if ins := resp.GetInstructions(); len(ins) > 0 && ins[0].GetImmediateResponse() != nil {
				code = fmt.Sprint(ins[0].GetImmediateResponse().GetStatusCode())
			}
			out = append(out, code)
		}
		return out
	}
	a, _ := load("agent-a", "fleet-a", "${env:RL_TEST_REDIS_PASSWORD}", "fleet-a:")
	if got := strings.Join(codes(a, "u-1", 3), " "); got != "OK OK 429" {
		t.Fatalf("fleet a, ACL user with the password from ${env:}: %s, want OK OK 429", got)
	}
	if err := a.HealthCheck(context.Background()); err != nil {
		t.Fatalf("fleet a health: %v", err)
	}
	// Fleet b, same Redis, its own prefix: its buckets are its own. Its password is a file
	// (a Kubernetes secret), with the trailing newline such files have.
	pwFile := filepath.Join(dir, "redis-password")
	if err := os.WriteFile(pwFile, []byte("admin-secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	b, _ := load("agent-b", "admin", "${file:"+pwFile+"}", "fleet-b:")
	if got := strings.Join(codes(b, "u-1", 3), " "); got != "OK OK 429" {
		t.Fatalf("fleet b: %s, want its own burst", got)
	}
	out, err := exec.Command("redis-cli", "-h", "127.0.0.1", "-p", n.Port, "--user", "admin", "--pass", "admin-secret",
		"--no-auth-warning", "--scan").CombinedOutput()
	if err != nil {
		t.Fatalf("redis-cli --scan: %v\n%s", err, out)
	}
	keys := strings.Fields(string(out))
	var a1, b1 int
	for _, k := range keys {
		switch {
		case regexp.MustCompile(`^fleet-a:[0-9a-f]{32}$`).MatchString(k):
			a1++
		case regexp.MustCompile(`^fleet-b:[0-9a-f]{32}$`).MatchString(k):
			b1++
		default:
			t.Errorf("key %q has neither fleet's prefix", k)
		}
	}
	if a1 != 1 || b1 != 1 {
		t.Fatalf("redis-cli --scan: %q; want one key per fleet", keys)
	}
	t.Logf("redis-cli --scan: %s", strings.Join(keys, " "))

	// A wrong password: WRONGPASS, decided by on_backend_error (503), never logged.
	t.Setenv("RL_TEST_REDIS_PASSWORD", "not-the-password")
	w, logs := load("agent-w", "fleet-a", "${env:RL_TEST_REDIS_PASSWORD}", "fleet-a:")
	if got := strings.Join(codes(w, "u-2", 2), " "); got != "503 503" {
		t.Fatalf("wrong password: %s, want 503 503", got)
	}
	err = w.HealthCheck(context.Background())
	if err == nil || !strings.Contains(err.Error(), "WRONGPASS") || strings.Contains(err.Error(), "not-the-password") {
		t.Fatalf("health with a wrong password: %v", err)
	}
	if !strings.Contains(logs.String(), "WRONGPASS") || strings.Contains(logs.String(), "not-the-password") {
		t.Fatalf("log with a wrong password:\n%s", logs.String())
	}
}

// TestGoRedisLogsToAgentLog checks that go-redis's own lines (here: a failed dial) go to the
// agent's log as throttled debug lines, not to stderr.
func TestGoRedisLogsToAgentLog(t *testing.T) {
	var logs testenv.SyncBuffer
	f := factoryJSON(t, fmt.Sprintf(`{"redis": {"address": %q, "timeout_ms": 200}}`, testenv.FreeAddr(t)),
		logging.New(&logs, "agent", zerolog.DebugLevel))
	p := mustBuild(t, f, map[string]string{"requests_per_second": "1", "backend": "redis", "on_backend_error": "deny"})
	testenv.WaitFor(t, 5*time.Second, "a go-redis line in the agent's log", func() bool {
		execute(t, p, request("users", "192.0.2.1"))
		return strings.Contains(logs.String(), `"source":"go-redis"`)
	})
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		if strings.Contains(line, `"source":"go-redis"`) && (!strings.Contains(line, `"level":"debug"`) || !strings.Contains(line, "dial")) {
			t.Fatalf("go-redis line: %s", line)
		}
	}
}
