package kernel

import (
	"encoding/json"
	"strings"
	"testing"
)

// TestConfigDump checks the kernel's /config document: routes in config order with their
// chains and modes, the invalid route with its reason, the agents, and chain metadata that
// holds a secret redacted while a secret reference stays as written.
func TestConfigDump(t *testing.T) {
	cfg := strings.Replace(baseConfig, "        - policy: auth\n          metadata: {header_name: X-Other}",
		"        - policy: auth\n          mode: shadow\n          metadata: {header_name: X-Other, hmac_secret: hunter2, key_ref: \"${env:KEY}\", nested: '{\"password\":\"pw\",\"user\":\"u\"}'}", 1)
	k := newTestKernel(t, cfg, &fakeAgent{})
	snap := k.s.Snapshot()
	d := dumpSnapshot(snap, false)
	b, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	for _, s := range []string{"hunter2", `"pw"`} {
		if strings.Contains(text, s) {
			t.Fatalf("secret %s in the dump: %s", s, text)
		}
	}
	if d.ConfigVersion != "v1" || d.LoadedAt.IsZero() || len(d.Routes) != len(snap.Config.RoutePolicies) || d.Default == nil {
		t.Fatalf("dump: %+v", d)
	}
	named := d.Routes[1]
	if named.Name != "named-route" || named.Status != "ok" || named.Request[0].Mode != "shadow" || named.Request[0].OnFailure != "deny" ||
		named.Request[0].Metadata["key_ref"] != "${env:KEY}" || named.Request[0].Metadata["hmac_secret"] != "[REDACTED]" {
		t.Fatalf("named-route: %+v", named)
	}
	if nested, _ := named.Request[0].Metadata["nested"].(map[string]any); nested["password"] != "[REDACTED]" || nested["user"] != "u" {
		t.Fatalf("nested metadata: %v", named.Request[0].Metadata["nested"])
	}
	var broken *RouteDump
	for i := range d.Routes {
		if d.Routes[i].Name == "/broken" {
			broken = &d.Routes[i]
		}
	}
	if broken == nil || broken.Status != "invalid" || !strings.Contains(broken.Reason, "notThere") {
		t.Fatalf("/broken: %+v", broken)
	}
	if len(d.Agents) != 1 || !d.Agents[0].Healthy || d.Agents[0].AgentName != "a" || len(d.Agents[0].Policies) != len(testInfo().SupportedPolicies) {
		t.Fatalf("agents: %+v", d.Agents)
	}
	// A rebuild from the same config keeps the time it was loaded.
	loaded := snap.ConfigLoaded
	k.s.Store(buildSnapshot(snap.Config, snap.Version, snap.agents, k.m))
	if got := k.s.Snapshot().ConfigLoaded; !got.Equal(loaded) {
		t.Fatalf("rebuild moved loaded_at from %v to %v", loaded, got)
	}
}
