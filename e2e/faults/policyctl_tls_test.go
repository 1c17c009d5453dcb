package faults

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

// TestPolicyctlMTLS: policyctl check reaches a kernel that requires client certificates with
// --tls-ca, --tls-cert and --tls-key; without a certificate it is refused at the transport,
// which policyctl reports as a connection error (exit 2), not as the engine's answer.
func TestPolicyctlMTLS(t *testing.T) {
	ctl := testenv.Build(t, "github.com/policy-engine/policy-engine/cmd/policyctl")
	dir := t.TempDir()
	ca, clientCA := newTestCA(t, "server CA"), newTestCA(t, "client CA")
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: lockdownKernel(tlsFiles(t, dir, ca, clientCA, true))})
	cert, key := clientCA.issue(t, "envoy", true)
	writeFile(t, filepath.Join(dir, "ca.crt"), ca.pem)
	writeFile(t, filepath.Join(dir, "client.crt"), cert)
	writeFile(t, filepath.Join(dir, "client.key"), key)

	run := func(args ...string) (string, int) {
		t.Helper()
		out, err := exec.Command(ctl, append([]string{"check", "--kernel", e.KernelAddr, "/keyed", "-H", "X-API-Key: fault-key-1"}, args...)...).CombinedOutput()
		if ee, ok := err.(*exec.ExitError); ok {
			return string(out), ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return string(out), 0
	}
	if out, code := run("--tls-ca", filepath.Join(dir, "ca.crt"), "--tls-cert", filepath.Join(dir, "client.crt"), "--tls-key", filepath.Join(dir, "client.key")); code != 0 ||
		!strings.Contains(out, "x-user-id: fault-user") || strings.Contains(out, "fault-key-1") {
		t.Fatalf("mTLS: exit %d\n%s", code, out)
	}
	if out, code := run("--tls-ca", filepath.Join(dir, "ca.crt")); code != 2 || !strings.Contains(out, "cannot reach the kernel") {
		t.Fatalf("no client certificate: exit %d\n%s", code, out)
	}
	if out, code := run(); code != 2 || !strings.Contains(out, "cannot reach the kernel") {
		t.Fatalf("plaintext: exit %d\n%s", code, out)
	}
	if out, code := run("--tls-cert", filepath.Join(dir, "client.crt")); code != 2 || !strings.Contains(out, "need --tls-ca") {
		t.Fatalf("certificate without CA: exit %d\n%s", code, out)
	}
	if err := os.WriteFile(filepath.Join(dir, "empty.pem"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, code := run("--tls-ca", filepath.Join(dir, "empty.pem")); code != 2 || !strings.Contains(out, "no PEM certificate") {
		t.Fatalf("empty CA file: exit %d\n%s", code, out)
	}
}
