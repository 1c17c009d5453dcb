// Package image tests the container image from outside: it runs the image that
// scripts/image-test.sh (make image-test) built, with test keys, and checks it the way a
// platform and Envoy would. It runs only with IMAGE_TEST=1 and IMAGE_TEST_IMAGE set; the
// container engine comes from IMAGE_TEST_ENGINE (default podman) and extra run flags from
// IMAGE_TEST_RUN_ARGS; IMAGE_TEST_PREFIX starts the containers' names. The containers use the
// host's network, so the image's ports (9001 for ext_proc, 9090 for the kernel's metrics and
// health, 9091 for the agent's) must be free.
package image

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

const (
	kernelAddr  = "127.0.0.1:9001"
	metricsAddr = "127.0.0.1:9090"
	agentAddr   = "127.0.0.1:9091"
	imageUID    = "1000"
)

// engine runs the container engine with args and returns its combined output.
func engine(t *testing.T, timeout time.Duration, args ...string) (string, error) {
	t.Helper()
	cmdline := strings.Fields(os.Getenv("IMAGE_TEST_ENGINE"))
	if len(cmdline) == 0 {
		cmdline = []string{"podman"}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, cmdline[0], append(cmdline[1:], args...)...).CombinedOutput()
	return string(out), err
}

func mustEngine(t *testing.T, args ...string) string {
	t.Helper()
	out, err := engine(t, time.Minute, args...)
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// keys are the test credentials handed to the container: an API key (its SHA-256 in the
// environment) and an EC key pair whose public half is mounted as the issuer's key.
type keys struct {
	apiKey, apiKeySHA256 string
	jwtKey               *ecdsa.PrivateKey
	publicPEM            string // host path
}

func newKeys(t *testing.T) keys {
	t.Helper()
	raw := make([]byte, 24)
	rand.Read(raw)
	k := keys{apiKey: "test-" + hex.EncodeToString(raw)}
	sum := sha256.Sum256([]byte(k.apiKey))
	k.apiKeySHA256 = hex.EncodeToString(sum[:])
	var err error
	if k.jwtKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&k.jwtKey.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	k.publicPEM = filepath.Join(t.TempDir(), "jwt-public.pem")
	if err := os.WriteFile(k.publicPEM, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	return k
}

func (k keys) token(t *testing.T, roles ...string) string {
	t.Helper()
	now := time.Now()
	tok, err := jwt.NewWithClaims(jwt.SigningMethodES256, jwt.MapClaims{
		"iss": "https://auth.example.com", "aud": "api-service", "sub": "alice",
		"iat": now.Unix(), "exp": now.Add(time.Hour).Unix(), "roles": roles,
	}).SignedString(k.jwtKey)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// run starts the image in a container named after the test, on the host's network, and
// removes the container when the test ends (printing its log if the test failed).
func run(t *testing.T, image string, args ...string) string {
	t.Helper()
	for _, addr := range []string{kernelAddr, metricsAddr, agentAddr} {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatalf("%s is taken on this host (%v): the container uses the host's network and needs it", addr, err)
		}
		l.Close()
	}
	prefix := os.Getenv("IMAGE_TEST_PREFIX")
	if prefix == "" {
		prefix = fmt.Sprintf("policy-engine-image-test-%d", os.Getpid())
	}
	name := prefix + "-" + strings.ToLower(strings.ReplaceAll(t.Name(), "/", "-"))
	engine(t, time.Minute, "rm", "-f", "-t", "0", name)
	full := append([]string{"run", "-d", "--name", name, "--network=host"}, strings.Fields(os.Getenv("IMAGE_TEST_RUN_ARGS"))...)
	full = append(append(full, args...), image)
	mustEngine(t, full...)
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := engine(t, time.Minute, "logs", name)
			t.Logf("container log:\n%s", out)
		}
		if out, err := engine(t, time.Minute, "rm", "-f", "-t", "0", name); err != nil {
			t.Errorf("removing %s: %v\n%s", name, err, out)
		}
	})
	return name
}

// proc is a process in the container, read from its /proc.
type proc struct {
	pid  int
	comm string
	uids []string // real, effective, saved, filesystem
}

// procs lists the container's processes. The image has no ps: read /proc with sh and grep.
func procs(t *testing.T, name string) []proc {
	t.Helper()
	out := mustEngine(t, "exec", name, "sh", "-c",
		`for d in /proc/[0-9]*; do echo "${d#/proc/} $(cat $d/comm) $(grep '^Uid:' $d/status)"; done 2>/dev/null`)
	var ps []proc
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if len(f) != 7 || f[2] != "Uid:" {
			continue // a process that ended while the loop ran (the loop's own cat and grep)
		}
		pid, _ := strconv.Atoi(f[0])
		ps = append(ps, proc{pid, f[1], f[3:]})
	}
	return ps
}

