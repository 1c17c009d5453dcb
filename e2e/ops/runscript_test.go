package ops

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

// runScript is one scripts/run.sh (make run) in a process group of its own, with the test's
// binaries and the given environment; the test's end kills the group (by the script's PID).
type runScript struct {
	cmd    *exec.Cmd
	stderr *testenv.SyncBuffer
	done   chan error
}

func startRunScript(t *testing.T, env ...string) *runScript {
	t.Helper()
	kbin, _ := testenv.Binaries(t)
	cmd := exec.Command(filepath.Join(repoRoot, "scripts", "run.sh"))
	cmd.Env = append(os.Environ(), append([]string{"BIN_DIR=" + filepath.Dir(kbin)}, env...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	r := &runScript{cmd: cmd, stderr: &testenv.SyncBuffer{}, done: make(chan error, 1)}
	cmd.Stdout, cmd.Stderr = r.stderr, r.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { r.done <- cmd.Wait() }()
	t.Cleanup(func() { syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) })
	return r
}

// exit waits at most d for the script to end and returns its exit code.
func (r *runScript) exit(t *testing.T, d time.Duration) int {
	t.Helper()
	select {
	case err := <-r.done:
		if err == nil {
			return 0
		}
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		t.Fatal(err)
	case <-time.After(d):
		t.Fatalf("run.sh still running after %v:\n%s", d, r.stderr.String())
	}
	return -1
}

// TestRunScriptFailsWhenAPortIsTaken: make run with its ext_proc port taken exits non-zero,
// after the kernel's own error, and stops the agent it started.
func TestRunScriptFailsWhenAPortIsTaken(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	runDir := t.TempDir()
	r := startRunScript(t, "RUN_DIR="+runDir, "EXTPROC_ADDR="+ln.Addr().String(),
		"METRICS_ADDR="+testenv.FreeAddr(t), "AGENT_METRICS_ADDR="+testenv.FreeAddr(t))
	if code := r.exit(t, 30*time.Second); code == 0 {
		t.Fatalf("exit 0 with the ext_proc port taken:\n%s", r.stderr.String())
	}
	out := r.stderr.String()
	if !strings.Contains(out, "address already in use") || !strings.Contains(out, "policy-kernel stopped with exit status 1") {
		t.Fatalf("the kernel's error is not shown:\n%s", out)
	}
	// The agent was stopped: its socket is gone.
	if _, err := os.Stat(filepath.Join(runDir, "agents", "default.sock")); !os.IsNotExist(err) {
		t.Fatalf("agent socket still there: %v", err)
	}
}

// TestRunScriptFollowsConfigEdits: make run serves on the addresses of its environment; an edit
// of the config the user is told to edit is reloaded; a second make run beside it exits non-zero
// and leaves the first serving; Ctrl-C ends the first with exit 0.
func TestRunScriptFollowsConfigEdits(t *testing.T) {
	configDir, runDir := t.TempDir(), t.TempDir()
	for _, name := range []string{"kernel-config.yaml", "agent-config.yaml"} {
		data, err := os.ReadFile(filepath.Join(repoRoot, "config", name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(configDir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	env := []string{"RUN_DIR=" + runDir, "CONFIG_DIR=" + configDir, "EXTPROC_ADDR=" + testenv.FreeAddr(t),
		"METRICS_ADDR=" + testenv.FreeAddr(t), "AGENT_METRICS_ADDR=" + testenv.FreeAddr(t)}
	r := startRunScript(t, env...)
	testenv.WaitFor(t, 30*time.Second, "both serving", func() bool {
		s := r.stderr.String()
		return strings.Contains(s, "policy-kernel serving") && strings.Contains(s, "policy-agent serving")
	})
	if out := r.stderr.String(); !strings.Contains(out, "edit "+configDir+"/kernel-config.yaml") {
		t.Fatalf("the start does not say which files to edit:\n%s", out)
	}

	kcfg := filepath.Join(configDir, "kernel-config.yaml")
	data, _ := os.ReadFile(kcfg)
	edited := strings.Replace(string(data), "policy_kernel:\n", "policy_kernel:\n  version: edited\n", 1)
	if edited == string(data) {
		t.Fatal("no policy_kernel: line in the example config")
	}
	if err := os.WriteFile(kcfg, []byte(edited), 0o600); err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, 20*time.Second, "the edit reloaded", func() bool {
		for _, l := range strings.Split(r.stderr.String(), "\n") {
			if strings.Contains(l, `"message":"config reloaded"`) && strings.Contains(l, `"config_version":"edited-`) {
				return true
			}
		}
		return false
	})

	second := startRunScript(t, env...)
	if code := second.exit(t, 30*time.Second); code == 0 {
		t.Fatalf("a second make run exited 0:\n%s", second.stderr.String())
	}
	select {
	case err := <-r.done:
		t.Fatalf("the first make run ended (%v) when a second one was started:\n%s", err, r.stderr.String())
	default:
	}

	r.cmd.Process.Signal(syscall.SIGINT)
	if code := r.exit(t, 30*time.Second); code != 0 {
		t.Fatalf("Ctrl-C: exit %d:\n%s", code, r.stderr.String())
	}
}
