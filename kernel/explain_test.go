package kernel

import (
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
