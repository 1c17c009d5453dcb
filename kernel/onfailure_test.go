package kernel

import (
	"bytes"
	"strings"
	"testing"
)

// TestIgnoredOnFailureWarned: continue or skip_remaining on a policy that its agent says
// enforces is reported by --validate (and logged at load) as ignored, without making the config
// invalid; on other policies, and with an agent that names no enforcing policy, it is not.
func TestIgnoredOnFailureWarned(t *testing.T) {
	yaml := `policy_kernel:
  agents:
    - name: a
      socket_path: /unused.sock
  route_policies:
    - route_name: /a
      request_policy_chain:
        - policy: allowAll
          on_failure: skip_remaining
        - policy: auth
          on_failure: continue
    - route_name: /b
      request_policy_chain:
        - policy: auth
          on_failure: skip_remaining
        - policy: auth
          on_failure: deny
`
	fa := &fakeAgent{info: testInfo()}
	fa.info.AgentMetadata = map[string]string{"enforcing_policies": "auth,other"}
	tk := newTestKernel(t, yaml, fa)
	var out bytes.Buffer
	if err := validateReport(&out, "kernel.yaml", []byte(yaml), tk.s.Snapshot(), nil, false); err != nil {
		t.Fatalf("validateReport: %v", err)
	}
	want := []string{
		`warning: kernel.yaml:11: policy_kernel.route_policies[0].request_policy_chain[1].on_failure: on_failure continue is ignored: policy "auth" enforces, so its failures deny and it is never skipped`,
		`warning: kernel.yaml:15: policy_kernel.route_policies[1].request_policy_chain[0].on_failure: on_failure skip_remaining is ignored: policy "auth" enforces`,
		"kernel.yaml: valid (version v1)",
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != len(want) {
		t.Fatalf("--validate printed:\n%s", out.String())
	}
	for i, w := range want {
		if !strings.HasPrefix(lines[i], w) {
			t.Errorf("line %d: %q, want %q", i, lines[i], w)
		}
	}

	fa = &fakeAgent{info: testInfo()}
	tk = newTestKernel(t, yaml, fa)
	out.Reset()
	if err := validateReport(&out, "kernel.yaml", []byte(yaml), tk.s.Snapshot(), nil, false); err != nil || strings.Contains(out.String(), "warning") {
		t.Fatalf("an agent that names no enforcing policy: %v\n%s", err, out.String())
	}
}
