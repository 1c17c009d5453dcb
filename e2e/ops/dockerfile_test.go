package ops

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
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

// instruction is one Dockerfile instruction, continuation lines joined.
type instruction struct {
	op, args string
}

func parseDockerfile(t *testing.T, path string) []instruction {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []instruction
	cur := ""
	for _, line := range strings.Split(string(b), "\n") {
		trimmed := strings.TrimSpace(line)
		if cur == "" && (trimmed == "" || strings.HasPrefix(trimmed, "#")) {
			continue
		}
		if strings.HasSuffix(trimmed, "\\") {
			cur += strings.TrimSuffix(trimmed, "\\") + " "
			continue
		}
		cur += trimmed
		op, args, _ := strings.Cut(cur, " ")
		out = append(out, instruction{strings.ToUpper(op), strings.TrimSpace(args)})
		cur = ""
	}
	return out
}

// TestDockerfile checks the Dockerfile against what the deployment needs: a build stage and a
// runtime stage, supervisor installed, both binaries where supervisord.conf runs them, the
// configs where the binaries look for them, a non-root user, ports 9001 and 9090, supervisord
// as the command, and every COPY source present in the repository. When a Docker daemon is
// reachable, it also builds the image.
func TestDockerfile(t *testing.T) {
	ins := parseDockerfile(t, repoRoot+"Dockerfile")
	var froms, copies, runs []string
	user, cmd := "", ""
	var expose []string
	for _, in := range ins {
		switch in.op {
		case "FROM":
			froms = append(froms, in.args)
		case "COPY":
			copies = append(copies, in.args)
		case "RUN":
			runs = append(runs, in.args)
		case "USER":
			user = in.args
		case "EXPOSE":
			expose = append(expose, strings.Fields(in.args)...)
		case "CMD":
			cmd = in.args
		}
	}
	if len(froms) != 2 || !strings.HasSuffix(froms[0], " AS build") {
		t.Errorf("want a build stage and a runtime stage, got FROM %q", froms)
	}
	if user == "" || user == "root" || user == "0" {
		t.Errorf("USER %q: the processes must not run as root", user)
	}
	if strings.Join(expose, " ") != "9001 9090" {
		t.Errorf("EXPOSE %q, want 9001 9090", expose)
	}
	if cmd != `["/usr/bin/supervisord", "-c", "/etc/supervisord.conf"]` {
		t.Errorf("CMD %s", cmd)
	}
	if !strings.Contains(strings.Join(runs, "\n"), "install -y --no-install-recommends supervisor") {
		t.Error("supervisor is not installed")
	}
	sv, err := os.ReadFile(repoRoot + "supervisord.conf")
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(copies, "\n")
	for _, want := range []string{
		"--from=build /out/policy-kernel /out/policy-agent /out/policyctl /usr/local/bin/",
		"config/kernel-config.yaml config/agent-config.yaml /etc/policy-engine/",
		"supervisord.conf /etc/supervisord.conf",
	} {
		if !strings.Contains(joined, want) {
			t.Errorf("no COPY %s", want)
		}
	}
	for _, want := range []string{
		"command=/usr/local/bin/policy-agent --config=/etc/policy-engine/agent-config.yaml",
		"command=/usr/local/bin/policy-kernel --config=/etc/policy-engine/kernel-config.yaml",
		"user=" + user,
	} {
		if !strings.Contains(string(sv), want) {
			t.Errorf("supervisord.conf lacks %s", want)
		}
	}
	// Every COPY source outside the build stage's output exists in the repository, and the
	// build context ignores nothing it needs.
	ignore, _ := os.ReadFile(repoRoot + ".dockerignore")
	for _, c := range copies {
		fields := strings.Fields(c)
		if strings.HasPrefix(fields[0], "--from=") {
			continue
		}
		for _, src := range fields[:len(fields)-1] {
			if src == "." {
				continue
			}
			if _, err := os.Stat(filepath.Join(repoRoot, src)); err != nil {
				t.Errorf("COPY source %s: %v", src, err)
			}
			top, _, _ := strings.Cut(src, "/")
			for _, ig := range strings.Fields(string(ignore)) {
				if ig == top {
					t.Errorf("COPY source %s is in .dockerignore", src)
				}
			}
		}
	}

	if exec.Command("docker", "info").Run() != nil {
		t.Log("no Docker daemon reachable: the image was not built")
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "docker", "build", "-t", "policy-engine:test", repoRoot).CombinedOutput()
	if err != nil {
		t.Fatalf("docker build: %v\n%s", err, out)
	}
}

