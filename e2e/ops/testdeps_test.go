package ops

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestTestDepsNamesWhatIsMissing runs scripts/test-deps.sh (make test's first step) where
// nothing but the shell and Go can be found, so no apt-get either: it installs nothing, says in
// one line what to install, and exits 1; with everything found it says nothing and exits 0.
func TestTestDepsNamesWhatIsMissing(t *testing.T) {
	bin := t.TempDir()
	link := func(name string) {
		t.Helper()
		p, err := exec.LookPath(name)
		if err != nil {
			t.Skipf("%s not found", name)
		}
		if err := os.Symlink(p, filepath.Join(bin, name)); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"bash", "go", "id"} {
		link(name)
	}
	run := func() (int, string) {
		cmd := exec.Command(filepath.Join(repoRoot, "scripts", "test-deps.sh"))
		cmd.Env = append(os.Environ(), "PATH="+bin, "CC=cc-for-this-test")
		out, err := cmd.CombinedOutput()
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode(), string(out)
		} else if err != nil {
			t.Fatal(err)
		}
		return 0, string(out)
	}
	code, out := run()
	if code != 1 || strings.Count(out, "\n") != 1 {
		t.Fatalf("exit %d, want 1 and one line:\n%s", code, out)
	}
	for _, want := range []string{"redis-server", "supervisord (Debian: supervisor)", "promtool (Debian: prometheus)", "a C compiler for go test -race"} {
		if !strings.Contains(out, want) {
			t.Errorf("%q not named: %s", want, out)
		}
	}
	// With every one of them found, nothing to say.
	for _, name := range []string{"redis-server", "supervisord", "promtool"} {
		link(name)
	}
	if err := os.WriteFile(filepath.Join(bin, "cc-for-this-test"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if code, out := run(); code != 0 || out != "" {
		t.Fatalf("everything there: exit %d: %s", code, out)
	}
}
