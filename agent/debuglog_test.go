package agent

import (
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// TestContextUpdatesRedacted: the debug line's context updates never show a value whose name
// says credential, nor a body.
func TestContextUpdatesRedacted(t *testing.T) {
	f := func(ins *agentv1.Instruction, want string) {
		t.Helper()
		got := strings.Join(contextUpdates([]*agentv1.Instruction{ins}), "|")
		if got != want {
			t.Errorf("got %q, want %q", got, want)
		}
	}
	r := policy.SetHeader("X-User-ID", "alice")
	f(r, "set header X-User-ID: alice")
	for _, name := range []string{"Authorization", "x-api-key", "Cookie", "set-cookie", "x-session-id", "X-Auth-Token", "x-jwt", "x-client-secret"} {
		f(policy.SetHeader(name, "s3cr3t"), "set header "+name+": [redacted]")
	}
	f(policy.RemoveHeader("authorization"), "remove header authorization")
	f(policy.SetBody([]byte("password=hunter2")), "set body: 16 bytes")
	f(policy.SetState("access_token", "abc"), "set state access_token: [redacted]")
	f(policy.SetState("user", "alice"), "set state user: alice")
}
