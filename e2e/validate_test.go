package e2e

import (
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

// TestPolicyctlValidate checks the shipped configs offline with the real policyctl: no agent
// runs, no socket is opened, nothing waits; a bad entry and a misspelled policy name are each
// named at their file:line; policy-kernel --agent-config points at policyctl validate.
func TestPolicyctlValidate(t *testing.T) {
	ctl := testenv.Build(t, "github.com/policy-engine/policy-engine/cmd/policyctl")
	kbin, _ := testenv.Binaries(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "agent.sock")
	repl := strings.NewReplacer("{{SOCK}}", sock, "{{DIR}}", dir, "{{AGENT_METRICS}}", "127.0.0.1:0")
	kernelYAML := repl.Replace(exampleConfig(t, "kernel-config.yaml"))
	kcfg, acfg := filepath.Join(dir, "kernel-config.yaml"), filepath.Join(dir, "agent-config.yaml")
	write := func(path, data string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(kcfg, kernelYAML)
	write(acfg, repl.Replace(exampleConfig(t, "agent-config.yaml")))
	env := []string{demoKeyEnv}

	start := time.Now()
	out, errOut, code := runCtl(t, ctl, env, "validate", "--config", kcfg, "--agent-config", acfg)
	took := time.Since(start)
	if code != 0 || !strings.Contains(out, kcfg+": valid (version ") {
		t.Fatalf("good configs: exit %d\n%s%s", code, out, errOut)
	}
	// The kernel waits up to 10 s for an agent that is not there; offline, nothing is waited
	// for and no socket is made.
	if took > 5*time.Second {
		t.Errorf("validate took %v", took)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("the agent socket exists: %v", err)
	}
	t.Logf("policyctl validate of the example configs: %v", took)

	// A bad setting and a misspelled policy, each at its line; both reported in one run.
	lines := strings.Split(kernelYAML, "\n")
	var rpsLine, policyLine int
	for i, l := range lines {
		switch {
		case strings.Contains(l, "requests_per_second: 100"):
			lines[i] = strings.Replace(l, "100", `"fast"`, 1)
			rpsLine = i + 1
		case strings.Contains(l, `policy: "roleCheck"`):
			lines[i] = strings.Replace(l, "roleCheck", "roleChek", 1)
			policyLine = i + 1
		}
	}
	if rpsLine == 0 || policyLine == 0 {
		t.Fatal("the example kernel config changed: no rateLimit or roleCheck entry")
	}
	bad := filepath.Join(dir, "bad.yaml")
	write(bad, strings.Join(lines, "\n"))
	out, errOut, code = runCtl(t, ctl, env, "validate", "--config", bad, "--agent-config", acfg)
	if code != 1 {
		t.Fatalf("bad config: exit %d\n%s%s", code, out, errOut)
	}
	for _, want := range []string{
		bad + ":" + itoa(rpsLine) + ": policy_kernel.route_policies[0].request_policy_chain[1].metadata.requests_per_second",
		bad + ":" + itoa(policyLine) + ": policy_kernel.route_policies[1].request_policy_chain[2].policy",
		`"roleChek"`,
	} {
		if !strings.Contains(errOut, want) {
			t.Errorf("bad config: the report lacks %q:\n%s", want, errOut)
		}
	}

	// An agent config with a problem of its own, and a kernel config whose agent has no agent
	// config: both named.
	badAgent := filepath.Join(dir, "bad-agent.yaml")
	write(badAgent, strings.Replace(repl.Replace(exampleConfig(t, "agent-config.yaml")), `name: "default-agent"`, `name: "other-agent"`, 1))
	_, errOut, code = runCtl(t, ctl, env, "validate", "--config", kcfg, "--agent-config", badAgent)
	if code != 1 || !strings.Contains(errOut, `policy_kernel.agents[0].name: no agent config that loads has agent_core.name "default-agent"`) ||
		!strings.Contains(errOut, `agent_core.name "other-agent", which no agent of policy_kernel.agents is named`) {
		t.Fatalf("agent name mismatch: exit %d\n%s", code, errOut)
	}
	_, errOut, code = runCtl(t, ctl, nil, "validate", "--config", kcfg, "--agent-config", acfg)
	if code != 1 || !regexp.MustCompile(regexp.QuoteMeta(acfg)+`:\d+: agent_core.policies.config.apiKeyAuth: keys\[0\].key_sha256: secret \$\{env:POLICY_ENGINE_API_KEY_SHA256\}`).MatchString(errOut) {
		t.Fatalf("agent config without its secret: exit %d\n%s", code, errOut)
	}

	// Usage: 2.
	if _, errOut, code := runCtl(t, ctl, nil, "validate", "--config", kcfg); code != 2 || !strings.Contains(errOut, "--agent-config") {
		t.Fatalf("no agent config: exit %d: %s", code, errOut)
	}
	// The kernel binary does not carry the policies: it says where offline validation is.
	_, errOut, code = runCtl(t, kbin, nil, "--config", kcfg, "--validate", "--agent-config", acfg)
	if code == 0 || !strings.Contains(errOut, "policyctl validate --config "+kcfg+" --agent-config "+acfg) {
		t.Fatalf("policy-kernel --agent-config: exit %d: %s", code, errOut)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }
