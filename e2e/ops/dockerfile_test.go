package ops

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
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
		"--from=build /out/policy-kernel /out/policy-agent /usr/local/bin/",
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