// runtimeCopies returns the COPY instructions of the Dockerfile's last stage, as source paths
// (in the repository, or "--from=..." for a stage's output) and destination.
func runtimeCopies(t *testing.T) (srcs [][]string, dsts []string) {
	t.Helper()
	var last []instruction
	for _, in := range parseDockerfile(t, repoRoot+"Dockerfile") {
		if in.op == "FROM" {
			last = nil
		}
		last = append(last, in)
	}
	for _, in := range last {
		if in.op != "COPY" {
			continue
		}
		fields := strings.Fields(in.args)
		srcs = append(srcs, fields[:len(fields)-1])
		dsts = append(dsts, fields[len(fields)-1])
	}
	return srcs, dsts
}

// TestImageHoldsNoCredential checks that no file the image is made of holds a credential: not
// the demo API key or its SHA-256, not the demo public key (whose private key is in the
// repository, so anyone could mint tokens an image that trusts it accepts), no key digest and
// no PEM block at all. Those are the configs, schemas and supervisord.conf the last stage
// copies from the repository, and the binaries it copies from the build stage. The demo keys
// are also kept out of the build context.
func TestImageHoldsNoCredential(t *testing.T) {
	demoPEM, err := os.ReadFile(repoRoot + "config/demo/jwt-demo-public.pem")
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("demo-key-123"))
	forbidden := []string{"demo-key-123", hex.EncodeToString(digest[:])}
	for _, l := range strings.Split(strings.TrimSpace(string(demoPEM)), "\n") {
		if !strings.HasPrefix(l, "-----") {
			forbidden = append(forbidden, l)
		}
	}
	// Text files must not hold a key digest or a PEM block of any kind either.
	forbiddenRE := regexp.MustCompile(`(?i)-----BEGIN [A-Z ]*(KEY|CERTIFICATE)-----|key_sha256:\s*"?[0-9a-f]{64}|[0-9a-f]{64}`)

	check := func(name string, data []byte, text bool) {
		t.Helper()
		for _, f := range forbidden {
			if bytes.Contains(data, []byte(f)) {
				t.Errorf("%s holds a demo credential (%.20s...)", name, f)
			}
		}
		if text {
			if m := forbiddenRE.Find(data); m != nil {
				t.Errorf("%s holds a credential: %.40q", name, m)
			}
		}
	}
	srcs, _ := runtimeCopies(t)
	files := 0
	for _, list := range srcs {
		if strings.HasPrefix(list[0], "--from=") {
			continue
		}
		for _, src := range list {
			err := filepath.WalkDir(filepath.Join(repoRoot, src), func(path string, d fs.DirEntry, err error) error {
				if err != nil || d.IsDir() {
					return err
				}
				data, err := os.ReadFile(path)
				if err != nil {
					return err
				}
				files++
				check(strings.TrimPrefix(path, repoRoot), data, true)
				return nil
			})
			if err != nil {
				t.Fatalf("COPY source %s: %v", src, err)
			}
		}
	}
	if files < 3 {
		t.Fatalf("only %d files copied from the repository: the Dockerfile changed shape", files)
	}
	kbin, abin := testenv.Binaries(t)
	for _, bin := range []string{kbin, abin} {
		data, err := os.ReadFile(bin)
		if err != nil {
			t.Fatal(err)
		}
		check(filepath.Base(bin), data, false)
	}
	ignore, _ := os.ReadFile(repoRoot + ".dockerignore")
	if !strings.Contains("\n"+string(ignore)+"\n", "\nconfig/demo\n") {
		t.Error(".dockerignore does not keep config/demo (the demo private key) out of the build context")
	}
}

