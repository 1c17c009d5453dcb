package agent

import (
	"context"
	"slices"
	"testing"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// ownerPolicy owns the header key and sets it to value when value is not empty.
type ownerPolicy struct {
	owned []string
	value string
}

func (o *ownerPolicy) Execute(context.Context, *policy.Context) (policy.Result, error) {
	if o.value == "" {
		return policy.Result{}, nil
	}
	return policy.Allow(policy.SetHeader(o.owned[0], o.value)), nil
}

func (o *ownerPolicy) OwnedRequestHeaders() []string { return o.owned }

func init() {
	policy.Register(policy.Module{
		Name: "t.owner", Version: "0.0.1", Phases: policy.Both,
		New: func(policy.Config) (policy.Factory, error) {
			return policy.FactoryFunc(func(md map[string]string) (policy.Policy, error) {
				var s testSettings
				if err := policy.DecodeMetadata(md, &s); err != nil {
					return nil, err
				}
				return &ownerPolicy{owned: []string{s.Key}, value: s.Value}, nil
			}), nil
		},
	})
}

var (
	_ policy.Policy      = (*ownerPolicy)(nil)
	_ policy.HeaderOwner = (*ownerPolicy)(nil)
)

// spoofed is a request whose client sent the owned header x-user-id in several spellings.
func spoofed(phase agentv1.PolicyPhase, policies ...*agentv1.Policy) *agentv1.PolicyRequest {
	r := req(policies...)
	r.Phase = phase
	r.Context.Headers = map[string]string{
		"x-user-id": "admin", "x_user_id": "admin", "x-user_id": "admin", "X_USER_ID": "admin",
		"x-user-idx": "kept", "x-api-key": "k",
	}
	if phase == agentv1.PolicyPhase_RESPONSE {
		r.Response = &agentv1.ResponseContext{StatusCode: 200}
	}
	return r
}

// headerOps lists the header instructions of a response as "remove name" and "set name=value".
func headerOps(r *agentv1.PolicyResponse) []string {
	var out []string
	for _, in := range r.GetInstructions() {
		switch in.GetType() {
		case agentv1.InstructionType_REMOVE_HEADER:
			out = append(out, "remove "+in.GetHeader().GetKey())
		case agentv1.InstructionType_SET_HEADER:
			out = append(out, "set "+in.GetHeader().GetKey()+"="+in.GetHeader().GetValue())
		}
	}
	return out
}

func TestOwnedHeadersRemoved(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	removals := []string{"remove X_USER_ID", "remove x-user-id", "remove x-user_id", "remove x_user_id"}
	f := func(name string, r *agentv1.PolicyRequest, wantCode agentv1.StatusCode, want []string) {
		t.Helper()
		resp := e.Execute(context.Background(), r)
		if got := resp.GetStatus().GetCode(); got != wantCode {
			t.Errorf("%s: status %v (%s), want %v", name, got, resp.GetMessage(), wantCode)
		}
		got := headerOps(resp)
		// Removals come first, in map order; sort them for the comparison.
		n := 0
		for n < len(got) && len(got[n]) > 7 && got[n][:7] == "remove " {
			n++
		}
		slices.Sort(got[:n])
		if !slices.Equal(got, want) {
			t.Errorf("%s: instructions %q, want %q", name, got, want)
		}
	}
	owner := p("t.owner", "key", "x-user-id")
	// A later policy must not see the client's value in any spelling.
	blind := []*agentv1.Policy{
		p("t.requireHeader", "key", "x-user-id", "want", ""),
		p("t.requireHeader", "key", "x_user_id", "want", ""),
		p("t.requireHeader", "key", "x-user-idx", "want", "kept"),
	}
	f("owner that sets nothing", spoofed(agentv1.PolicyPhase_REQUEST, append([]*agentv1.Policy{owner}, blind...)...), agentv1.StatusCode_OK, removals)
	f("owner after the policies that read", spoofed(agentv1.PolicyPhase_REQUEST, append(blind, owner)...), agentv1.StatusCode_OK, removals)
	f("owner that sets the header", spoofed(agentv1.PolicyPhase_REQUEST,
		p("t.owner", "key", "x-user-id", "value", "alice"), p("t.requireHeader", "key", "x-user-id", "want", "alice")),
		agentv1.StatusCode_OK, append(slices.Clone(removals), "set x-user-id=alice"))
	f("owner never reached: skip_remaining", spoofed(agentv1.PolicyPhase_REQUEST, onFailure(p("t.fail"), "skip_remaining"), owner),
		agentv1.StatusCode_OK, removals)
	f("owner never reached: continue", spoofed(agentv1.PolicyPhase_REQUEST, onFailure(p("t.fail"), "continue"), owner),
		agentv1.StatusCode_OK, removals)
	f("owner owning an underscore spelling", spoofed(agentv1.PolicyPhase_REQUEST, p("t.owner", "key", "X_User-Id")), agentv1.StatusCode_OK, removals)
	f("no owner in the chain", spoofed(agentv1.PolicyPhase_REQUEST, p("t.requireHeader", "key", "x-user-id", "want", "admin")), agentv1.StatusCode_OK, nil)
	f("response phase", spoofed(agentv1.PolicyPhase_RESPONSE, owner), agentv1.StatusCode_OK, nil)
	f("owner whose metadata is invalid", spoofed(agentv1.PolicyPhase_REQUEST, onFailure(p("t.owner", "nope", "x"), "continue")), agentv1.StatusCode_OK, nil)
}

// BenchmarkRemoveOwned is the cost of the check on a request without spoofed headers, with an
// owner in the chain and without one. Compare runs with benchstat.
func BenchmarkRemoveOwned(b *testing.B) {
	e, _ := newTestExecutor(&testing.T{}, testCore())
	hs := map[string]string{}
	for _, k := range []string{"x-api-key", "user-agent", "accept", "accept-encoding", "x-request-id", "x-forwarded-for",
		"x-forwarded-proto", "content-type", "authorization", "cookie", "x-b3-traceid", "traceparent"} {
		hs[k] = "v"
	}
	r := &agentv1.PolicyRequest{Phase: agentv1.PolicyPhase_REQUEST}
	pc := &policy.Context{Headers: hs}
	for _, bc := range []struct {
		name  string
		chain []resolved
	}{
		{"owner", []resolved{{policy: &ownerPolicy{owned: []string{"x-user-id"}}}, {policy: funcPolicy(nil)}}},
		{"no-owner", []resolved{{policy: funcPolicy(nil)}, {policy: funcPolicy(nil)}}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if ins := e.removeOwned(r, bc.chain, pc, nil); len(ins) != 0 {
					b.Fatal("removed a header")
				}
			}
		})
	}
}

