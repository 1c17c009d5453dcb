package kernel

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestValidateRefusesWorldWritable: --validate refuses a config, a config directory or an agent
// socket directory that every user may write to, naming the path and its mode.
func TestValidateRefusesWorldWritable(t *testing.T) {
	f := func(name string, setup func(cfgDir, sockDir string), want ...string) {
		t.Helper()
		cfg, cfgDir, sockDir := permFixture(t)
		setup(cfgDir, sockDir)
		var out bytes.Buffer
		err := Main(context.Background(), []string{"--config", cfg, "--validate", "--agent-wait", "0"}, &out)
		// No agent runs here, so --validate always fails for that; the permissions are what
		// this test looks at.
		if len(want) == 0 {
			if err == nil || strings.Contains(err.Error(), "writable") || !strings.Contains(err.Error(), "did not answer") {
				t.Errorf("%s: %v %s", name, err, out.String())
			}
			return
		}
		if err == nil {
			t.Errorf("%s: accepted:\n%s", name, out.String())
			return
		}
		for _, w := range want {
			if !strings.Contains(err.Error(), strings.NewReplacer("{{CFG}}", cfgDir, "{{SOCK}}", sockDir).Replace(w)) {
				t.Errorf("%s: %v\nwant %q", name, err, w)
			}
		}
		if strings.Contains(out.String(), "valid (version") {
			t.Errorf("%s: also reported valid", name)
		}
	}
	chmod := func(p string, m os.FileMode) {
		if err := os.Chmod(p, m); err != nil {
			t.Fatal(err)
		}
	}
	f("private", func(string, string) {})
	f("config directory", func(cfg, _ string) { chmod(cfg, 0o777) }, `config directory "{{CFG}}" is writable by every user (mode 0777)`)
	f("config file", func(cfg, _ string) { chmod(filepath.Join(cfg, "kernel.yaml"), 0o646) }, `config file "{{CFG}}/kernel.yaml" is writable by every user (mode 0646)`)
	f("socket directory with sticky bit", func(_, sock string) { chmod(sock, os.ModeSticky|0o777) }, `agent "default-agent": socket directory "{{SOCK}}" is writable by every user (mode 1777)`)
	f("socket directory not made yet", func(_, sock string) { chmod(filepath.Dir(sock), 0o777); os.Remove(sock) }, `nearest existing directory above the socket directory "{{SOCK}}"`)
}

// permFixture writes a kernel config into a config directory whose agent socket lies in a
// socket directory, both private, for the permission tests to loosen.
func permFixture(t *testing.T) (cfg, cfgDir, sockDir string) {
	t.Helper()
	root := t.TempDir()
	cfgDir, sockDir = filepath.Join(root, "etc"), filepath.Join(root, "run")
	for _, d := range []string{cfgDir, sockDir} {
		if err := os.Mkdir(d, 0o750); err != nil {
			t.Fatal(err)
		}
	}
	cfg = filepath.Join(cfgDir, "kernel.yaml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(mainKernelYAML, filepath.Join(sockDir, "a.sock"), "")), 0o600); err != nil {
		t.Fatal(err)
	}
	return cfg, cfgDir, sockDir
}
