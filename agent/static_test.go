package agent

import (
	"context"
	"testing"

	"google.golang.org/protobuf/proto"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// TestEntryFactsStatic: an entry whose policy answers every request of its phase alike reports
// that answer (addSecurityHeaders that overwrites, allowAll), and it is what Execute answers on
// any request; an entry whose answer depends on the request (no overwrite), that enforces, that
// observes outcomes, runs in shadow, has a condition or a cache, or does not build reports none.
func TestEntryFactsStatic(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	resp, reqPh := agentv1.PolicyPhase_RESPONSE, agentv1.PolicyPhase_REQUEST
	shadow := p("addSecurityHeaders")
	shadow.Shadow = true
	when := p("addSecurityHeaders")
	when.When = "true"
	cached := p("addSecurityHeaders")
	cached.Cache = &agentv1.CacheSpec{TtlMs: 1}
	cases := []struct {
		pol    *agentv1.Policy
		phase  agentv1.PolicyPhase
		static bool
	}{
		{p("addSecurityHeaders"), resp, true},
		{p("addSecurityHeaders", "headers", `{"X-A":"1"}`, "overwrite", "true"), resp, true},
		{p("addSecurityHeaders", "overwrite", "false"), resp, false},
		{p("addSecurityHeaders"), reqPh, false},
		{p("addSecurityHeaders", "headers", `{"bad name":"1"}`), resp, false},
		{p("allowAll"), reqPh, true},
		{p("allowAll"), resp, true},
		{p("apiKeyAuth"), reqPh, false},
		{p("auditLog"), resp, false},
		{shadow, resp, false},
		{when, resp, false},
		{cached, resp, false},
		{p("nope"), resp, false},
	}
	var entries []*agentv1.ChainEntry
	for _, c := range cases {
		entries = append(entries, &agentv1.ChainEntry{Policy: c.pol, Phase: c.phase})
	}
	facts := e.EntryFacts(entries)
	for i, c := range cases {
		so := facts[i].GetStaticOutcome()
		if (so != nil) != c.static {
			t.Errorf("entry %d (%s %v): static %v, want %v", i, c.pol.GetName(), c.phase, so != nil, c.static)
			continue
		}
		if so == nil {
			continue
		}
		// What the kernel applies is what the agent answers, whatever the request.
		for _, hdrs := range []map[string]string{nil, {"x-frame-options": "SAMEORIGIN", "x-a": "2"}} {
			r := &agentv1.PolicyRequest{RequestId: "r", Phase: c.phase, Policies: []*agentv1.Policy{c.pol},
				Context:  &agentv1.RequestContext{Headers: map[string]string{"x": "y"}, Path: "/p"},
				Response: &agentv1.ResponseContext{StatusCode: 200, Headers: hdrs}, State: map[string]string{"k": "v"}}
			got := e.Execute(context.Background(), r)
			if got.GetStatus().GetCode() != agentv1.StatusCode_OK || len(got.GetInstructions()) != len(so.GetInstructions()) {
				t.Fatalf("entry %d: Execute answered %v, static %v", i, got, so)
			}
			for j, in := range got.GetInstructions() {
				if !proto.Equal(in, so.GetInstructions()[j]) {
					t.Fatalf("entry %d: instruction %d: %v, static %v", i, j, in, so.GetInstructions()[j])
				}
			}
		}
	}
	d := e.Describe()
	for _, pi := range d.GetSupportedPolicies() {
		if want := pi.GetName() == "addSecurityHeaders" || pi.GetName() == "allowAll"; pi.GetStaticEntries() != want {
			t.Errorf("PolicyInfo %s: static_entries %v", pi.GetName(), pi.GetStaticEntries())
		}
	}
}
