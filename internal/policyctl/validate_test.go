package policyctl

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const validateKernel = `policy_kernel:
  agents:
    - name: a
      socket_path: /unused/a.sock
  route_policies:
    - route_name: /api
      request_policy_chain:
        - policy: apiKeyAuth
      response_policy_chain:
        - policy: addSecurityHeaders
`

// TestValidate: policyctl validate checks the kernel config with the agents' policies in its
// own process: 0 and "valid" for good configs; 1 and every problem at file:line for a bad
// kernel config, an agent config that does not load, or two agent configs of one name; 2
// for a usage error.
func TestValidate(t *testing.T) {
	dir := t.TempDir()
	write := func(name, yaml string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	k := write("k.yaml", validateKernel)
	a := write("a.yaml", explainAgent)
	run := func(args ...string) (int, string, string) {
		var out, errOut bytes.Buffer
		code := Main(t.Context(), append([]string{"validate"}, args...), &out, &errOut)
		return code, out.String(), errOut.String()
	}

	if code, out, errOut := run("--config", k, "--agent-config", a); code != exitValid || !strings.Contains(out, k+": valid (version ") || errOut != "" {
		t.Fatalf("good: exit %d\n%s%s", code, out, errOut)
	}

	// apiKeyAuth in the response chain (line 10), and metadata the agent's policy refuses
	// (the entry at line 13).
	bad := write("bad.yaml", strings.Replace(validateKernel, "        - policy: addSecurityHeaders\n",
		"        - policy: apiKeyAuth\n    - route_name: /other\n      request_policy_chain:\n        - policy: apiKeyAuth\n          metadata: {header_name: 'bad name'}\n", 1))
	code, out, errOut := run("--config", bad, "--agent-config", a)
	if code != exitInvalid || strings.Contains(out, "valid") ||
		!strings.Contains(errOut, bad+":10: policy_kernel.route_policies[0].response_policy_chain[0]") ||
		!strings.Contains(errOut, `does not run in the response phase`) ||
		!strings.Contains(errOut, bad+":13: policy_kernel.route_policies[1].request_policy_chain[0]: agent \"a\" cannot run this entry") ||
		!strings.Contains(errOut, `invalid header name "bad name"`) {
		t.Fatalf("bad kernel config: exit %d\n%s%s", code, out, errOut)
	}

	// An agent config that does not load: its problem at its line, and the kernel config's
	// agent named as unchecked.
	badAgent := write("bad-agent.yaml", strings.Replace(explainAgent, "user_id: u", "user_id: u\n      noSuchPolicy: {}", 1))
	code, out, errOut = run("--config", k, "--agent-config", badAgent)
	if code != exitInvalid || !strings.Contains(errOut, badAgent+":") || !strings.Contains(errOut, `no agent config that loads has agent_core.name "a"`) {
		t.Fatalf("bad agent config: exit %d\n%s%s", code, out, errOut)
	}
	code, _, errOut = run("--config", k, "--agent-config", a, "--agent-config", a)
	if code != exitInvalid || !strings.Contains(errOut, `agent_core.name "a": another agent config has this name`) {
		t.Fatalf("two agents of one name: exit %d\n%s", code, errOut)
	}

	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{nil, ExitError, "give the configs: --config kernel.yaml --agent-config agent.yaml"},
		{[]string{"--config", k}, ExitError, "give the configs"},
		{[]string{"--config", k, "--agent-config", a, "extra"}, ExitError, `unexpected arguments: ["extra"]`},
		{[]string{"--nope"}, ExitError, "flag provided but not defined: -nope"},
		{[]string{"-h"}, 0, "usage: policyctl validate"},
		{[]string{"--config", filepath.Join(dir, "none.yaml"), "--agent-config", a}, exitInvalid, "none.yaml"},
	} {
		code, out, errOut := run(c.args...)
		if code != c.code || !strings.Contains(out+errOut, c.want) {
			t.Errorf("%q: exit %d\n%s%s\nwant %d and %q", c.args, code, out, errOut, c.code, c.want)
		}
	}
}
