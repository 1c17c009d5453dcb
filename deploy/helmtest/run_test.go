package helmtest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"sigs.k8s.io/yaml"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// binaries builds policy-kernel and policy-agent from the repository, once per test binary.
func binaries(t *testing.T) (kernel, agent string) {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "helmtest-bin-")
		if buildErr != nil {
			return
		}
		root, _ := filepath.Abs(repoRoot)
		cmd := exec.Command("go", "build", "-tags", "vtprotobuf", "-o", binDir+"/", "./cmd/policy-kernel", "./cmd/policy-agent")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(binDir, "policy-kernel"), filepath.Join(binDir, "policy-agent")
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// setIn sets a key of a YAML document, by path.
func setIn(t *testing.T, doc string, value any, path ...string) string {
	t.Helper()
	var m map[string]any
	if err := yaml.Unmarshal([]byte(doc), &m); err != nil {
		t.Fatal(err)
	}
	cur := m
	for _, k := range path[:len(path)-1] {
		next, ok := cur[k].(map[string]any)
		if !ok {
			t.Fatalf("no %s in %v", k, path)
		}
		cur = next
	}
	cur[path[len(path)-1]] = value
	b, err := yaml.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func get(url string) int {
	c := http.Client{Timeout: time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

func waitFor(t *testing.T, d time.Duration, what string, ok func() bool) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if ok() {
			return
		}
	}
	t.Fatalf("timed out after %v waiting for %s", d, what)
}

// TestChartConfigsRunWithTheBinaries renders the chart's two configs and gives them to the
// real binaries: both pass --validate (the kernel's against the running agent, every chain
// checked against the agent's policies), and, running, they serve the paths of the
// Deployment's probes and of the ServiceMonitor. Only the pod's directories are moved into a
// temporary directory, and the listeners to free loopback ports (the ports themselves are
// held to the container's by TestChartDefaults); the Secrets are made up the way an operator
// would make them.
func TestChartConfigsRunWithTheBinaries(t *testing.T) {
	egValues, err := os.ReadFile(repoRoot + "deploy/kubernetes/envoy-gateway-values.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, values, refused string }{
		{"defaults", "", ""},
		{"envoy-gateway-values", string(egValues), ""},
		// The check is real: a chain with a policy the agent does not have is refused.
		{"unknown-policy", "kernel: {config: {policy_kernel: {route_policies: [{route_name: /x, request_policy_chain: [{policy: noSuchPolicy}]}]}}}", "noSuchPolicy"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			runChartConfigs(t, render(t, tc.values+"\nserviceMonitor: {enabled: true}\n"), tc.refused)
		})
	}
}

