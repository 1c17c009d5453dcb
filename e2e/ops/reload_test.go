package ops

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// traffic runs requests on several goroutines until stop is called, and checks every answer:
// 200, the upstream reached with the user id, and an X-Config-Version header that never goes
// back to an older version on one goroutine (a stream that started on a new snapshot never
// sees an old one). It counts the answers per config version.
type traffic struct {
	stop     func()
	done     sync.WaitGroup
	failures atomic.Int64
	mu       sync.Mutex
	seen     map[string]int
	errs     []string
}

func startTraffic(t *testing.T, c *envoytest.Client, workers int, order []string) *traffic {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	tr := &traffic{stop: cancel, seen: map[string]int{}}
	rank := map[string]int{}
	for i, v := range order {
		rank[v] = i
	}
	for w := 0; w < workers; w++ {
		tr.done.Add(1)
		go func() {
			defer tr.done.Done()
			last := -1
			for ctx.Err() == nil {
				rctx, rcancel := context.WithTimeout(context.Background(), 5*time.Second)
				r, err := c.Do(rctx, &envoytest.Request{
					Path:       "/api/v1/users",
					Headers:    [][2]string{{"x-api-key", "demo-key-123"}},
					Attributes: map[string]string{"xds.route_name": "/api/v1/users"},
				}, nil)
				rcancel()
				v := ""
				if err == nil {
					v = testenv.Header(r.Headers, "x-config-version")
				}
				bad := ""
				switch {
				case err != nil:
					bad = err.Error()
				case r.Status != 200 || r.Forwarded == nil:
					bad = fmt.Sprintf("status %d, details %s, body %s", r.Status, r.Details, r.Body)
				case !hasHeader(r.Forwarded.Headers, "x-user-id", "demo-user"):
					bad = "upstream did not get x-user-id"
				default:
					rk, ok := rank[v]
					if !ok {
						bad = fmt.Sprintf("unknown config version %q", v)
					} else if rk < last {
						bad = fmt.Sprintf("config version went back to %q", v)
					} else {
						last = rk
					}
				}
				tr.mu.Lock()
				if bad != "" {
					tr.failures.Add(1)
					tr.errs = append(tr.errs, bad)
				} else {
					tr.seen[v]++
				}
				tr.mu.Unlock()
			}
		}()
	}
	return tr
}

func (tr *traffic) count(v string) int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.seen[v]
}

func (tr *traffic) finish(t *testing.T) {
	t.Helper()
	tr.stop()
	tr.done.Wait()
	if n := tr.failures.Load(); n > 0 {
		t.Fatalf("%d failed requests, e.g. %q", n, tr.errs[:min(5, len(tr.errs))])
	}
}

func hasHeader(hs [][2]string, name, value string) bool {
	for _, h := range hs {
		if strings.EqualFold(h[0], name) && h[1] == value {
			return true
		}
	}
	return false
}

// TestReloadUnderTraffic changes the kernel's behaviour with SIGHUP while requests flow, and
// shows that no request fails, that streams move to the new config and never back, that an
// invalid config changes nothing, and that identical bytes are a no-op.
func TestReloadUnderTraffic(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: fmt.Sprintf(kernelYAML, "v1")})
	c := e.Dial(t, envoyConfig)
	tr := startTraffic(t, c, 4, []string{"v1", "v2"})
	defer tr.stop()
	testenv.WaitFor(t, 10*time.Second, "traffic on v1", func() bool { return tr.count("v1") >= 200 })

	// A valid change: the response header changes with the snapshot.
	e.WriteConfig(t, e.KernelConfig, fmt.Sprintf(kernelYAML, "v2"))
	e.Reload(t, "config reloaded")
	testenv.WaitFor(t, 10*time.Second, "traffic on v2", func() bool { return tr.count("v2") >= 200 })

	// Invalid changes: a broken file, then a file whose chain the agent cannot run. Neither
	// changes what requests get.
	before := tr.count("v2")
	e.WriteConfig(t, e.KernelConfig, strings.Replace(fmt.Sprintf(kernelYAML, "v3"), "timeout_ms: 1500", "timeout_ms: fast", 1))
	e.Reload(t, "config reload failed; keeping the previous config")
	e.WriteConfig(t, e.KernelConfig, strings.Replace(fmt.Sprintf(kernelYAML, "v3"), "policy: allowAll", "policy: allowNobody", 1))
	e.Reload(t, "config reload failed; keeping the previous config")
	// Identical bytes (the v2 file again after it was in force) are a no-op.
	e.WriteConfig(t, e.KernelConfig, fmt.Sprintf(kernelYAML, "v2"))
	e.Reload(t, "config unchanged; reload skipped")
	testenv.WaitFor(t, 10*time.Second, "more traffic on v2", func() bool { return tr.count("v2") >= before+200 })
	tr.finish(t)
	if tr.count("v3") != 0 {
		t.Fatal("an invalid config answered requests")
	}
	logs := e.Kernel.Logs.String()
	for _, want := range []string{
		`kernel.yaml:8: policy_kernel.agents[0].timeout_ms: want an integer, got \"fast\"`,
		`kernel.yaml:24: policy_kernel.default_policy.request_policy_chain[0].policy: policy \"allowNobody\" is not supported by agent \"default-agent\"`,
	} {
		if !strings.Contains(logs, want) {
			t.Errorf("kernel log lacks %s:\n%s", want, logs)
		}
	}
	_, metrics := e.Get(t, "/metrics")
	for _, want := range []string{
		`policy_kernel_config_reload_total{status="success"} 1`,
		`policy_kernel_config_reload_total{status="failure"} 2`,
		`policy_kernel_config_info{version="v2-`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	if strings.Contains(metrics, `policy_kernel_config_info{version="v1-`) {
		t.Error("the old version's config_info series is still exported")
	}
	_, ready := e.Get(t, "/health/ready")
	if !strings.Contains(ready, `"config_version":"v2-`) {
		t.Errorf("readiness does not show the version: %s", ready)
	}
	t.Logf("answers: v1 %d, v2 %d", tr.count("v1"), tr.count("v2"))
}