func pidOf(t *testing.T, name, comm string) int {
	t.Helper()
	for _, p := range procs(t, name) {
		if p.comm == comm {
			return p.pid
		}
	}
	return 0
}

func waitFor(t *testing.T, timeout time.Duration, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up after %s waiting for %s", timeout, what)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func get(path string) (int, string) { return testenv.HTTPGet("http://" + metricsAddr + path) }

// filter is deploy/envoy/envoy.yaml's ext_proc filter, but for its message timeout: a second
// instead of 200 ms, so that a loaded machine makes an answer late rather than a 504.
var filter = envoytest.FilterConfig{
	AllowModeOverride: true,
	RequestAttributes: []string{"xds.route_name", "source.address"},
	MessageTimeout:    time.Second,
}

// do sends one request through the kernel, as Envoy's ext_proc filter would, on the Envoy
// route named as the path (the bootstrap's route names are the kernel config's).
func do(t *testing.T, c *envoytest.Client, path string, headers ...[2]string) *envoytest.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req := &envoytest.Request{Method: "GET", Path: path, Authority: "api.example.com", Headers: headers,
		Attributes: map[string]string{"xds.route_name": path, "source.address": "192.0.2.10:40000"}}
	res, err := c.Do(ctx, req,
		func(*envoytest.Forwarded) *envoytest.Response {
			return &envoytest.Response{Status: 200, Headers: [][2]string{{"content-type", "application/json"}},
				Body: []byte(`{"ok":true,"internal_id":7}`)}
		})
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return res
}

// checkTraffic sends the example config's routes an unauthenticated, a forbidden and an
// allowed request.
func checkTraffic(t *testing.T, c *envoytest.Client, k keys) {
	t.Helper()
	if r := do(t, c, "/api/v1/users"); r.Status != 401 || r.Forwarded != nil {
		t.Errorf("/api/v1/users without a key: %d %s, want 401", r.Status, r.Body)
	}
	if r := do(t, c, "/api/v1/users", [2]string{"x-api-key", "wrong-" + k.apiKey}); r.Status != 403 || r.Forwarded != nil {
		t.Errorf("/api/v1/users with a wrong key: %d %s, want 403", r.Status, r.Body)
	}
	r := do(t, c, "/api/v1/users", [2]string{"x-api-key", k.apiKey})
	if r.Status != 200 || r.Forwarded == nil {
		t.Errorf("/api/v1/users with the key: %d %s, want 200", r.Status, r.Body)
	} else if testenv.Header(r.Headers, "x-frame-options") != "DENY" || bytes.Contains(r.Body, []byte("internal_id")) {
		t.Errorf("/api/v1/users: the response chain did not run: %q %s", r.Headers, r.Body)
	}
	bearer := func(tok string) [2]string { return [2]string{"authorization", "Bearer " + tok} }
	if r := do(t, c, "/api/v1/admin"); r.Status != 401 {
		t.Errorf("/api/v1/admin without a token: %d %s, want 401", r.Status, r.Body)
	}
	if r := do(t, c, "/api/v1/admin", bearer(k.token(t, "reader"))); r.Status != 403 || r.Forwarded != nil {
		t.Errorf("/api/v1/admin as a reader: %d %s, want 403", r.Status, r.Body)
	}
	r = do(t, c, "/api/v1/admin", bearer(k.token(t, "admin")))
	if r.Status != 200 || r.Forwarded == nil {
		t.Errorf("/api/v1/admin as an admin: %d %s, want 200", r.Status, r.Body)
	} else if v := testenv.Header(r.Forwarded.Headers, "x-user-id"); v != "alice" {
		t.Errorf("/api/v1/admin: x-user-id %q, want the token's subject", v)
	}
}

func image(t *testing.T) string {
	t.Helper()
	img := os.Getenv("IMAGE_TEST_IMAGE")
	if os.Getenv("IMAGE_TEST") != "1" || img == "" {
		t.Skip("the image test runs with make image-test (IMAGE_TEST=1, IMAGE_TEST_IMAGE)")
	}
	return img
}

