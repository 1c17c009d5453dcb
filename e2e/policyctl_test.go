package e2e

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

// readmeCommands returns the shell commands of the README's "Try it without Envoy" section that
// start with prefix, continuation lines joined and comments dropped.
func readmeCommands(t *testing.T, prefix string) []string {
	t.Helper()
	data, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	s := string(data)
	i := strings.Index(s, "## Try it without Envoy")
	if i < 0 {
		t.Fatal(`README.md has no "Try it without Envoy" section`)
	}
	s = s[i+3:]
	if j := strings.Index(s, "\n## "); j >= 0 {
		s = s[:j]
	}
	var out []string
	inBlock := false
	cur := ""
	for _, line := range strings.Split(s, "\n") {
		if strings.HasPrefix(line, "```") {
			inBlock = !inBlock
			continue
		}
		if !inBlock {
			continue
		}
		if k := strings.Index(line, " #"); k >= 0 {
			line = line[:k]
		}
		line = strings.TrimSpace(line)
		if strings.HasSuffix(line, `\`) {
			cur += strings.TrimSuffix(line, `\`) + " "
			continue
		}
		cur += line
		if strings.Contains(cur, prefix) {
			out = append(out, cur)
		}
		cur = ""
	}
	return out
}

// shellWords splits a command line as sh would for the README's commands: words, single and
// double quotes, leading NAME=value assignments returned apart.
func shellWords(t *testing.T, line string) (env, args []string) {
	t.Helper()
	var (
		words []string
		cur   strings.Builder
		quote rune
		in    bool
	)
	for _, r := range line {
		switch {
		case quote != 0 && r == quote:
			quote = 0
		case quote != 0:
			cur.WriteRune(r)
		case r == '\'' || r == '"':
			quote, in = r, true
		case r == ' ' || r == '\t':
			if in {
				words = append(words, cur.String())
				cur.Reset()
				in = false
			}
		default:
			cur.WriteRune(r)
			in = true
		}
	}
	if quote != 0 {
		t.Fatalf("unbalanced quote in %q", line)
	}
	if in {
		words = append(words, cur.String())
	}
	for len(words) > 0 && strings.Contains(words[0], "=") && !strings.HasPrefix(words[0], "-") {
		env, words = append(env, words[0]), words[1:]
	}
	return env, words
}

// runCtl runs policyctl and returns its standard output, standard error and exit code.
func runCtl(t *testing.T, bin string, env []string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return stdout.String(), stderr.String(), code
}

// TestPolicyctlQuickStart runs the README's "Try it without Envoy" commands against the real
// binaries on the make-run configs (demo keys), on the test's own address instead of :9001.
func TestPolicyctlQuickStart(t *testing.T) {
	ctl := testenv.Build(t, "github.com/policy-engine/policy-engine/cmd/policyctl")
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: exampleConfig(t, "agent-config.yaml"), KernelYAML: exampleConfig(t, "kernel-config.yaml"),
		AgentEnv: []string{demoKeyEnv}})

	checks := readmeCommands(t, "bin/policyctl check")
	want := []struct {
		code int
		has  []string
	}{
		{1, []string{"local reply 401 (unauthorized)", "www-authenticate: API-Key", `"error":"unauthorized"`}},
		{1, []string{"local reply 403 (forbidden)", `"error":"forbidden"`}},
		{0, []string{"the upstream receives:", "x-api-key: [redacted]", "+ x-user-id: api-client", "+ x-frame-options: DENY", "+ x-content-type-options: nosniff", "\n  200\n"}},
	}
	if len(checks) != len(want) {
		t.Fatalf("the README shows %d policyctl check commands, want %d: %q", len(checks), len(want), checks)
	}
	for i, line := range checks {
		env, words := shellWords(t, line)
		args := append(words[1:], "--kernel", e.KernelAddr)
		out, errOut, code := runCtl(t, ctl, env, args...)
		if code != want[i].code {
			t.Fatalf("%s: exit %d, want %d\n%s%s", line, code, want[i].code, out, errOut)
		}
		for _, s := range want[i].has {
			if !strings.Contains(out, s) {
				t.Errorf("%s: output lacks %q:\n%s", line, s, out)
			}
		}
		for _, secret := range []string{"demo-key-123", "wrong-key"} {
			if strings.Contains(out+errOut, secret) {
				t.Errorf("%s: output shows the credential %q:\n%s", line, secret, out)
			}
		}
	}

	// --json, for machines.
	_, words := shellWords(t, checks[2])
	out, _, code := runCtl(t, ctl, nil, append(words[1:], "--kernel", e.KernelAddr, "--json", "--upstream-body", `{"id":7,"internal_id":"db-1"}`)...)
	var rep struct {
		Outcome  string
		Upstream struct {
			Headers   []struct{ Name, Value string }
			Mutations []struct{ Op, Name, Value string }
		}
		Response struct {
			Status     int
			LocalReply bool `json:"local_reply"`
			Body       string
		}
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil || code != 0 {
		t.Fatalf("--json: exit %d, %v\n%s", code, err, out)
	}
	if rep.Outcome != "upstream" || rep.Response.Status != 200 || rep.Response.LocalReply || rep.Response.Body != `{"id":7}` ||
		len(rep.Upstream.Mutations) != 1 || rep.Upstream.Mutations[0] != (struct{ Op, Name, Value string }{"added", "x-user-id", "api-client"}) {
		t.Fatalf("--json: %+v", rep)
	}

	// A usage error and a kernel that is not there: 2.
	if _, errOut, code := runCtl(t, ctl, nil, "check", "--kernel", e.KernelAddr); code != 2 || !strings.Contains(errOut, "[METHOD] PATH") {
		t.Fatalf("no path: exit %d: %s", code, errOut)
	}
	if _, errOut, code := runCtl(t, ctl, nil, "check", "-H", "X-API-Key", "/api/v1/users", "--kernel", e.KernelAddr); code != 2 || !strings.Contains(errOut, `"Name: value"`) {
		t.Fatalf("bad header: exit %d: %s", code, errOut)
	}
	if _, errOut, code := runCtl(t, ctl, nil, "check", "/api/v1/users", "--kernel", testenv.FreeAddr(t)); code != 2 || !strings.Contains(errOut, "cannot reach the kernel") {
		t.Fatalf("no kernel: exit %d: %s", code, errOut)
	}
	if _, errOut, code := runCtl(t, ctl, nil, "check", "/api/v1/users", "--kernel", "unix://"+filepath.Join(e.Dir, "nothing.sock")); code != 2 || !strings.Contains(errOut, "cannot reach the kernel") {
		t.Fatalf("no kernel socket: exit %d: %s", code, errOut)
	}
}

// TestPolicyctlExplain runs the README's explain command offline on the make-run configs, and
// explains a refusal and a route picked by attribute; no credential is ever printed.
func TestPolicyctlExplain(t *testing.T) {
	ctl := testenv.Build(t, "github.com/policy-engine/policy-engine/cmd/policyctl")
	dir := t.TempDir()
	repl := strings.NewReplacer("{{SOCK}}", filepath.Join(dir, "agent.sock"), "{{DIR}}", dir, "{{AGENT_METRICS}}", "127.0.0.1:0")
	kcfg, acfg := filepath.Join(dir, "kernel-config.yaml"), filepath.Join(dir, "agent-config.yaml")
	for path, name := range map[string]string{kcfg: "kernel-config.yaml", acfg: "agent-config.yaml"} {
		if err := os.WriteFile(path, []byte(repl.Replace(exampleConfig(t, name))), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	lines := slices.DeleteFunc(readmeCommands(t, "bin/policyctl explain"), func(l string) bool { return strings.Contains(l, "--kernel-admin") })
	if len(lines) != 1 {
		t.Fatalf("README explain commands: %q", lines)
	}
	env, words := shellWords(t, strings.NewReplacer("run/kernel-config.yaml", kcfg, "run/agent-config.yaml", acfg).Replace(lines[0]))
	// Under the race detector a first run may be slow: Envoy's patience is not what is tested.
	args := append(words[1:], "--message-timeout", "5s")
	out, errOut, code := runCtl(t, ctl, env, args...)
	if code != 0 {
		t.Fatalf("explain: exit %d\n%s%s", code, out, errOut)
	}
	oneSpace := regexp.MustCompile(` +`).ReplaceAllString(out, " ")
	for _, s := range []string{
		"route: /api/v1/users (picked by path prefix",
		"request chain:\n 1. apiKeyAuth allow (",
		"set header x-user-id: api-client",
		"set state user_id = api-client",
		"\n 2. rateLimit allow (",
		"response chain:\n 1. addSecurityHeaders allow (",
		"set header x-frame-options: DENY",
		"\n 2. responseBodyTransform allow (",
		"x-api-key: [redacted]",
	} {
		if !strings.Contains(oneSpace, s) {
			t.Errorf("explain output lacks %q:\n%s", s, out)
		}
	}
	if strings.Contains(out+errOut, "demo-key-123") {
		t.Fatalf("explain shows the API key:\n%s", out)
	}

	// A token the agent cannot verify on the admin route, picked by attribute: auditLog lets it
	// on, jwtValidation denies, roleCheck and the response chain never run, and the token is
	// never printed.
	token := "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
	out, errOut, code = runCtl(t, ctl, env, "explain", "--config", kcfg, "--agent-config", acfg, "--message-timeout", "5s", "--json",
		"--route", "/api/v1/admin", "POST", "/elsewhere", "-H", "Authorization: "+token)
	var rep struct {
		Outcome  string
		Response struct{ Status int }
		Explain  struct {
			Route, Rule   string
			RequestChain  []struct{ Policy, Outcome string } `json:"request_chain"`
			ResponseChain []struct{ Policy, Outcome string } `json:"response_chain"`
		}
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil || code != 1 {
		t.Fatalf("explain admin: exit %d %v\n%s%s", code, err, out, errOut)
	}
	x := rep.Explain
	if rep.Outcome != "refused" || rep.Response.Status != 401 || x.Route != "/api/v1/admin" || x.Rule != "attribute" ||
		len(x.RequestChain) != 3 || x.RequestChain[0].Outcome != "allow" || x.RequestChain[1].Outcome != "deny" || x.RequestChain[2].Outcome != "not run" ||
		len(x.ResponseChain) != 1 || x.ResponseChain[0].Outcome != "not run" {
		t.Fatalf("explain admin: %+v\n%s", rep, out)
	}
	if strings.Contains(out+errOut, "eyJ") {
		t.Fatalf("explain shows the token:\n%s", out)
	}

	// --kernel without configs: explain says what it needs.
	if _, errOut, code := runCtl(t, ctl, nil, "explain", "--kernel", "127.0.0.1:9001", "/api/v1/users"); code != 2 || !strings.Contains(errOut, "needs the kernel's config (--config)") ||
		!strings.Contains(errOut, "--kernel-admin") {
		t.Fatalf("explain --kernel: exit %d: %s", code, errOut)
	}
}
