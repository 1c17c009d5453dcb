package kernel

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestExplainRoute(t *testing.T) {
	k := newTestKernel(t, baseConfig, &fakeAgent{})
	snap := k.s.Snapshot()
	for _, c := range []struct{ attr, path, route, rule string }{
		{"named-route", "/api/v1/users", "named-route", "attribute"},
		{"", "/api/v1/users/7?x=1", "/api/v1/users", "path prefix"},
		{"unknown-name", "/API/v1/./users", "/api/v1/users", "path prefix"},
		{"", "/elsewhere", "default", "default"},
	} {
		got := snap.ExplainRoute(c.attr, c.path)
		if got.Route != c.route || got.Rule != c.rule || got.Agent != "a" {
			t.Errorf("%q %q: %+v, want %s by %s", c.attr, c.path, got, c.route, c.rule)
		}
	}
	if got := snap.ExplainRoute("", "/api/v1/users"); len(got.Request) != 1 || got.Request[0].GetName() != "auth" || len(got.Response) != 1 || got.Invalid != "" {
		t.Errorf("chains: %+v", got)
	}
	if got := snap.ExplainRoute("", "/broken"); !strings.Contains(got.Invalid, "notThere") {
		t.Errorf("invalid route: %+v", got)
	}
	noDefault := strings.Split(baseConfig, "  default_policy:")[0]
	if got := newTestKernel(t, noDefault, &fakeAgent{}).s.Snapshot().ExplainRoute("", "/elsewhere"); got.Route != "" || got.Rule != "none" {
		t.Errorf("no default: %+v", got)
	}
}

func TestNewOfflineServer(t *testing.T) {
	cfg, err := ParseConfig("kernel.yaml", []byte(baseConfig))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewOfflineServer(cfg.PolicyKernel, map[string]AgentClient{"b": &fakeAgent{info: testInfo()}}); err == nil || !strings.Contains(err.Error(), `agent "a" of the kernel config has no agent config`) {
		t.Fatalf("missing agent: %v", err)
	}
	s, err := NewOfflineServer(cfg.PolicyKernel, map[string]AgentClient{"a": &fakeAgent{info: testInfo()}})
	if err != nil {
		t.Fatal(err)
	}
	if got := s.Snapshot().ExplainRoute("", "/api/v1/users"); got.Route != "/api/v1/users" || got.Invalid != "" {
		t.Fatalf("%+v", got)
	}
}

// TestValidateOffline: policyctl validate's check of a kernel config with the agents in the
// caller's process: a good config is "valid"; a bad entry is reported at file:line with its
// key; an agent of the config without a client, a client no agent is named for, and an agent
// that cannot describe its policies are each a problem.
func TestValidateOffline(t *testing.T) {
	dir := t.TempDir()
	write := func(name, yaml string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := write("good.yaml", `policy_kernel:
  agents: [{name: a, socket_path: /unused.sock}]
  route_policies:
    - route_name: /api
      request_policy_chain:
        - policy: auth
      response_policy_chain:
        - policy: hdr
`)
	var out bytes.Buffer
	if err := ValidateOffline(&out, good, map[string]AgentClient{"a": &fakeAgent{info: testInfo()}}); err != nil || !strings.Contains(out.String(), good+": valid (version ") {
		t.Fatalf("good: %v %q", err, out.String())
	}

	bad := write("bad.yaml", `policy_kernel:
  agents: [{name: a, socket_path: /unused.sock}]
  route_policies:
    - route_name: /api
      request_policy_chain:
        - policy: auth
        - policy: hdr
`)
	out.Reset()
	err := ValidateOffline(&out, bad, map[string]AgentClient{"a": &fakeAgent{info: testInfo()}})
	if err == nil || !strings.Contains(err.Error(), bad+":7: policy_kernel.route_policies[0].request_policy_chain[1]") ||
		!strings.Contains(err.Error(), `"hdr"`) || strings.Contains(out.String(), "valid") {
		t.Fatalf("bad entry: %v %q", err, out.String())
	}

	err = ValidateOffline(&out, good, map[string]AgentClient{"b": &fakeAgent{info: testInfo()}})
	if err == nil || !strings.Contains(err.Error(), good+":2: policy_kernel.agents[0].name") || !strings.Contains(err.Error(), `no agent config that loads has agent_core.name "a"`) ||
		!strings.Contains(err.Error(), `an agent config has agent_core.name "b", which no agent of policy_kernel.agents is named`) {
		t.Fatalf("agent names: %v", err)
	}

	err = ValidateOffline(&out, good, map[string]AgentClient{"a": &fakeAgent{infoErr: errors.New("no policies")}})
	if err == nil || !strings.Contains(err.Error(), `agent "a": no policies`) {
		t.Fatalf("agent error: %v", err)
	}

	if err := ValidateOffline(&out, filepath.Join(dir, "missing.yaml"), nil); err == nil || !strings.Contains(err.Error(), "missing.yaml") {
		t.Fatalf("missing file: %v", err)
	}
}
