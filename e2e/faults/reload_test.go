package faults

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
	"github.com/policy-engine/policy-engine/internal/testpolicies"
)

// taggedKernelYAML tags the request and the response of /tagged with the config's version, so
// that every answer shows which config produced each phase. Its timeouts are far from the
// agent's speed: the storm tests reloads, and a CPU-starved machine must not turn into agent
// timeouts here.
func taggedKernelYAML(v int) string {
	return fmt.Sprintf(`policy_kernel:
  version: v%d
  server: {message_timeout_ms: 1000}
  agents:
    - name: a
      socket_path: "{{SOCK}}"
      timeout_ms: 800
      health_check_interval_ms: 2000
  route_policies:
    - route_name: /tagged
      request_policy_chain: [{policy: testTag, metadata: {tag: v%d}}]
      response_policy_chain: [{policy: testTag, metadata: {tag: v%d}}]
`, v, v, v)
}

// brokenKernelYAML are configs a reload must refuse: bad YAML, an unknown key, a bad value, a
// duplicate route, no agent, an empty section, a null document.
var brokenKernelYAML = []string{
	"policy_kernel:\n  agents: [\n",
	taggedKernelYAML(0) + "  bogus: 1\n",
	strings.Replace(taggedKernelYAML(0), "timeout_ms: 800", "timeout_ms: soon", 1),
	taggedKernelYAML(0) + "    - route_name: /tagged\n",
	"policy_kernel:\n  agents: []\n",
	"policy_kernel:\n",
	"~\n",
}

func taggedAgentYAML(v int) string {
	return strings.Replace(agentYAML, "agent_core:\n", fmt.Sprintf("agent_core:\n  version: a%d\n", v), 1)
}

var brokenAgentYAML = []string{
	"agent_core:\n  name: [\n",
	agentYAML + "  bogus: 1\n",
	strings.Replace(agentYAML, "user_id: fault-user", "user_id: \"\"", 1),
	"agent_core:\n",
	"null\n",
}

// TestReloadStorm sends SIGHUPs to the kernel and the agent, alternating valid and invalid
// configs, under steady traffic. No request fails, and the request and response phases of every
// request carry the tag of one and the same config version, one that was in force while the
// request ran.
func TestReloadStorm(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: taggedAgentYAML(0), KernelYAML: taggedKernelYAML(0),
		AgentBin: testenv.Build(t, testenv.TestAgentPackage)})
	c := e.Dial(t, envoyConfig)
	// sent[v] is when the SIGHUP that installs version v went out; seen[v] is when its log line
	// was read, after it was installed.
	sent := map[int]time.Time{0: {}}
	seen := map[int]time.Time{0: time.Now()}
	tr := startTraffic(c, 4, 2*time.Millisecond, func(int, int) (string, *envoytest.Request) { return "/tagged", request("/tagged") })

	hups := scale(100, 400)
	valid, refused := 0, 0
	for i := range hups {
		if i%2 == 0 {
			v := i/2 + 1
			writeAtomically(t, e, e.KernelConfig, taggedKernelYAML(v))
			sent[v] = time.Now()
			if got := e.Kernel.Reload(t, "config reloaded", "config reload failed"); got != "config reloaded" {
				t.Fatalf("valid config v%d refused:\n%s", v, e.Kernel.Logs.String())
			}
			seen[v] = time.Now()
			valid++
			writeAtomically(t, e, e.AgentConfig, taggedAgentYAML(v))
			if got := e.Agent.Reload(t, "config reloaded", "config reload failed"); got != "config reloaded" {
				t.Fatalf("valid agent config a%d refused:\n%s", v, e.Agent.Logs.String())
			}
		} else {
			writeAtomically(t, e, e.KernelConfig, brokenKernelYAML[i/2%len(brokenKernelYAML)])
			if got := e.Kernel.Reload(t, "config reloaded", "config reload failed"); got != "config reload failed" {
				t.Fatalf("broken config %d accepted", i/2%len(brokenKernelYAML))
			}
			refused++
			writeAtomically(t, e, e.AgentConfig, brokenAgentYAML[i/2%len(brokenAgentYAML)])
			if got := e.Agent.Reload(t, "config reloaded", "config reload failed"); got != "config reload failed" {
				t.Fatalf("broken agent config %d accepted", i/2%len(brokenAgentYAML))
			}
		}
	}
	time.Sleep(100 * time.Millisecond)
	shots := tr.finish()
	alive(t, e)

	last := valid
	for _, s := range shots {
		if s.outcome() != "upstream" {
			t.Errorf("request at %v: %s", s.start.Format(time.StampMilli), s.outcome())
			continue
		}
		reqTag := testenv.Header(s.res.Forwarded.Headers, testpolicies.TagHeader)
		respTag := testenv.Header(s.res.Headers, testpolicies.TagHeader)
		if reqTag != respTag {
			t.Errorf("one request saw two configs: request phase %q, response phase %q", reqTag, respTag)
			continue
		}
		v, err := strconv.Atoi(strings.TrimPrefix(reqTag, "v"))
		if err != nil || v < 0 || v > last {
			t.Errorf("tag %q is no config version", reqTag)
			continue
		}
		// v was in force at some time during the request: installed before it ended, and not
		// replaced before it started.
		end := s.start.Add(s.latency)
		if sent[v].After(end) {
			t.Errorf("request ended at %v with v%d, whose reload was sent at %v", end.Format(time.StampMilli), v, sent[v].Format(time.StampMilli))
		}
		if next, ok := seen[v+1]; ok && next.Before(s.start) {
			t.Errorf("request started at %v got v%d, replaced by %v", s.start.Format(time.StampMilli), v, next.Format(time.StampMilli))
		}
	}
	_, body := e.Get(t, "/metrics")
	if got := testenv.Metric(body, `policy_kernel_config_reload_total{status="success"}`); got != float64(valid) {
		t.Errorf("reload successes counted %v, want %d", got, valid)
	}
	if got := testenv.Metric(body, `policy_kernel_config_reload_total{status="failure"}`); got != float64(refused) {
		t.Errorf("reload failures counted %v, want %d", got, refused)
	}
	if !strings.Contains(body, fmt.Sprintf(`policy_kernel_config_info{version="v%d-`, last)) {
		t.Errorf("config_info does not show v%d", last)
	}
	tl := count(shots)
	tl.report(t, fmt.Sprintf("reload storm (%d SIGHUPs to each process, %d valid, %d refused)", hups, valid, refused))
	if tl.lost() != 0 {
		t.Errorf("%d requests lost", tl.lost())
	}
}