// imageAgentConfig writes the agent config the image ships, with the container's directories
// moved under dir (its key file then is dir/etc/keys/jwt-public.pem), and returns its path.
func imageAgentConfig(t *testing.T, dir string) string {
	t.Helper()
	srcs, dsts := runtimeCopies(t)
	var src string
	for i, list := range srcs {
		for _, s := range list {
			if filepath.Base(s) == "agent-config.yaml" && dsts[i] == "/etc/policy-engine/" {
				src = s
			}
		}
	}
	if src == "" {
		t.Fatal("the Dockerfile copies no agent-config.yaml to /etc/policy-engine/")
	}
	b, err := os.ReadFile(repoRoot + src)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"etc/keys", "run/agents", "log"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cfg := strings.NewReplacer(
		"/etc/policy-engine", filepath.Join(dir, "etc"),
		"/var/run/policy-engine", filepath.Join(dir, "run"),
		"/var/log/policy-engine", filepath.Join(dir, "log"),
		"127.0.0.1:9091", testenv.FreeAddr(t),
	).Replace(string(b))
	path := filepath.Join(dir, "etc", "agent-config.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// cleanEnv is the test's environment without the image's key variable.
func cleanEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "POLICY_ENGINE_") {
			env = append(env, kv)
		}
	}
	return append(env, extra...)
}

// TestImageConfigsNeedKeys runs the agent on the agent config the image ships. Without the
// keys the operator must supply (the API key's SHA-256 in POLICY_ENGINE_API_KEY_SHA256, the JWT
// issuer's public key in /etc/policy-engine/keys/jwt-public.pem), or with them empty, it
// refuses to start, exit status 1, with a message that names what is missing; with them it
// serves.
func TestImageConfigsNeedKeys(t *testing.T) {
	_, abin := testenv.Binaries(t)
	dir, err := os.MkdirTemp("", "pe-img-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg := imageAgentConfig(t, dir)
	keyFile := filepath.Join(dir, "etc", "keys", "jwt-public.pem")
	apiKey := sha256.Sum256([]byte("an-operator-key"))
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(&ec.PublicKey)
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})

	refused := func(name string, env []string, key []byte, want ...string) {
		t.Helper()
		os.Remove(keyFile)
		if key != nil {
			if err := os.WriteFile(keyFile, key, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), testenv.StartTimeout)
		defer cancel()
		cmd := exec.CommandContext(ctx, abin, "--config", cfg)
		cmd.Env = cleanEnv(env...)
		out, err := cmd.CombinedOutput()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 1 {
			t.Fatalf("%s: the agent did not refuse to start with status 1: %v\n%s", name, err, out)
		}
		for _, w := range want {
			if !strings.Contains(string(out), w) {
				t.Errorf("%s: the message does not say %q:\n%s", name, w, out)
			}
		}
	}
	refused("no keys", nil, nil,
		"apiKeyAuth: keys[0].key_sha256: secret ${env:POLICY_ENGINE_API_KEY_SHA256}: environment variable not set",
		"jwtValidation: public_key_pem: secret ${file:"+keyFile+"}: open "+keyFile+": no such file or directory")
	refused("no API key", nil, pubPEM, "${env:POLICY_ENGINE_API_KEY_SHA256}: environment variable not set")
	refused("no public key", []string{"POLICY_ENGINE_API_KEY_SHA256=" + hex.EncodeToString(apiKey[:])}, nil, keyFile+": no such file or directory")
	refused("empty keys", []string{"POLICY_ENGINE_API_KEY_SHA256="}, []byte("\n"),
		"apiKeyAuth: keys[0]: exactly one of key_sha256, key_env and key must be set",
		"jwtValidation: public_key_pem: is empty")

	// With both keys the agent serves.
	if err := os.WriteFile(keyFile, pubPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	agent := testenv.Start(t, abin, []string{"POLICY_ENGINE_API_KEY_SHA256=" + hex.EncodeToString(apiKey[:])}, "--config", cfg)
	testenv.WaitDial(t, agent, "unix", filepath.Join(dir, "run", "agents", "default.sock"))
}
