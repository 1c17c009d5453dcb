package faults

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

// lockdownSecretAgentYAML references the API key by ${file:...}; %s is the file.
const lockdownSecretAgentYAML = `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  policies:
    config:
      apiKeyAuth:
        keys: [{key: "${file:%s}", user_id: file-user}]
`

const lockdownSecretKernelYAML = `policy_kernel:
  agents:
    - name: a
      socket_path: "{{SOCK}}"
      timeout_ms: 150
      health_check_interval_ms: 200
  route_policies:
    - route_name: /key
      request_policy_chain: [{policy: apiKeyAuth}]
`

// TestLockdownSecretFileRefused: a ${file:...} reference to a device that never ends
// (/dev/zero), a FIFO nobody writes, a directory or a file over the 1 MiB cap fails the
// agent's load at once with exit 1 and a message naming the reference, never content; on a
// reload the old config stays in force.
func TestLockdownSecretFileRefused(t *testing.T) {
	_, abin := testenv.Binaries(t)
	dir := t.TempDir()
	good := filepath.Join(dir, "good-key")
	if err := os.WriteFile(good, []byte("file-key-GOODSECRET\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	big := filepath.Join(dir, "big")
	if err := os.WriteFile(big, []byte(strings.Repeat("BIGSECRET", 1<<17)), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct{ name, path, reason string }{
		{"device", "/dev/zero", "not a regular file (a character device)"},
		{"fifo", fifo, "not a regular file (a FIFO)"},
		{"directory", dir, "not a regular file (a directory)"},
		{"over the cap", big, "larger than 1048576 bytes"},
	}
	for _, c := range cases {
		t.Run("load/"+c.name, func(t *testing.T) {
			cfg := filepath.Join(t.TempDir(), "agent.yaml")
			yaml := strings.NewReplacer("{{SOCK}}", filepath.Join(filepath.Dir(cfg), "a.sock")).Replace(lockdownSecretAgentYAML)
			if err := os.WriteFile(cfg, []byte(strings.Replace(yaml, "%s", c.path, 1)), 0o600); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			start := time.Now()
			out, err := exec.CommandContext(ctx, abin, "--config", cfg).CombinedOutput()
			var ee *exec.ExitError
			if ctx.Err() != nil || !errors.As(err, &ee) || ee.ExitCode() != 1 {
				t.Fatalf("agent with ${file:%s}: %v after %v (want exit 1 at once)\n%.2000s", c.path, err, time.Since(start), out)
			}
			want := "${file:" + c.path + "}: " + c.path + ": " + c.reason
			if !strings.Contains(string(out), want) || strings.Contains(string(out), "BIGSECRET") {
				t.Fatalf("output lacks %q or holds content:\n%.2000s", want, out)
			}
		})
	}

	e := testenv.StartEnv(t, testenv.Options{
		AgentYAML:  strings.Replace(lockdownSecretAgentYAML, "%s", good, 1),
		KernelYAML: lockdownSecretKernelYAML,
	})
	c := e.Dial(t, envoyConfig)
	check := func(when string) {
		t.Helper()
		if s := play(c, "/key", request("/key", [2]string{"x-api-key", "file-key-GOODSECRET"})); s.outcome() != "upstream" {
			t.Fatalf("%s: the key from the file answers %s", when, s.outcome())
		}
	}
	check("start")
	for _, cs := range cases {
		e.WriteConfig(t, e.AgentConfig, strings.Replace(lockdownSecretAgentYAML, "%s", cs.path, 1))
		line := e.Agent.Reload(t, "config reload failed")
		_ = line
		if !strings.Contains(e.Agent.Output(), "${file:"+cs.path+"}: "+cs.path+": "+cs.reason) {
			t.Fatalf("reload with %s: no clear error in\n%s", cs.name, e.Agent.Output())
		}
		check("after a reload with " + cs.name)
	}
	if strings.Contains(e.Agent.Output(), "BIGSECRET") || strings.Contains(e.Agent.Output(), "GOODSECRET") {
		t.Fatal("the agent's log holds a secret file's content")
	}
}
