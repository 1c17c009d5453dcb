package policyctl

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestExplainWhen: explain shows each entry's condition, an entry the agent skipped, and a
// chain the kernel skipped without calling the agent.
func TestExplainWhen(t *testing.T) {
	dir := t.TempDir()
	k, a := filepath.Join(dir, "k.yaml"), filepath.Join(dir, "a.yaml")
	kernelYAML := `policy_kernel:
  agents:
    - name: a
      socket_path: /unused/a.sock
      timeout_ms: 1000
  route_policies:
    - route_name: /orders
      request_policy_chain:
        - policy: apiKeyAuth
          when: 'request.method != "GET"'
        - policy: allowAll
          when: '"x-trace" in request.headers'
`
	if err := os.WriteFile(k, []byte(kernelYAML), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(a, []byte(explainAgent), 0o600); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) string {
		t.Helper()
		var out, errOut bytes.Buffer
		if code := Main(t.Context(), append([]string{"explain", "--config", k, "--agent-config", a, "--message-timeout", "5s"}, args...), &out, &errOut); code != ExitUpstream {
			t.Fatalf("%v: exit %d\n%s%s", args, code, out.String(), errOut.String())
		}
		return out.String()
	}
	text := run("GET", "/orders")
	if !strings.Contains(text, `when: request.method != "GET"`) || strings.Count(text, "skipped") != 2 || !strings.Contains(text, "the kernel decided, the agent was not called") {
		t.Fatalf("kernel skip:\n%s", text)
	}
	text = run("GET", "/orders", "-H", "X-Trace: 1")
	if !strings.Contains(text, "1. apiKeyAuth") || !strings.Contains(text, "skipped") || !strings.Contains(text, "message: when condition is false") || !strings.Contains(text, "2. allowAll") || strings.Contains(text, "the kernel decided") {
		t.Fatalf("agent skip:\n%s", text)
	}
}
