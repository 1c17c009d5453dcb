// Package e2e runs the rateLimit policy through the real binaries: two agent and kernel pairs
// sharing one real redis-server, driven by a client that behaves like Envoy's ext_proc filter.
package e2e

import (
	"context"
	"encoding/json"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

const agentYAML = `agent_core:
  name: agent-{{NAME}}
  socket_path: "{{SOCK}}"
  version: "{{VERSION}}"
  policies:
    config:
      rateLimit:
        max_local_buckets: 1000
        redis:
          address: "{{REDIS}}"
          timeout_ms: 100
  observability:
    metrics_address: "{{AGENT_METRICS}}"
`

const kernelYAML = `policy_kernel:
  agents:
    - name: agent
      socket_path: "{{SOCK}}"
      timeout_ms: 150
      health_check_interval_ms: 200
  route_policies:
    - route_name: tenants
      request_policy_chain:
        - policy: rateLimit
          metadata:
            requests_per_second: 0.01
            burst: 3
            key: "header:x-tenant"
            backend: redis
            response_headers: true
      response_policy_chain:
        - policy: rateLimit
    - route_name: clients
      request_policy_chain:
        - policy: rateLimit
          metadata:
            requests_per_second: 0.01
            burst: 1
            trust_forwarded_for: 1
`

var filter = envoytest.FilterConfig{
	AllowModeOverride: true,
	RequestAttributes: []string{"xds.route_name", "source.address"},
	MessageTimeout:    200 * time.Millisecond,
}

type pair struct {
	env    *testenv.Env
	client *envoytest.Client
}

func startPair(t *testing.T, name, redisAddr string) *pair {
	t.Helper()
	r := strings.NewReplacer("{{NAME}}", name, "{{REDIS}}", redisAddr, "{{VERSION}}", "v1")
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: r.Replace(agentYAML), KernelYAML: kernelYAML})
	c := e.Dial(t, filter)
	return &pair{env: e, client: c}
}

func (p *pair) do(t *testing.T, route string, headers ...[2]string) *envoytest.Result {
	t.Helper()
	req := &envoytest.Request{Method: "GET", Path: "/", Authority: "api.example.com", Headers: headers,
		Attributes: map[string]string{"source.address": "192.0.2.10:40000", "xds.route_name": route}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := p.client.Do(ctx, req, func(*envoytest.Forwarded) *envoytest.Response {
		return &envoytest.Response{Status: 200, Headers: [][2]string{{"content-type", "text/plain"}}, Body: []byte("ok")}
	})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// TestTwoAgentsShareRedis sends one tenant's requests through two kernel and agent pairs in
// turn: they share one limit through Redis, allowed responses carry the RateLimit fields, and
// the request over the limit gets Envoy's local reply 429 with Retry-After.
func TestTwoAgentsShareRedis(t *testing.T) {
	redisAddr := testenv.StartRedis(t, "").Addr
	a, b := startPair(t, "a", redisAddr), startPair(t, "b", redisAddr)
	tenant := [2]string{"x-tenant", "acme"}
	for i, p := range []*pair{a, b, a} {
		r := p.do(t, "tenants", tenant)
		if r.Status != 200 || r.Forwarded == nil {
			t.Fatalf("request %d within the limit: status %d, details %q", i, r.Status, r.Details)
		}
		if got := testenv.Header(r.Headers, "ratelimit-limit"); got != "3" {
			t.Fatalf("request %d: ratelimit-limit %q, want 3; headers %v", i, got, r.Headers)
		}
		if got, want := testenv.Header(r.Headers, "ratelimit-remaining"), strconv.Itoa(2-i); got != want {
			t.Fatalf("request %d: ratelimit-remaining %q, want %s", i, got, want)
		}
		if reset, err := strconv.Atoi(testenv.Header(r.Headers, "ratelimit-reset")); err != nil || reset < 100*(i+1)-1 || reset > 100*(i+1) {
			t.Fatalf("request %d: ratelimit-reset %q, want about %d", i, testenv.Header(r.Headers, "ratelimit-reset"), 100*(i+1))
		}
	}
	r := b.do(t, "tenants", tenant)
	if r.Status != 429 || !r.LocalReply || r.Forwarded != nil {
		t.Fatalf("request over the shared limit: status %d, local reply %v", r.Status, r.LocalReply)
	}
	if testenv.Header(r.Headers, "retry-after") != "100" || testenv.Header(r.Headers, "ratelimit-remaining") != "0" {
		t.Fatalf("429 headers: %v", r.Headers)
	}
	var body struct{ Error string }
	if err := json.Unmarshal(r.Body, &body); err != nil || body.Error != "rate_limited" {
		t.Fatalf("429 body %q: %v", r.Body, err)
	}
	if r := a.do(t, "tenants", [2]string{"x-tenant", "globex"}); r.Status != 200 {
		t.Fatalf("another tenant: status %d", r.Status)
	}
}

// TestLocalBucketsSurviveAgentReload limits clients by the last x-forwarded-for entry in one
// agent's memory, and reloads the agent (SIGHUP, changed config): the buckets survive, and
// the agent's metrics show them.
func TestLocalBucketsSurviveAgentReload(t *testing.T) {
	redisAddr := testenv.StartRedis(t, "").Addr
	p := startPair(t, "a", redisAddr)
	xff := func(ip string) [2]string { return [2]string{"x-forwarded-for", "203.0.113.250, " + ip} }
	if r := p.do(t, "clients", xff("198.51.100.1")); r.Status != 200 {
		t.Fatalf("first request: %d", r.Status)
	}
	if r := p.do(t, "clients", xff("198.51.100.1")); r.Status != 429 {
		t.Fatalf("second request of a client with burst 1: %d", r.Status)
	}
	if r := p.do(t, "clients", xff("198.51.100.2")); r.Status != 200 {
		t.Fatalf("another client: %d", r.Status)
	}

	cfg := strings.NewReplacer("{{NAME}}", "a", "{{REDIS}}", redisAddr, "{{VERSION}}", "v2").Replace(agentYAML)
	p.env.WriteConfig(t, p.env.AgentConfig, cfg)
	p.env.Agent.Reload(t, "config reloaded")
	if r := p.do(t, "clients", xff("198.51.100.1")); r.Status != 429 {
		t.Fatalf("after the reload the client's bucket was reset: status %d", r.Status)
	}

	code, m := p.env.GetAgent(t, "/metrics")
	if code != 200 || !strings.Contains(m, `policy_agent_ratelimit_local_buckets{policy="rateLimit"} 2`) {
		t.Fatalf("agent metrics (%d) lack the two buckets:\n%s", code, m)
	}
	if !strings.Contains(m, `policy_agent_ratelimit_backend_errors_total{policy="rateLimit",action="local"} 0`) {
		t.Fatalf("agent metrics lack the backend error counter:\n%s", m)
	}
}