// TestEntryFacts: ValidateChains' facts name the request headers an entry owns, lowercase, so
// that the kernel can remove them when it lets a request through without the agent; entries
// that own none, run in the response phase, or do not build report none.
func TestEntryFacts(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	entry := func(pol *agentv1.Policy, phase agentv1.PolicyPhase) *agentv1.ChainEntry {
		return &agentv1.ChainEntry{Policy: pol, Phase: phase}
	}
	facts := e.EntryFacts([]*agentv1.ChainEntry{
		entry(p("t.owner", "key", "X-User-ID"), agentv1.PolicyPhase_REQUEST),
		entry(p("t.owner", "key", "X-User-ID"), agentv1.PolicyPhase_RESPONSE),
		entry(p("t.setHeader", "key", "x", "value", "1"), agentv1.PolicyPhase_REQUEST),
		entry(p("t.owner", "bogus", "1"), agentv1.PolicyPhase_REQUEST),
		entry(p("nope"), agentv1.PolicyPhase_REQUEST),
	})
	want := [][]string{{"x-user-id"}, nil, nil, nil, nil}
	if len(facts) != len(want) {
		t.Fatalf("%d facts for %d entries", len(facts), len(want))
	}
	for i := range want {
		if got := facts[i].GetOwnedRequestHeaders(); !slices.Equal(got, want[i]) {
			t.Errorf("entry %d: owned %q, want %q", i, got, want[i])
		}
	}
	e.Close()
	if f := e.EntryFacts([]*agentv1.ChainEntry{entry(p("t.owner", "key", "x"), agentv1.PolicyPhase_REQUEST)}); len(f) != 1 || len(f[0].GetOwnedRequestHeaders()) != 0 {
		t.Errorf("no config: %v", f)
	}
}
