package agent

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestValidateRefusesWorldWritable: --validate refuses a config, a config directory or a socket
// directory that every user may write to, naming the path and its mode.
func TestValidateRefusesWorldWritable(t *testing.T) {
	root := t.TempDir()
	cfgDir, sockDir := filepath.Join(root, "etc"), filepath.Join(root, "run")
	for _, d := range []string{cfgDir, sockDir} {
		if err := os.Mkdir(d, 0o750); err != nil {
			t.Fatal(err)
		}
	}
	cfg := filepath.Join(cfgDir, "agent.yaml")
	sock := filepath.Join(sockDir, "agents", "a.sock")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf("agent_core:\n  name: a\n  socket_path: unix://%s\n", sock)), 0o600); err != nil {
		t.Fatal(err)
	}
	validate := func() (string, error) {
		var out bytes.Buffer
		err := Main(context.Background(), []string{"--config", cfg, "--validate"}, &out)
		return out.String(), err
	}
	if out, err := validate(); err != nil || !strings.Contains(out, "valid (version") {
		t.Fatalf("private directories: %v %s", err, out)
	}
	f := func(p string, m os.FileMode, want string) {
		t.Helper()
		if err := os.Chmod(p, m); err != nil {
			t.Fatal(err)
		}
		defer os.Chmod(p, 0o750)
		out, err := validate()
		if err == nil || !strings.Contains(err.Error(), want) || strings.Contains(out, "valid (version") {
			t.Errorf("mode %v on %s: %v %s, want %q", m, p, err, out, want)
		}
	}
	f(cfgDir, 0o777, fmt.Sprintf("config directory %q is writable by every user (mode 0777)", cfgDir))
	f(cfg, 0o666, fmt.Sprintf("config file %q is writable by every user (mode 0666)", cfg))
	f(sockDir, os.ModeSticky|0o777, fmt.Sprintf("%q, the nearest existing directory above the socket directory %q, is writable by every user (mode 1777)", sockDir, filepath.Dir(sock)))
}
