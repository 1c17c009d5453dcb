package faults

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

// TestLockdownPlaintextKeyWarned: an API key written in clear in the agent's config is accepted
// but warned about, by --validate and at load, naming the entry by index and never the key; a
// ${file:...} reference is not, and allow_plaintext_keys: true silences the warning.
func TestLockdownPlaintextKeyWarned(t *testing.T) {
	_, abin := testenv.Binaries(t)
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "key")
	if err := os.WriteFile(keyFile, []byte("FILE-KEY-SECRET\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	const warning = "API keys written in clear in the config file"
	sock := filepath.Join(dir, "a.sock")
	cfg := func(keys string) string {
		return `agent_core:
  name: default-agent
  socket_path: "` + sock + `"
  policies:
    config:
      apiKeyAuth:
` + keys
	}
	validate := func(name, yaml string) string {
		t.Helper()
		path := filepath.Join(dir, name+".yaml")
		if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(abin, "--validate", "--config", path).CombinedOutput()
		if err != nil {
			t.Fatalf("%s: --validate: %v\n%s", name, err, out)
		}
		if strings.Contains(string(out), "CLEAR-KEY") || strings.Contains(string(out), "FILE-KEY") {
			t.Fatalf("%s: a key in the output:\n%s", name, out)
		}
		return string(out)
	}
	clear := "        keys:\n          - {key_sha256: \"" + strings.Repeat("a", 64) + "\", user_id: a}\n          - {key: CLEAR-KEY-1, user_id: b}\n"
	if out := validate("clear", cfg(clear)); !strings.Contains(out, warning) || !strings.Contains(out, `"keys":"keys[1]"`) {
		t.Fatalf("a key in clear: no warning naming keys[1]:\n%s", out)
	}
	if out := validate("file", cfg("        keys: [{key: \"${file:"+keyFile+"}\", user_id: a}]\n")); strings.Contains(out, warning) {
		t.Fatalf("a ${file:...} reference warned about:\n%s", out)
	}
	if out := validate("optin", cfg("        allow_plaintext_keys: true\n"+clear)); strings.Contains(out, warning) {
		t.Fatalf("allow_plaintext_keys did not silence the warning:\n%s", out)
	}

	sock = "{{SOCK}}"
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: cfg(clear), KernelYAML: lockdownSecretKernelYAML})
	testenv.WaitFor(t, testenv.StartTimeout, "the warning at load", func() bool { return strings.Contains(e.Agent.Output(), warning) })
	if strings.Contains(e.Agent.Output(), "CLEAR-KEY") {
		t.Fatalf("the agent's log holds a key:\n%s", e.Agent.Output())
	}
}
