package agent

import (
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// TestContextUpdatesRedacted: the debug line's context updates show names and sizes, never a
// value: a policy may copy a token into a header of any name.
func TestContextUpdatesRedacted(t *testing.T) {
	f := func(ins *agentv1.Instruction, want string) {
		t.Helper()
		got := strings.Join(contextUpdates([]*agentv1.Instruction{ins}), "|")
		if got != want {
			t.Errorf("got %q, want %q", got, want)
		}
	}
	f(policy.SetHeader("X-User-ID", "alice"), "set header X-User-ID (5 bytes)")
	f(policy.SetHeader("x-echo", "Bearer s3cr3t"), "set header x-echo (13 bytes)")
	f(policy.RemoveHeader("authorization"), "remove header authorization")
	f(policy.SetBody([]byte("password=hunter2")), "set body (16 bytes)")
	f(policy.SetState("access_token", "abc"), "set state access_token (3 bytes)")
}