// agentKeyYAML keys apiKeyAuth by the agent's config: reloading the agent with another key
// changes which requests pass.
const agentKeyYAML = `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  version: "%s"
  policies:
    config:
      apiKeyAuth:
        keys:
          - key_env: OPS_KEY_%s
            user_id: demo-user
  observability:
    metrics_address: "{{AGENT_METRICS}}"
`

// TestAgentReloadUnderTraffic reloads the agent's policy settings with SIGHUP while requests
// flow: the key that passes changes, no request fails, an invalid file changes nothing.
func TestAgentReloadUnderTraffic(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{
		AgentYAML:  fmt.Sprintf(agentKeyYAML, "a1", "A"),
		KernelYAML: fmt.Sprintf(kernelYAML, "v1"),
		AgentEnv:   []string{"OPS_KEY_A=key-a", "OPS_KEY_B=key-b"},
	})
	c := e.Dial(t, envoyConfig)
	status := func(key string) int {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		r, err := c.Do(ctx, &envoytest.Request{Path: "/api/v1/users", Headers: [][2]string{{"x-api-key", key}}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		return r.Status
	}
	if status("key-a") != 200 || status("key-b") != 403 {
		t.Fatal("before reload: key-a must pass and key-b not")
	}
	var failures atomic.Int64
	var n atomic.Int64
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				rctx, rcancel := context.WithTimeout(context.Background(), 5*time.Second)
				r, err := c.Do(rctx, &envoytest.Request{Path: "/api/v1/users", Headers: [][2]string{{"x-api-key", "key-a"}}}, nil)
				rcancel()
				// 200 before the reload, 403 after; anything else is a failure.
				if err != nil || (r.Status != 200 && r.Status != 403) {
					failures.Add(1)
				}
				n.Add(1)
			}
		}()
	}
	testenv.WaitFor(t, 10*time.Second, "traffic", func() bool { return n.Load() > 50 })
	e.WriteConfig(t, e.AgentConfig, fmt.Sprintf(agentKeyYAML, "a2", "B"))
	e.Agent.Reload(t, "config reloaded")
	e.WriteConfig(t, e.AgentConfig, strings.Replace(fmt.Sprintf(agentKeyYAML, "a3", "A"), "user_id: demo-user", "user_id: demo-user\n            bogus: 1", 1))
	e.Agent.Reload(t, "config reload failed; keeping the previous config")
	m := n.Load()
	testenv.WaitFor(t, 10*time.Second, "more traffic", func() bool { return n.Load() > m+50 })
	cancel()
	wg.Wait()
	if f := failures.Load(); f > 0 {
		t.Fatalf("%d of %d requests failed during the agent reload", f, n.Load())
	}
	if status("key-a") != 403 || status("key-b") != 200 {
		t.Fatal("after reload: key-b must pass and key-a not")
	}
	code, metrics := e.GetAgent(t, "/metrics")
	if code != 200 || !strings.Contains(metrics, `policy_agent_config_reload_total{status="success"} 1`) ||
		!strings.Contains(metrics, `policy_agent_config_reload_total{status="failure"} 1`) ||
		!strings.Contains(metrics, `policy_agent_config_info{version="a2-`) {
		t.Fatalf("agent metrics:\n%s", metrics)
	}
	_, ready := e.GetAgent(t, "/health/ready")
	if !strings.Contains(ready, `"config_version":"a2-`) {
		t.Fatalf("agent readiness: %s", ready)
	}
	if !strings.Contains(e.Agent.Logs.String(), "agent.yaml") || !strings.Contains(e.Agent.Logs.String(), "bogus") {
		t.Fatalf("the invalid agent config is not explained:\n%s", e.Agent.Logs.String())
	}
	if strings.Contains(e.Agent.Logs.String(), "key-a") || strings.Contains(e.Agent.Logs.String(), "key-b") {
		t.Fatal("a key reached the agent's log")
	}
}