// runChartConfigs runs the binaries with the configs of r; refused is what the kernel's
// --validate must refuse, or "" for configs that must pass and serve.
func runChartConfigs(t *testing.T, r *rendered, refused string) {
	kbin, abin := binaries(t)
	c := r.container(t)
	dir, err := os.MkdirTemp("", "pe-helm-") // short: it holds a Unix socket
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	moves := map[string]string{}
	var pairs []string
	for _, m := range c.VolumeMounts {
		local := filepath.Join(dir, strings.ReplaceAll(strings.Trim(m.MountPath, "/"), "/", "_"))
		if err := os.MkdirAll(local, 0o750); err != nil {
			t.Fatal(err)
		}
		moves[m.MountPath] = local
		pairs = append(pairs, m.MountPath, local)
	}
	paths := strings.NewReplacer(pairs...)
	cfgDir := moves["/etc/policy-engine"]

	// The Secrets: an API key digest for every variable, a PEM public key for every file.
	var env []string
	for _, e := range c.Env {
		if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
			d := sha256.Sum256([]byte("an-operator-key"))
			env = append(env, e.Name+"="+hex.EncodeToString(d[:]))
		}
	}
	for _, v := range r.Deployment.Spec.Template.Spec.Volumes {
		if v.Projected == nil {
			continue
		}
		for _, s := range v.Projected.Sources {
			if s.Secret == nil {
				continue
			}
			for _, it := range s.Secret.Items {
				key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
				der, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
				f := filepath.Join(cfgDir, it.Path)
				if err := os.MkdirAll(filepath.Dir(f), 0o750); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(f, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o440); err != nil {
					t.Fatal(err)
				}
			}
		}
	}

	agentMetrics := freeAddr(t)
	agentCfg := setIn(t, paths.Replace(r.Agent), agentMetrics, "agent_core", "observability", "metrics_address")
	agentCfg = setIn(t, agentCfg, freeAddr(t), "agent_core", "observability", "admin_address")
	kernelCfg := paths.Replace(r.Kernel)
	kfile, afile := filepath.Join(cfgDir, "kernel-config.yaml"), filepath.Join(cfgDir, "agent-config.yaml")
	for f, s := range map[string]string{kfile: kernelCfg, afile: agentCfg} {
		if err := os.WriteFile(f, []byte(s), 0o440); err != nil {
			t.Fatal(err)
		}
	}
	run := func(bin string, args ...string) (string, error) {
		cmd := exec.Command(bin, args...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := run(abin, "--config="+afile, "--validate"); err != nil {
		t.Fatalf("policy-agent --validate with the chart's agent config: %v\n%s\n%s", err, out, agentCfg)
	}

	start := func(name, bin string, args ...string) *exec.Cmd {
		cmd := exec.Command(bin, args...)
		cmd.Env = append(os.Environ(), env...)
		cmd.Stderr = &strings.Builder{}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			cmd.Process.Signal(os.Interrupt)
			done := make(chan struct{})
			go func() { cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(20 * time.Second):
				cmd.Process.Kill()
				<-done
			}
			if t.Failed() {
				t.Logf("%s:\n%s", name, cmd.Stderr)
			}
		})
		return cmd
	}
	start("policy-agent", abin, "--config="+afile)
	if refused != "" {
		out, err := run(kbin, "--config="+kfile, "--validate", "--agent-wait=15s")
		if err == nil || !strings.Contains(out, refused) {
			t.Fatalf("policy-kernel --validate: %v, want a refusal naming %q:\n%s", err, refused, out)
		}
		return
	}
	if out, err := run(kbin, "--config="+kfile, "--validate", "--agent-wait=15s"); err != nil {
		t.Fatalf("policy-kernel --validate with the chart's kernel config: %v\n%s\n%s", err, out, kernelCfg)
	} else if !strings.Contains(out, "valid") {
		t.Errorf("policy-kernel --validate: %s", out)
	}

	extProc, metrics, admin := freeAddr(t), freeAddr(t), freeAddr(t)
	start("policy-kernel", kbin, "--config="+kfile, "--listen="+extProc, "--metrics-listen="+metrics, "--admin-listen="+admin)
	// The Deployment's probes, on the kernel's metrics listener.
	for _, p := range []struct {
		what string
		path string
	}{{"startup", c.StartupProbe.HTTPGet.Path}, {"liveness", c.LivenessProbe.HTTPGet.Path}, {"readiness", c.ReadinessProbe.HTTPGet.Path}} {
		url := "http://" + metrics + p.path
		waitFor(t, 20*time.Second, p.what+" probe "+url+" answering 200", func() bool { return get(url) == 200 })
	}
	// The ServiceMonitor's paths: the kernel's and the agent's metrics.
	for _, ep := range r.ServiceMonitor.Spec.Endpoints {
		addr := map[string]string{"http-metrics": metrics, "agent-metrics": agentMetrics}[ep.Port]
		if code := get("http://" + addr + ep.Path); code != 200 {
			t.Errorf("scrape of %s %s: %d", ep.Port, ep.Path, code)
		}
	}
	// The admin listener serves the config; the metrics listener, which the Service exposes,
	// does not.
	if code := get("http://" + admin + "/config"); code != 200 {
		t.Errorf("admin /config: %d", code)
	}
	if code := get("http://" + metrics + "/config"); code != 404 {
		t.Errorf("/config on the metrics listener: %d", code)
	}
	if conn, err := net.DialTimeout("tcp", extProc, time.Second); err != nil {
		t.Errorf("ext_proc listener: %v", err)
	} else {
		conn.Close()
	}
}
