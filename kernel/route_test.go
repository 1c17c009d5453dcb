package kernel

import (
	"bytes"
	"fmt"
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

// TestRouteByPathSpellings checks that, without a known route name, spellings of a route's
// path that an upstream reads as that path take the route, not the default policy.
func TestRouteByPathSpellings(t *testing.T) {
	k := newTestKernel(t, baseConfig, &fakeAgent{})
	snap := k.s.Snapshot()
	for _, path := range []string{"/api/v1/users", "//api/v1/users", "/API/V1/USERS/7", "/api/v1/x/../users", "/%61pi/v1/users;s=1", "/api%2Fv1%2Fusers"} {
		for _, attr := range []string{"", "envoy-only"} {
			if r := snap.route(attr, path); r == nil || r.Name != "/api/v1/users" {
				t.Errorf("route(%q, %q) = %v, want /api/v1/users", attr, path, r)
			}
		}
	}
	if r := snap.route("named-route", "/api/v1/users"); r == nil || r.Name != "named-route" {
		t.Errorf("a known route name must win over the path: %v", r)
	}
}

// TestDefaultRouteCounted checks that requests given the default policy are counted by route
// name, at most maxDefaultRouteNames names then "other", and that each name is logged once.
func TestDefaultRouteCounted(t *testing.T) {
	k := newTestKernel(t, baseConfig, &fakeAgent{})
	snap := k.s.Snapshot()
	metric := func(series string) float64 {
		t.Helper()
		var b bytes.Buffer
		k.m.set.WritePrometheus(&b)
		return testenv.Metric(b.String(), series)
	}
	for range 3 {
		if r := snap.route("envoy-only", "/nowhere"); r == nil || r.Name != "default" {
			t.Fatalf("route = %v, want the default", r)
		}
		snap.route("", "/nowhere")
	}
	snap.route("/api/v1/users", "/x") // a known name is not counted
	snap.route("", "/api/v1/users")   // nor a path match
	for name, want := range map[string]float64{"envoy-only": 3, "": 3, "other": 0} {
		if got := metric(`policy_kernel_default_route_requests_total{route_name="` + name + `"}`); got != want {
			t.Errorf("route_name %q: %v, want %v", name, got, want)
		}
	}
	if n := strings.Count(k.logs.String(), `"route_name":"envoy-only"`); n != 1 {
		t.Errorf("envoy-only logged %d times, want once:\n%s", n, k.logs)
	}
	// Past the bound, names are "other"; a reload keeps the names already counted.
	for i := range maxDefaultRouteNames + 10 {
		snap.route(fmt.Sprintf("r%d", i), "/nowhere")
	}
	k.s.Store(buildSnapshot(snap.Config, "v2", snap.agents, k.m))
	k.s.Snapshot().route("envoy-only", "/nowhere")
	if got := metric(`policy_kernel_default_route_requests_total{route_name="other"}`); got != 12 {
		t.Errorf(`route_name "other": %v, want 12`, got)
	}
	if got := metric(`policy_kernel_default_route_requests_total{route_name="envoy-only"}`); got != 4 {
		t.Errorf(`route_name "envoy-only" after a reload: %v, want 4`, got)
	}
	var b bytes.Buffer
	k.m.set.WritePrometheus(&b)
	if n := strings.Count(b.String(), "policy_kernel_default_route_requests_total{"); n != maxDefaultRouteNames+1 {
		t.Errorf("%d series, want %d", n, maxDefaultRouteNames+1)
	}
}

// TestNoDefaultRouteCounted: without a default policy, requests that match nothing pass, and
// are counted all the same.
func TestNoDefaultRouteCounted(t *testing.T) {
	k := newTestKernel(t, strings.Split(baseConfig, "  default_policy:")[0], &fakeAgent{})
	if r := k.s.Snapshot().route("", "/nowhere"); r != nil {
		t.Fatalf("route = %v, want none", r)
	}
	var b bytes.Buffer
	k.m.set.WritePrometheus(&b)
	if got := testenv.Metric(b.String(), `policy_kernel_default_route_requests_total{route_name=""}`); got != 1 {
		t.Errorf("counted %v, want 1", got)
	}
	if !strings.Contains(k.logs.String(), `"chain":"none: passed unchanged"`) {
		t.Errorf("log: %s", k.logs)
	}
}
