package ops

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// TestVersionFlag builds both binaries with the version set by the linker, as make build does,
// and runs each with --version: it prints that version on stdout and exits 0 without reading a
// config.
func TestVersionFlag(t *testing.T) {
	dir := t.TempDir()
	const v = "v1.2.3-test"
	ldflags := "-X github.com/policy-engine/policy-engine/kernel.Version=" + v +
		" -X github.com/policy-engine/policy-engine/agent.Version=" + v
	build := exec.Command("go", "build", "-ldflags", ldflags, "-o", dir+"/",
		"github.com/policy-engine/policy-engine/cmd/policy-kernel",
		"github.com/policy-engine/policy-engine/cmd/policy-agent")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	for _, name := range []string{"policy-kernel", "policy-agent"} {
		for _, flag := range []string{"--version", "-version"} {
			cmd := exec.Command(filepath.Join(dir, name), flag, "--config", filepath.Join(dir, "absent.yaml"))
			var stderr strings.Builder
			cmd.Stderr = &stderr
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("%s %s: %v\n%s", name, flag, err, stderr.String())
			}
			want := name + " " + v + " (" + runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH + ")\n"
			if string(out) != want || stderr.Len() != 0 {
				t.Fatalf("%s %s: stdout %q, stderr %q; want stdout %q", name, flag, out, stderr.String(), want)
			}
		}
	}
}
