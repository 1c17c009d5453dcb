package ops

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// runValidate runs bin --validate and returns its exit code and output.
func runValidate(t *testing.T, bin string, args ...string) (int, string) {
	t.Helper()
	out, err := exec.Command(bin, append([]string{"--validate"}, args...)...).CombinedOutput()
	if err == nil {
		return 0, string(out)
	}
	ee, ok := err.(*exec.ExitError)
	if !ok {
		t.Fatal(err)
	}
	return ee.ExitCode(), string(out)
}

// TestValidate runs both binaries with --validate: exit 0 on a good config, exit 1 and every
// problem at once, each with file, line and key, on a bad one; the kernel's problems include
// chain metadata that breaks the schema its agent publishes.
func TestValidate(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: fmt.Sprintf(kernelYAML, "v")})
	kbin, abin := testenv.Binaries(t)
	if code, out := runValidate(t, kbin, "--config", e.KernelConfig); code != 0 || !strings.Contains(out, "valid (version v-") {
		t.Fatalf("good kernel config: %d %s", code, out)
	}
	if code, out := runValidate(t, abin, "--config", e.AgentConfig); code != 0 || !strings.Contains(out, "valid (version") {
		t.Fatalf("good agent config: %d %s", code, out)
	}

	bad := filepath.Join(e.Dir, "bad-kernel.yaml")
	e.WriteConfig(t, bad, `policy_kernel:
  server:
    port: 70000
    drain_delay_ms: -5
  agents:
    - name: default-agent
      socket_path: "{{SOCK}}"
  route_policies:
    - route_name: /a
      request_policy_chain:
        - policy: apiKeyAuth
          metadata:
            required: maybe
            header_nam: X-Key
        - policy: noSuchPolicy
      response_policy_chain:
        - policy: apiKeyAuth
  observability:
    log_level: loud
`)
	code, out := runValidate(t, kbin, "--config", bad)
	if code != 1 {
		t.Fatalf("bad kernel config: exit %d\n%s", code, out)
	}
	for _, want := range []string{
		"bad-kernel.yaml:3: policy_kernel.server.port: must be from 0 to 65535, got 70000",
		"bad-kernel.yaml:4: policy_kernel.server.drain_delay_ms: must not be negative, got -5",
		"bad-kernel.yaml:19: policy_kernel.observability.log_level: unknown log level \"loud\"",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("kernel --validate lacks %q:\n%s", want, out)
		}
	}
	// The file's own problems come first; fixed, the chains are checked against the agent.
	fixed := strings.NewReplacer("port: 70000", "port: 9001", "drain_delay_ms: -5", "drain_delay_ms: 5", "log_level: loud", "log_level: info")
	b, _ := os.ReadFile(bad)
	os.WriteFile(bad, []byte(fixed.Replace(string(b))), 0o600)
	code, out = runValidate(t, kbin, "--config", bad)
	if code != 1 {
		t.Fatalf("bad chains: exit %d\n%s", code, out)
	}
	for _, want := range []string{
		`bad-kernel.yaml:13: policy_kernel.route_policies[0].request_policy_chain[0].metadata.required: policy "apiKeyAuth": metadata.required: got string, want boolean`,
		`bad-kernel.yaml:14: policy_kernel.route_policies[0].request_policy_chain[0].metadata.header_nam: policy "apiKeyAuth": metadata.header_nam: unknown key`,
		`bad-kernel.yaml:15: policy_kernel.route_policies[0].request_policy_chain[1].policy: policy "noSuchPolicy" is not supported by agent "default-agent"`,
		`bad-kernel.yaml:17: policy_kernel.route_policies[0].response_policy_chain[0].policy: policy "apiKeyAuth" does not run in the response phase`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("kernel --validate lacks %q:\n%s", want, out)
		}
	}

	badAgent := filepath.Join(e.Dir, "bad-agent.yaml")
	e.WriteConfig(t, badAgent, `agent_core:
  name: ""
  socket_path: "{{SOCK}}"
  server:
    request_timeout_ms: -1
  observability:
    log_level: chatty
    tracing:
      enabled: true
  resource_limits:
    max_body_size_bytes: big
`)
	code, out = runValidate(t, abin, "--config", badAgent)
	if code != 1 {
		t.Fatalf("bad agent config: exit %d\n%s", code, out)
	}
	for _, want := range []string{
		`bad-agent.yaml:11: agent_core.resource_limits.max_body_size_bytes: want an integer, got "big"`,
		`bad-agent.yaml:2: agent_core.name: minLength`,
		`bad-agent.yaml:7: agent_core.observability.log_level: value must be one of`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("agent --validate lacks %q:\n%s", want, out)
		}
	}
}

// TestSecretsFromFileAndEnv keys apiKeyAuth from a file and from an environment variable
// through secret references in the agent's config: both keys work, and neither appears in
// any log, even when a reference cannot be resolved.
func TestSecretsFromFileAndEnv(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "api-key")
	if err := os.WriteFile(keyFile, []byte("file-secret-key\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	agentCfg := `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  policies:
    config:
      apiKeyAuth:
        keys:
          - key: "${file:` + keyFile + `}"
            user_id: demo-user
          - key: "${env:OPS_ENV_SECRET}"
            user_id: demo-user
  observability:
    metrics_address: "{{AGENT_METRICS}}"
`
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentCfg, KernelYAML: fmt.Sprintf(kernelYAML, "s"), AgentEnv: []string{"OPS_ENV_SECRET=env-secret-key"}})
	c := e.Dial(t, envoyConfig)
	for key, want := range map[string]int{"file-secret-key": 200, "env-secret-key": 200, "${env:OPS_ENV_SECRET}": 403} {
		r, err := c.Do(t.Context(), &envoytest.Request{Path: "/api/v1/users", Headers: [][2]string{{"x-api-key", key}}}, nil)
		if err != nil || r.Status != want {
			t.Fatalf("key %q: %v %v, want %d", key, r, err, want)
		}
	}
	// A reload whose reference cannot be resolved is refused and names the reference.
	os.Remove(keyFile)
	e.WriteConfig(t, e.AgentConfig, agentCfg+"  version: v2\n")
	e.Agent.Reload(t, "config reload failed")
	logs := e.Agent.Logs.String() + e.Kernel.Logs.String()
	if !strings.Contains(logs, "${file:"+keyFile+"}") {
		t.Fatalf("the failure does not name the reference:\n%s", logs)
	}
	if strings.Contains(logs, "file-secret-key") || strings.Contains(logs, "env-secret-key") {
		t.Fatal("a secret reached a log")
	}
	if r, _ := c.Do(t.Context(), &envoytest.Request{Path: "/api/v1/users", Headers: [][2]string{{"x-api-key", "file-secret-key"}}}, nil); r.Status != 200 {
		t.Fatalf("the key from the file stopped working after a refused reload: %d", r.Status)
	}
}
