package kernel

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"
)

// TestStartRefusesWorldWritable: the kernel refuses to start, not only under --validate, on a
// config directory or an agent socket directory that every user may write to.
func TestStartRefusesWorldWritable(t *testing.T) {
	f := func(name string, dirOf func(cfgDir, sockDir string) string, want string) {
		t.Helper()
		cfg, cfgDir, sockDir := permFixture(t)
		if err := os.Chmod(dirOf(cfgDir, sockDir), 0o777); err != nil {
			t.Fatal(err)
		}
		var out bytes.Buffer
		err := Main(context.Background(), []string{"--config", cfg, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--agent-wait", "0"}, &out)
		if err == nil || !strings.Contains(err.Error(), strings.NewReplacer("{{CFG}}", cfgDir, "{{SOCK}}", sockDir).Replace(want)) {
			t.Errorf("%s: %v, want %q", name, err, want)
		}
		if strings.Contains(out.String(), "policy-kernel serving") {
			t.Errorf("%s: served:\n%s", name, out.String())
		}
	}
	f("config directory", func(cfg, _ string) string { return cfg }, `config directory "{{CFG}}" is writable by every user (mode 0777)`)
	f("socket directory", func(_, sock string) string { return sock }, `socket directory "{{SOCK}}" is writable by every user (mode 0777)`)
}
