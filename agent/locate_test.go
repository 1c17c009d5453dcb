package agent

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestPolicySettingsErrorsHaveLines: a policy's refusal of its settings is placed at the line
// of the setting its message names (else of its section), with file, line and key, one problem
// a line, whatever the number of problems.
func TestPolicySettingsErrorsHaveLines(t *testing.T) {
	data := []byte(`agent_core:
  name: a
  socket_path: /tmp/a.sock
  policies:
    config:
      apiKeyAuth:
        keys:
          - user_id: bob
            key_sha256: "nothex"
      jwtValidation:
        issuer: 5
`)
	err := locate("agent.yaml", data, errors.Join(
		&policyConfigError{policy: "apiKeyAuth", err: errors.New("keys[0].key_sha256: must be 64 lowercase hex digits")},
		&policyConfigError{policy: "jwtValidation", err: errors.New("invalid JSON: cannot unmarshal number")},
		&policyConfigError{policy: "nosuch", err: errors.New("no such policy is compiled in")},
		errors.New("something else"),
	))
	want := []string{
		"agent.yaml:9: agent_core.policies.config.apiKeyAuth: keys[0].key_sha256: must be 64 lowercase hex digits",
		"agent.yaml:10: agent_core.policies.config.jwtValidation: invalid JSON: cannot unmarshal number",
		"agent.yaml:5: agent_core.policies.config.nosuch: no such policy is compiled in",
		"agent.yaml: something else",
	}
	if got := strings.Split(err.Error(), "\n"); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("got\n%s\nwant\n%s", err, strings.Join(want, "\n"))
	}
	// A file that does not parse keeps the messages, prefixed with the file.
	if got := locate("bad.yaml", []byte("a: [\n"), &policyConfigError{policy: "x", err: errors.New("e")}).Error(); got != "bad.yaml: agent_core.policies.config.x: e" {
		t.Errorf("unparsable file: %q", got)
	}
}

// TestAgentReportsPolicySettingLines runs the agent's --validate path on a config whose
// apiKeyAuth refuses a key: the problem names the file and the key's line.
func TestAgentReportsPolicySettingLines(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "agent.yaml")
	if err := os.WriteFile(cfg, []byte("agent_core:\n  name: a\n  socket_path: "+filepath.Join(dir, "a.sock")+"\n  policies:\n    config:\n      apiKeyAuth:\n        keys:\n          - key_sha256: \"nothex\"\n            user_id: bob\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	err := Main(t.Context(), []string{"--config", cfg, "--validate"}, &strings.Builder{})
	if err == nil || !strings.HasPrefix(err.Error(), cfg+":8: agent_core.policies.config.apiKeyAuth: keys[0]") {
		t.Fatalf("got %v", err)
	}
}
