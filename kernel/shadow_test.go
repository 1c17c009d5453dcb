package kernel

import (
	"strings"
	"testing"
)

// TestShadowModeCompiled checks that the shadow flag sent to the agent follows the entry's
// mode, its route's mode and the kernel's: any of them in shadow puts the entry in shadow.
func TestShadowModeCompiled(t *testing.T) {
	const cfg = `policy_kernel:
  agents: [{name: a, socket_path: /unused.sock}]
  route_policies:
    - route_name: entry
      request_policy_chain:
        - policy: auth
          mode: shadow
        - policy: allowAll
          mode: enforce
      response_policy_chain:
        - policy: hdr
    - route_name: route
      mode: shadow
      request_policy_chain:
        - policy: auth
          mode: enforce
      response_policy_chain:
        - policy: hdr
  default_policy:
    mode: shadow
    request_policy_chain:
      - policy: allowAll
`
	flags := func(k *testKernel, route string) string {
		t.Helper()
		snap := k.s.Snapshot()
		r := snap.route(route, "/x")
		if route == "default" {
			r = snap.defaultRoute
		}
		if r == nil {
			t.Fatalf("no route %q", route)
		}
		var b strings.Builder
		for _, c := range []*chain{&r.request, &r.response} {
			for _, p := range c.policies {
				if p.GetShadow() {
					b.WriteByte('s')
				} else {
					b.WriteByte('e')
				}
			}
			b.WriteByte('|')
		}
		return b.String()
	}
	k := newTestKernel(t, cfg, &fakeAgent{})
	for route, want := range map[string]string{"entry": "se|e|", "route": "s|s|", "default": "s||"} {
		if got := flags(k, route); got != want {
			t.Errorf("route %q: modes %s, want %s", route, got, want)
		}
	}
	all := newTestKernel(t, strings.Replace(cfg, "policy_kernel:\n", "policy_kernel:\n  shadow: true\n", 1), &fakeAgent{})
	for route, want := range map[string]string{"entry": "ss|s|", "route": "s|s|", "default": "s||"} {
		if got := flags(all, route); got != want {
			t.Errorf("kernel in shadow: route %q: modes %s, want %s", route, got, want)
		}
	}
}
