package agent

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/rs/zerolog"
)

// TestConfigDumpUnresolved checks that the agent's /config shows the policies' settings as
// the file has them: a reference unresolved (the secret it names never appears), a literal
// secret redacted, the rest as set.
func TestConfigDumpUnresolved(t *testing.T) {
	t.Setenv("DUMP_TEST_KEY", "resolved-secret-value")
	dir := t.TempDir()
	path := filepath.Join(dir, "agent.yaml")
	yaml := `agent_core:
  name: dump
  socket_path: /unused.sock
  policies:
    config:
      t.setHeader: {}
      apiKeyAuth:
        keys:
          - key_env: DUMP_TEST_KEY
            user_id: a
          - key: "${env:DUMP_TEST_KEY}"
            user_id: b
          - key: literal-secret
            user_id: c
`
	if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, _, err := LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	e := NewExecutor(logging.New(os.Stderr, "agent", zerolog.ErrorLevel))
	if err := e.Load(cfg.AgentCore, "v9"); err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	b, _ := json.Marshal(e.configDump())
	text := string(b)
	if strings.Contains(text, "resolved-secret-value") || strings.Contains(text, "literal-secret") {
		t.Fatalf("a secret in the dump: %s", text)
	}
	for _, want := range []string{`"config_version":"v9"`, `"key":"${env:DUMP_TEST_KEY}"`, `"key":"[REDACTED]"`, `"name":"apiKeyAuth"`, `"max_chain_duration_ms":1000`} {
		if !strings.Contains(text, want) {
			t.Errorf("dump lacks %s: %s", want, text)
		}
	}
}
