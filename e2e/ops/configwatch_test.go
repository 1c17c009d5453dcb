package ops

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// agentFileKeyYAML adds to agentYAML a key read from a secret file (%s is its path), for
// another user.
const agentFileKeyYAML = `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  policies:
    config:
      apiKeyAuth:
        keys:
          - key_sha256: "a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873"  # demo-key-123
            user_id: demo-user
          - key: "${file:%s}"
            user_id: file-user
  observability:
    metrics_address: "{{AGENT_METRICS}}"
`

// TestConfigFollowsKubeletSwap mounts both configs the way the kubelet mounts a ConfigMap and
// a Secret (versioned directories, a "..data" symlink swapped by rename, the files symlinks
// through it) and changes them without any signal, while requests flow: the kernel follows its
// config, a half-written config is refused and never answers a request, the whole file then
// loads, and the agent follows the secret file its config names. No request fails.
func TestConfigFollowsKubeletSwap(t *testing.T) {
	kbin, abin := testenv.Binaries(t)
	dir := t.TempDir()
	e := &testenv.Env{
		Dir: dir, AgentSock: filepath.Join(dir, "agent.sock"), AgentConfig: filepath.Join(dir, "agent.yaml"),
		KernelAddr: testenv.FreeAddr(t), MetricsAddr: testenv.FreeAddr(t), AgentMetrics: testenv.FreeAddr(t),
	}
	secret := testenv.NewKubeDir(t, filepath.Join(dir, "secret"), map[string]string{"api-key": "key-a\n"})
	e.WriteConfig(t, e.AgentConfig, fmt.Sprintf(agentFileKeyYAML, secret.Path("api-key")))
	cm := testenv.NewKubeDir(t, filepath.Join(dir, "config"), map[string]string{"kernel-config.yaml": e.Expand(fmt.Sprintf(kernelYAML, "v1"))})
	e.KernelConfig = cm.Path("kernel-config.yaml")

	const every = "100ms"
	e.Agent = testenv.Start(t, abin, nil, "--config", e.AgentConfig, "--watch-interval", every)
	testenv.WaitDial(t, e.Agent, "unix", e.AgentSock)
	e.Kernel = testenv.Start(t, kbin, nil, "--config", e.KernelConfig, "--listen", e.KernelAddr,
		"--metrics-listen", e.MetricsAddr, "--admin-listen", "127.0.0.1:0", "--agent-wait", "5s", "--watch-interval", every)
	testenv.WaitFor(t, testenv.StartTimeout, "the kernel to be ready", func() bool { code, _ := e.Get(t, "/health/ready"); return code == 200 })

	c := e.Dial(t, envoyConfig)
	tr := startTraffic(t, c, 4, []string{"v1", "v2", "v3"})
	defer tr.stop()
	testenv.WaitFor(t, 10*time.Second, "traffic on v1", func() bool { return tr.count("v1") >= 100 })

	// The kubelet's swap.
	cm.Update(t, map[string]string{"kernel-config.yaml": e.Expand(fmt.Sprintf(kernelYAML, "v2"))})
	testenv.WaitFor(t, 10*time.Second, "traffic on v2", func() bool { return tr.count("v2") >= 100 })

	// A file written in place in two steps: the first half (cut inside a key) is refused and
	// kept out; the rest completes it, and it loads.
	full := e.Expand(fmt.Sprintf(kernelYAML, "v3"))
	cut := strings.Index(full, "socket_path") + len("socket_pa")
	target, err := filepath.EvalSymlinks(e.KernelConfig)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(target, []byte(full[:cut]), 0o644); err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, 10*time.Second, "the half-written file to be refused", func() bool {
		return strings.Contains(e.Kernel.Output(), "config reload failed; keeping the previous config")
	})
	before := tr.count("v2")
	testenv.WaitFor(t, 10*time.Second, "traffic on v2 after the refusal", func() bool { return tr.count("v2") >= before+50 })
	if tr.count("v3") != 0 {
		t.Fatal("a half-written config answered requests")
	}
	fh, err := os.OpenFile(target, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fh.WriteString(full[cut:]); err != nil {
		t.Fatal(err)
	}
	fh.Close()
	testenv.WaitFor(t, 10*time.Second, "traffic on v3", func() bool { return tr.count("v3") >= 100 })

	// The agent follows the secret file its config names.
	status := func(key string) int {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		r, err := c.Do(ctx, &envoytest.Request{Path: "/api/v1/users", Headers: [][2]string{{"x-api-key", key}},
			Attributes: map[string]string{"xds.route_name": "/api/v1/users"}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		return r.Status
	}
	if status("key-a") != 200 || status("key-b") != 403 {
		t.Fatal("before the secret changed: key-a must pass and key-b not")
	}
	secret.Update(t, map[string]string{"api-key": "key-b\n"})
	testenv.WaitFor(t, 10*time.Second, "the agent to take the new secret", func() bool { return status("key-b") == 200 })
	if status("key-a") != 403 {
		t.Fatal("the old secret still passes")
	}
	// SIGHUP goes the same way: nothing changed since, so nothing is reloaded.
	e.Kernel.Reload(t, "config unchanged; reload skipped")
	e.Agent.Reload(t, "config unchanged; reload skipped")
	tr.finish(t)

	klog, alog := e.Kernel.Output(), e.Agent.Output()
	if n := strings.Count(klog, "config reload failed"); n != 1 {
		t.Errorf("the kernel refused %d reloads, want 1 (the half-written file):\n%s", n, klog)
	}
	if !strings.Contains(klog, `kernel-config.yaml:`) || !strings.Contains(klog, "config file changed; reloading") {
		t.Errorf("the kernel log does not name the file and the change:\n%s", klog)
	}
	if !strings.Contains(alog, `"files_changed":["`+secret.Path("api-key")+`"]`) {
		t.Errorf("the agent log does not name the secret file that changed:\n%s", alog)
	}
	if strings.Contains(alog, "key-a") || strings.Contains(alog, "key-b") {
		t.Errorf("the agent logged a secret:\n%s", alog)
	}
	_, metrics := e.Get(t, "/metrics")
	for _, want := range []string{
		`policy_kernel_config_reload_total{status="success"} 2`,
		`policy_kernel_config_reload_total{status="failure"} 1`,
		`policy_kernel_config_info{version="v3-`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("kernel metrics lack %s", want)
		}
	}
	_, ametrics := e.GetAgent(t, "/metrics")
	if !strings.Contains(ametrics, `policy_agent_config_reload_total{status="success"} 1`) {
		t.Errorf("agent metrics: want one successful reload:\n%s", ametrics)
	}
	t.Logf("answers: v1 %d, v2 %d, v3 %d", tr.count("v1"), tr.count("v2"), tr.count("v3"))
}

// jwksOf is a JWK Set with one new P-256 key.
func jwksOf(t *testing.T, kid string) string {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	point, err := k.PublicKey.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	b64 := base64.RawURLEncoding.EncodeToString
	return fmt.Sprintf(`{"keys":[{"kty":"EC","crv":"P-256","kid":%q,"use":"sig","x":%q,"y":%q}]}`, kid, b64(point[1:33]), b64(point[33:]))
}

// TestAgentFollowsJWKSFile: the agent reloads when the JWK Set file its config names changes
// (a Secret updated by the kubelet), refuses a key set it cannot read and keeps the one in
// force, and takes the next good one.
func TestAgentFollowsJWKSFile(t *testing.T) {
	_, abin := testenv.Binaries(t)
	dir := t.TempDir()
	keys := testenv.NewKubeDir(t, filepath.Join(dir, "keys"), map[string]string{"jwks.json": jwksOf(t, "k1")})
	sock, cfg, metrics := filepath.Join(dir, "agent.sock"), filepath.Join(dir, "agent.yaml"), testenv.FreeAddr(t)
	yaml := fmt.Sprintf(`agent_core:
  name: default-agent
  socket_path: %q
  policies:
    config:
      jwtValidation:
        issuer: https://issuer.example
        jwks_file: %q
  observability:
    metrics_address: %q
`, sock, keys.Path("jwks.json"), metrics)
	if err := os.WriteFile(cfg, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	agent := testenv.Start(t, abin, nil, "--config", cfg, "--watch-interval", "100ms")
	testenv.WaitDial(t, agent, "unix", sock)

	keys.Update(t, map[string]string{"jwks.json": jwksOf(t, "k2")})
	testenv.WaitFor(t, 10*time.Second, "the reload for the new key set", func() bool {
		return strings.Contains(agent.Output(), `"files_changed":["`+keys.Path("jwks.json")+`"]`)
	})
	keys.Update(t, map[string]string{"jwks.json": `{"keys":[{"kty":"EC"`})
	testenv.WaitFor(t, 10*time.Second, "the broken key set to be refused", func() bool {
		return strings.Contains(agent.Output(), "config reload failed; keeping the previous config")
	})
	keys.Update(t, map[string]string{"jwks.json": jwksOf(t, "k3")})
	testenv.WaitFor(t, 10*time.Second, "the next good key set", func() bool {
		return strings.Count(agent.Output(), `"files_changed":["`+keys.Path("jwks.json")+`"]`) == 2
	})
	_, m := testenv.HTTPGet("http://" + metrics + "/metrics")
	for _, want := range []string{
		`policy_agent_config_reload_total{status="success"} 2`,
		`policy_agent_config_reload_total{status="failure"} 1`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("agent metrics lack %s:\n%s", want, agent.Output())
		}
	}
	if !strings.Contains(agent.Output(), "jwks_file") {
		t.Errorf("the refusal does not name the setting:\n%s", agent.Output())
	}
}
