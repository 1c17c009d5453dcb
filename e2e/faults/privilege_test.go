package faults

import (
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

// TestLeastPrivilege: the agent's socket is 0600; both binaries' --validate refuse config and
// socket directories that every user may write to; and the shipped agent carries none of the
// misbehaving test policies.
func TestLeastPrivilege(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: twoAgents(400, 500, keyRoutes)})
	fi, err := os.Lstat(e.AgentSock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != fs.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Errorf("agent socket mode %v, want a socket with 0600", fi.Mode())
	}
	t.Logf("reliability: least privilege: agent socket %v", fi.Mode())

	kbin, abin := testenv.Binaries(t)
	validate := func(bin string, args ...string) (string, int) {
		out, err := exec.Command(bin, append([]string{"--validate"}, args...)...).CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return string(out), code
	}
	f := func(name, bin string, mode os.FileMode, dir string, want string, args ...string) {
		t.Helper()
		if err := os.Chmod(dir, mode); err != nil {
			t.Fatal(err)
		}
		defer os.Chmod(dir, 0o700)
		out, code := validate(bin, args...)
		if code != 1 || !strings.Contains(out, want) {
			t.Errorf("%s: exit %d, output:\n%s\nwant %q", name, code, out, want)
		}
		t.Logf("reliability: least privilege: %s → exit %d: %s", name, code, strings.TrimSpace(out))
	}
	kargs := []string{"--config", e.KernelConfig, "--agent-wait", "0"}
	aargs := []string{"--config", e.AgentConfig, "--socket", filepath.Join(e.Dir, "v", "agent.sock")}
	if out, code := validate(kbin, kargs...); code != 0 {
		t.Fatalf("kernel --validate in a private directory: exit %d\n%s", code, out)
	}
	if out, code := validate(abin, aargs...); code != 0 {
		t.Fatalf("agent --validate in a private directory: exit %d\n%s", code, out)
	}
	// The config and the socket share e.Dir here.
	f("kernel, world-writable directory", kbin, 0o777, e.Dir, `config directory "`+e.Dir+`" is writable by every user (mode 0777)`, kargs...)
	f("kernel, sticky world-writable directory", kbin, os.ModeSticky|0o777, e.Dir, `agent "closed": socket directory "`+e.Dir+`" is writable by every user (mode 1777)`, kargs...)
	f("agent, world-writable directory", abin, 0o777, e.Dir, `config directory "`+e.Dir+`" is writable by every user (mode 0777)`, aargs...)
	f("agent, socket directory not made yet", abin, 0o777, e.Dir, `the nearest existing directory above the socket directory "`+filepath.Join(e.Dir, "v")+`"`, aargs...)

	// The test policies never reach the shipped binary.
	out, err := exec.Command("go", "list", "-deps", "github.com/policy-engine/policy-engine/cmd/policy-agent").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	if strings.Contains(string(out), "internal/testpolicies") {
		t.Error("policy-agent depends on internal/testpolicies")
	}
}
