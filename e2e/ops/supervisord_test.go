package ops

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// container lays out the repository's deployment under dir the way the Dockerfile lays it out
// under /: the supervisord config, the example configs and the binaries, with the container's
// paths replaced by paths under dir, the ports by free loopback ports and the health check
// made faster; and the keys an operator supplies: a JWT public key file, and the API key's
// digest in env, for supervisord's environment. It returns the supervisord config's path.
type container struct {
	dir, conf, kernelAddr, metricsAddr string
	env                                []string
}

func newContainer(t *testing.T) *container {
	t.Helper()
	kbin, abin := testenv.Binaries(t)
	// Unix socket paths must stay short: use a short temporary directory.
	dir, err := os.MkdirTemp("", "pe-sv-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	c := &container{dir: dir, conf: filepath.Join(dir, "etc", "supervisord.conf"), kernelAddr: testenv.FreeAddr(t), metricsAddr: testenv.FreeAddr(t)}
	for _, d := range []string{"bin", "etc", "run/agents", "log"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for src, dst := range map[string]string{kbin: "bin/policy-kernel", abin: "bin/policy-agent"} {
		if err := os.Symlink(src, filepath.Join(dir, dst)); err != nil {
			t.Fatal(err)
		}
	}
	paths := strings.NewReplacer(
		"/usr/local/bin", filepath.Join(dir, "bin"),
		"/etc/policy-engine", filepath.Join(dir, "etc"),
		"/var/run/policy-engine", filepath.Join(dir, "run"),
		"/var/log/policy-engine", filepath.Join(dir, "log"),
	)
	_, kport, _ := strings.Cut(c.kernelAddr, ":")
	_, mport, _ := strings.Cut(c.metricsAddr, ":")
	_, aport, _ := strings.Cut(testenv.FreeAddr(t), ":")
	write := func(src, dst string, more ...string) {
		t.Helper()
		b, err := os.ReadFile(repoRoot + src)
		if err != nil {
			t.Fatal(err)
		}
		s := paths.Replace(string(b))
		for i := 0; i+1 < len(more); i += 2 {
			if !strings.Contains(s, more[i]) {
				t.Fatalf("%s no longer contains %q", src, more[i])
			}
			s = strings.ReplaceAll(s, more[i], more[i+1])
		}
		if err := os.WriteFile(filepath.Join(dir, dst), []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// The test does not run as the container's user; supervisord ignores user= unless it runs
	// as root, and then it would need that user to exist.
	write("supervisord.conf", "etc/supervisord.conf", "user=policy-engine\n", "")
	write("config/agent-config.yaml", "etc/agent-config.yaml", "127.0.0.1:9091", testenv.FreeAddr(t), "127.0.0.1:9191", testenv.FreeAddr(t))
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(&ec.PublicKey)
	if err := os.MkdirAll(filepath.Join(dir, "etc", "keys"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "etc", "keys", "jwt-public.pem"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("an-operator-key"))
	c.env = []string{"POLICY_ENGINE_API_KEY_SHA256=" + hex.EncodeToString(digest[:])}
	write("config/kernel-config.yaml", "etc/kernel-config.yaml",
		"port: 9001", "port: "+kport,
		"metrics_port: 9090", "metrics_port: "+mport+"\n    metrics_address: 127.0.0.1",
		"admin_port: 9190", "admin_port: "+aport,
		"health_check_interval_ms: 5000", "health_check_interval_ms: 200",
		"timeout_ms: 150", "timeout_ms: 1500",
		"message_timeout_ms: 200", "message_timeout_ms: 2000",
	)
	return c
}

// ctl runs supervisorctl against the container's supervisord.
func (c *container) ctl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("supervisorctl", append([]string{"-c", c.conf}, args...)...).CombinedOutput()
	if err != nil && !strings.Contains(args[0], "status") {
		t.Fatalf("supervisorctl %v: %v\n%s", args, err, out)
	}
	return strings.TrimSpace(string(out))
}

func (c *container) pid(t *testing.T, program string) int {
	t.Helper()
	n, err := strconv.Atoi(c.ctl(t, "pid", program))
	if err != nil {
		return 0
	}
	return n
}

// TestSupervisordRestartsKilledAgent starts Debian's supervisord with the repository's
// supervisord.conf, kills the agent with SIGKILL, and shows supervisord starting a new one and
// the kernel serving again with it.
func TestSupervisordRestartsKilledAgent(t *testing.T) {
	if _, err := exec.LookPath("supervisord"); err != nil {
		t.Fatal("supervisord is not installed (Debian package supervisor; .ci/run installs it)")
	}
	c := newContainer(t)
	sv := testenv.Start(t, "supervisord", c.env, "-c", c.conf)
	readyURL := "http://" + c.metricsAddr + "/health/ready"
	testenv.WaitFor(t, 30*time.Second, "the kernel ready under supervisord", func() bool {
		if sv.Exited() {
			t.Fatalf("supervisord exited:\n%s", sv.Logs.String())
		}
		code, _ := testenv.HTTPGet(readyURL)
		return code == 200
	})
	testenv.WaitFor(t, 10*time.Second, "both programs and the fatal-exit listener RUNNING", func() bool {
		status := c.ctl(t, "status")
		return strings.Contains(status, "policy-agent") && strings.Contains(status, "policy-kernel") && strings.Contains(status, "fatal-exit") && strings.Count(status, "RUNNING") == 3
	})
	client, err := envoytest.Dial(c.kernelAddr, envoyConfig)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	req := func() *envoytest.Result {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		r, err := client.Do(ctx, &envoytest.Request{Path: "/api/v1/users", Attributes: map[string]string{"xds.route_name": "/api/v1/users"}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	// The example config: /api/v1/users needs the demo key.
	if r := req(); r.Status != 401 {
		t.Fatalf("before the kill: %d %s", r.Status, r.Body)
	}

	old := c.pid(t, "policy-agent")
	if old <= 0 {
		t.Fatal("no agent pid")
	}
	if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, 30*time.Second, "a new agent", func() bool {
		p := c.pid(t, "policy-agent")
		return p > 0 && p != old
	})
	testenv.WaitFor(t, 30*time.Second, "the kernel serving again", func() bool {
		code, _ := testenv.HTTPGet(readyURL)
		return code == 200 && req().Status == 401
	})
	// Everything goes to supervisord's stdout, the container's (kubectl logs): supervisord's
	// own lines and both processes' JSON lines; no log file is written.
	out := sv.Logs.String()
	for _, want := range []string{"exited: policy-agent (terminated by SIGKILL", `"component":"agent"`, `"component":"kernel"`, "policy-kernel serving"} {
		if !strings.Contains(out, want) {
			t.Fatalf("supervisord's stdout lacks %q:\n%s", want, out)
		}
	}
	if files, _ := os.ReadDir(filepath.Join(c.dir, "log")); len(files) > 0 {
		t.Errorf("log files written: %v", files)
	}

	// SIGTERM to supervisord stops both processes and supervisord itself.
	pids := []int{c.pid(t, "policy-kernel"), c.pid(t, "policy-agent")}
	if err := sv.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if _, ok := sv.Wait(40 * time.Second); !ok {
		t.Fatal("supervisord did not stop")
	}
	for _, p := range pids {
		if p > 0 && syscall.Kill(p, 0) == nil {
			t.Errorf("process %d still runs after supervisord stopped", p)
		}
	}
}

// TestSupervisordExitsWhenTheAgentKeepsFailing starts supervisord with the repository's
// supervisord.conf and an agent that cannot run: the fatal-exit event listener must stop
// supervisord, kernel included, so that the container ends and its orchestrator starts a new
// one, instead of a pod whose kernel stays live but denies every chained route for good.
//   - "exits-at-once": the agent's keys are missing, so it exits at once. supervisord marks it
//     FATAL after startretries; or, on a busy machine where supervisord looks at startsecs
//     only after the agent is gone, counts it as started and restarts it for ever, which the
//     listener's count of unexpected exits (5 within 60 s) catches.
//   - "exits-after-startsecs": an agent that runs 1.5 s and then exits 1, which supervisord
//     alone would restart for ever.
//
// supervisord, the container's PID 1, ends with status 0 after an orderly stop whatever the
// cause (only signals it handles reach a PID 1, and it handles them all as an orderly stop);
// a Deployment's pods (restartPolicy Always) and the compose file's restart policy restart it
// all the same.
func TestSupervisordExitsWhenTheAgentKeepsFailing(t *testing.T) {
	if _, err := exec.LookPath("supervisord"); err != nil {
		t.Fatal("supervisord is not installed (Debian package supervisor; .ci/run installs it)")
	}
	for _, tc := range []struct {
		name  string
		agent string // a script in place of the agent binary, or "" for the real one
	}{
		{"exits-at-once", ""},
		{"exits-after-startsecs", "#!/bin/sh\nsleep 1.5\necho 'agent: failing after startsecs' >&2\nexit 1\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newContainer(t)
			if tc.agent != "" {
				bin := filepath.Join(c.dir, "bin", "policy-agent")
				if err := os.Remove(bin); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(bin, []byte(tc.agent), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			start := time.Now()
			// No API key digest in the environment: the real agent refuses to start.
			sv := testenv.Start(t, "supervisord", nil, "-c", c.conf)
			// At most 5 agent runs of a few seconds (the run, supervisord's back-off), then
			// the kernel's orderly stop.
			const bound = 60 * time.Second
			if _, ok := sv.Wait(bound); !ok {
				t.Fatalf("supervisord still runs %v after its start with an agent that keeps failing:\n%s", bound, sv.Logs.String())
			}
			took := time.Since(start)
			out := sv.Logs.String()
			log, _ := os.ReadFile(filepath.Join(c.dir, "log", "supervisord.log"))
			all := out + string(log)
			fatal := strings.Contains(out, "policy-engine: a program went FATAL (processname:policy-agent")
			looping := strings.Contains(out, "policy-engine: 5 unexpected exits within 60 s, the last (processname:policy-agent")
			if !fatal && !looping {
				t.Errorf("the listener did not say why it stopped supervisord:\n%s", out)
			}
			if tc.agent != "" && fatal {
				t.Error("an agent that outlives startsecs went FATAL: the test does not test the exit count")
			}
			for _, want := range []string{"received SIGTERM indicating exit request", "stopped: policy-kernel"} {
				if !strings.Contains(all, want) {
					t.Errorf("supervisord's log lacks %q:\n%s", want, all)
				}
			}
			t.Logf("supervisord ended %v after its start (fatal %v, exit count %v)", took.Round(100*time.Millisecond), fatal, looping)
		})
	}
}