// TestImage runs the image with test keys and checks, from outside: readiness and liveness on
// the kernel's metrics port; 401, 403 and 200 through the kernel's ext_proc port; every
// process runs as uid 1000; supervisord restarts a killed agent and the kernel serves again;
// both processes and supervisord log to the container's stdout, without the keys; no demo
// credential is in the image; the container stops cleanly on SIGTERM.
func TestImage(t *testing.T) {
	img := image(t)
	if out, err := engine(t, time.Minute, "image", "inspect", "--format", "{{.Size}}", img); err == nil {
		t.Logf("image %s: %s bytes", img, strings.TrimSpace(out))
	}
	k := newKeys(t)
	started := time.Now()
	name := run(t, img, "-e", "POLICY_ENGINE_API_KEY_SHA256="+k.apiKeySHA256,
		"-v", k.publicPEM+":/etc/policy-engine/keys/jwt-public.pem:ro")

	waitFor(t, time.Minute, "/health/ready to answer 200", func() bool { code, _ := get("/health/ready"); return code == 200 })
	t.Logf("ready %s after start", time.Since(started).Round(10*time.Millisecond))
	if code, body := get("/health/live"); code != 200 {
		t.Errorf("/health/live: %d %s", code, body)
	}
	if code, body := testenv.HTTPGet("http://" + agentAddr + "/health/ready"); code != 200 {
		t.Errorf("the agent's /health/ready: %d %s", code, body)
	}

	c, err := envoytest.Dial(kernelAddr, filter)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	checkTraffic(t, c, k)

	t.Run("user", func(t *testing.T) {
		ps := procs(t, name)
		seen := map[string]bool{}
		for _, p := range ps {
			seen[p.comm] = true
			for _, u := range p.uids {
				if u != imageUID {
					t.Errorf("pid %d (%s) runs with uids %v, want %s", p.pid, p.comm, p.uids, imageUID)
					break
				}
			}
		}
		for _, want := range []string{"supervisord", "policy-kernel", "policy-agent"} {
			if !seen[want] {
				t.Errorf("no %s process in the container: %v", want, ps)
			}
		}
		if out := mustEngine(t, "exec", name, "id", "-u"); strings.TrimSpace(out) != imageUID {
			t.Errorf("exec runs as uid %q, want %s", out, imageUID)
		}
	})

	// policyctl ships in the image: it checks the configs the container runs on, offline, and
	// explains a request through the kernel's admin listener, which only the container's own
	// loopback reaches (kubectl exec in a pod).
	t.Run("policyctl", func(t *testing.T) {
		out := mustEngine(t, "exec", name, "policyctl", "validate",
			"--config", "/etc/policy-engine/kernel-config.yaml", "--agent-config", "/etc/policy-engine/agent-config.yaml")
		t.Logf("policyctl validate: %s", strings.TrimSpace(out))
		out = mustEngine(t, "exec", name, "policyctl", "explain", "--kernel-admin", "http://127.0.0.1:9190",
			"GET", "/api/v1/users", "-H", "X-API-Key: "+k.apiKey)
		if !strings.Contains(out, "apiKeyAuth") || !strings.Contains(out, "/api/v1/users") {
			t.Errorf("policyctl explain in the container:\n%s", out)
		}
		if strings.Contains(out, k.apiKey) {
			t.Errorf("policyctl explain shows the API key:\n%s", out)
		}
	})

	t.Run("no demo credential", func(t *testing.T) {
		// The demo public key's lines and the demo API key; the image must hold neither.
		demo, err := os.ReadFile("../../config/demo/jwt-demo-public.pem")
		if err != nil {
			t.Fatal(err)
		}
		// Every file of the container but the kernel's (/proc, /sys, /dev), the binaries too,
		// read as root.
		args := []string{"exec", "--user", "0", name, "grep", "-rlsF", "--exclude-dir=proc", "--exclude-dir=sys", "--exclude-dir=dev", "-e", "demo-key-123"}
		for _, l := range strings.Split(strings.TrimSpace(string(demo)), "\n") {
			if !strings.HasPrefix(l, "-----") {
				args = append(args, "-e", l)
			}
		}
		args = append(args, "/")
		out, err := engine(t, 2*time.Minute, args...)
		// grep exits 1 when nothing matched, 2 when something could not be read (a socket);
		// either way it lists every file that matched.
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() == 0 || strings.TrimSpace(out) != "" {
			t.Errorf("grep for the demo credentials in the image: %v: found in\n%s", err, out)
		}
		if out := mustEngine(t, "exec", name, "ls", "-A", "/etc/policy-engine/keys"); strings.TrimSpace(out) != "jwt-public.pem" {
			t.Errorf("/etc/policy-engine/keys holds %q, want only the mounted key", out)
		}
	})

	t.Run("agent restarted", func(t *testing.T) {
		old := pidOf(t, name, "policy-agent")
		if old == 0 {
			t.Fatal("no policy-agent process")
		}
		killed := time.Now()
		mustEngine(t, "exec", name, "sh", "-c", fmt.Sprintf("kill -KILL %d", old))
		waitFor(t, 30*time.Second, "supervisord to start a new policy-agent", func() bool {
			p := pidOf(t, name, "policy-agent")
			return p != 0 && p != old
		})
		waitFor(t, 30*time.Second, "/health/ready to answer 200 again", func() bool {
			code, body := get("/health/ready")
			return code == 200 && !strings.Contains(body, "not reachable")
		})
		t.Logf("agent back and kernel ready %s after the kill", time.Since(killed).Round(10*time.Millisecond))
		waitFor(t, 30*time.Second, "a request through the new agent to be allowed", func() bool {
			r := do(t, c, "/api/v1/users", [2]string{"x-api-key", k.apiKey})
			return r.Status == 200
		})
		checkTraffic(t, c, k)
		if state := strings.TrimSpace(mustEngine(t, "inspect", "--format", "{{.State.Status}} {{.RestartCount}}", name)); state != "running 0" {
			t.Errorf("container state %q after the agent's restart, want running 0", state)
		}
	})

	t.Run("logs", func(t *testing.T) {
		out := mustEngine(t, "logs", name)
		for _, want := range []string{
			"spawned: 'policy-agent'", "spawned: 'policy-kernel'", // supervisord
			"exited: policy-agent", // the kill
			`"component":"kernel"`, `"component":"agent"`,
		} {
			if !strings.Contains(out, want) {
				t.Errorf("the container's log lacks %s", want)
			}
		}
		if n := strings.Count(out, "spawned: 'policy-agent'"); n != 2 {
			t.Errorf("the agent was spawned %d times, want 2 (start and restart)", n)
		}
		if n := strings.Count(out, "supervisord started with pid 1"); n != 1 {
			t.Errorf("supervisord's start is logged %d times, want once", n)
		}
		// Nothing but the audit log (auditLog's file sink) is written under the log directory.
		if files := strings.Fields(mustEngine(t, "exec", name, "ls", "-A", "/var/log/policy-engine")); len(files) > 1 || len(files) == 1 && files[0] != "audit.log" {
			t.Errorf("/var/log/policy-engine holds %q, want at most audit.log", files)
		}
		for _, secret := range []string{k.apiKey, k.apiKeySHA256, k.token(t, "admin")[:40]} {
			if strings.Contains(out, secret) {
				t.Errorf("the container's log holds a secret (%.12s...)", secret)
			}
		}
	})

	t.Run("stop", func(t *testing.T) {
		stopped := time.Now()
		mustEngine(t, "stop", "-t", "45", name)
		took := time.Since(stopped)
		code := strings.TrimSpace(mustEngine(t, "inspect", "--format", "{{.State.ExitCode}}", name))
		t.Logf("stopped in %s, exit code %s", took.Round(10*time.Millisecond), code)
		if code != "0" {
			t.Errorf("exit code %s after SIGTERM, want 0", code)
		}
		if out := mustEngine(t, "logs", name); !strings.Contains(out, "stopped: policy-kernel") || !strings.Contains(out, "stopped: policy-agent") {
			t.Error("supervisord did not stop both programs")
		}
	})
}

// TestImageWithoutKeys runs the image without the keys its agent config needs: the agent
// refuses to start and says why, and the container exits on its own (supervisord's
// fatal-exit listener) instead of staying up and denying everything.
func TestImageWithoutKeys(t *testing.T) {
	img := image(t)
	name := run(t, img)
	started := time.Now()
	waitFor(t, 2*time.Minute, "the container to exit", func() bool {
		out, _ := engine(t, time.Minute, "inspect", "--format", "{{.State.Status}}", name)
		return strings.TrimSpace(out) == "exited"
	})
	code := strings.TrimSpace(mustEngine(t, "inspect", "--format", "{{.State.ExitCode}}", name))
	t.Logf("the container exited %s after start, exit code %s", time.Since(started).Round(100*time.Millisecond), code)
	out := mustEngine(t, "logs", name)
	for _, want := range []string{"POLICY_ENGINE_API_KEY_SHA256", "stopping supervisord so that the container exits"} {
		if !strings.Contains(out, want) {
			t.Errorf("the container's log lacks %q", want)
		}
	}
}
