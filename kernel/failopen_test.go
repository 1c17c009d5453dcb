package kernel

import (
	"slices"
	"testing"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// TestStripOwned: a fail-open request phase removes the client's own copies of the headers the
// chain owns, in every spelling, and nothing else; the response phase and a chain that owns
// nothing change nothing.
func TestStripOwned(t *testing.T) {
	f := func(phase agentv1.PolicyPhase, owned []string, hs map[string]string, want []string) {
		t.Helper()
		st := &stream{
			route:  &Route{request: chain{owned: owned}},
			phase:  phase,
			reqCtx: &agentv1.RequestContext{Headers: hs},
		}
		got := stripOwned(st).GetHeaderMutation().GetRemoveHeaders()
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Errorf("removed %q, want %q", got, want)
		}
	}
	spoofed := map[string]string{"x-user-id": "admin", "x_user_id": "admin", "x-user_id": "admin", "x-user-idx": "kept", "x-api-key": "k"}
	f(agentv1.PolicyPhase_REQUEST, []string{"x-user-id"}, spoofed, []string{"x-user-id", "x-user_id", "x_user_id"})
	f(agentv1.PolicyPhase_REQUEST, []string{"x-user-id", "x-roles"}, map[string]string{"x_roles": "admin", "accept": "*/*"}, []string{"x_roles"})
	f(agentv1.PolicyPhase_REQUEST, []string{"x-user-id"}, map[string]string{"accept": "*/*"}, nil)
	f(agentv1.PolicyPhase_REQUEST, nil, spoofed, nil)
	f(agentv1.PolicyPhase_RESPONSE, []string{"x-user-id"}, spoofed, nil)
	if stripOwned(&stream{route: &Route{request: chain{owned: []string{"x-user-id"}}}}) != nil {
		t.Error("a stream without a request context changed something")
	}
}
