package policyctl

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/agent"
	"github.com/policy-engine/policy-engine/internal/testenv"
	"github.com/policy-engine/policy-engine/kernel"
)

// kernelEnv is a real agent and a real kernel run in the test's process, over a Unix socket
// and loopback ports: the ext_proc address and the admin listener's URL.
type kernelEnv struct{ extproc, admin string }

func startKernel(t *testing.T) kernelEnv {
	t.Helper()
	dir := t.TempDir()
	sock := filepath.Join(dir, "agent.sock")
	write := func(name, yaml string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	a := write("agent.yaml", fmt.Sprintf(`agent_core:
  name: a
  socket_path: %s
  policies:
    config:
      apiKeyAuth:
        keys: [{key: secret-1, user_id: alice}]
`, sock))
	k := write("kernel.yaml", fmt.Sprintf(`policy_kernel:
  agents: [{name: a, socket_path: %s}]
  route_policies:
    - route_name: /api
      request_policy_chain:
        - policy: apiKeyAuth
          metadata: {header_name: X-Tenant-Key}
      response_policy_chain:
        - policy: addSecurityHeaders
  default_policy:
    request_policy_chain:
      - policy: allowAll
`, sock))
	ag := testenv.RunMain(t, agent.Main, "--config", a)
	testenv.WaitDial(t, ag, "unix", sock)
	e := kernelEnv{extproc: testenv.FreeAddr(t), admin: testenv.FreeAddr(t)}
	kp := testenv.RunMain(t, kernel.Main, "--config", k, "--listen", e.extproc, "--metrics-listen", testenv.FreeAddr(t), "--admin-listen", e.admin)
	testenv.WaitDial(t, kp, "tcp", e.extproc)
	testenv.WaitDial(t, kp, "tcp", e.admin)
	e.admin = "http://" + e.admin
	return e
}

func runMain(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := Main(t.Context(), args, &out, &errOut)
	return code, out.String(), errOut.String()
}

// TestCheckAndExplainInProcessKernel: policyctl check and explain --kernel-admin against a
// real kernel and agent: the exit code says whether the request reached the upstream, the
// output shows what Envoy would do, and explain adds the route, its rule and each entry's
// outcome; neither ever prints the API key.
func TestCheckAndExplainInProcessKernel(t *testing.T) {
	e := startKernel(t)

	code, out, errOut := runMain(t, "check", "--kernel", e.extproc, "GET", "/api/users")
	if code != ExitRefused || !strings.Contains(out, "local reply 401") {
		t.Fatalf("check, no key: exit %d\n%s%s", code, out, errOut)
	}
	// check knows no config: it hides the values of the headers that always carry credentials
	// (the route's own key header is hidden by explain, which knows it).
	code, out, errOut = runMain(t, "check", "--kernel", e.extproc, "-H", "X-Tenant-Key: secret-1", "-H", "Authorization: Bearer tok-9", "--upstream-status", "201", "/api/users")
	if code != ExitUpstream || !strings.Contains(out, "+ x-user-id: alice") || !strings.Contains(out, "201") || !strings.Contains(out, "+ x-frame-options: DENY") ||
		!strings.Contains(out, "authorization: [redacted]") || strings.Contains(out+errOut, "tok-9") {
		t.Fatalf("check, good key: exit %d\n%s%s", code, out, errOut)
	}
	code, out, errOut = runMain(t, "check", "--kernel", e.extproc, "--json", "-H", "X-Tenant-Key: wrong", "/api/users")
	var rep map[string]any
	if code != ExitRefused || json.Unmarshal([]byte(out), &rep) != nil || strings.Contains(out, "wrong") {
		t.Fatalf("check --json, wrong key: exit %d\n%s%s", code, out, errOut)
	}

	code, out, errOut = runMain(t, "explain", "--kernel-admin", e.admin, "-H", "X-Tenant-Key: secret-1", "-H", "Authorization: Bearer tok-9", "/api/users")
	if code != ExitUpstream || !strings.Contains(out, "route: /api (picked by path prefix") || !strings.Contains(out, "1. apiKeyAuth") ||
		!strings.Contains(out, "set header x-user-id: alice") || strings.Contains(out+errOut, "secret-1") || strings.Contains(out+errOut, "tok-9") {
		t.Fatalf("explain, good key: exit %d\n%s%s", code, out, errOut)
	}
	code, out, errOut = runMain(t, "explain", "--kernel-admin", e.admin+"/", "--route", "/api", "POST", "/elsewhere")
	if code != ExitRefused || !strings.Contains(out, "route: /api (picked by attribute") || !strings.Contains(out, "local reply 401") {
		t.Fatalf("explain, no key: exit %d\n%s%s", code, out, errOut)
	}
	code, out, errOut = runMain(t, "explain", "--kernel-admin", e.admin, "--json", "/")
	if code != ExitUpstream || json.Unmarshal([]byte(out), &rep) != nil || !strings.Contains(out, `"default"`) {
		t.Fatalf("explain --json, default route: exit %d\n%s%s", code, out, errOut)
	}

	// The ext_proc port given for the admin listener: it is not the kernel's admin listener.
	if code, _, errOut := runMain(t, "explain", "--kernel-admin", "http://"+e.extproc, "/"); code != ExitError || !strings.Contains(errOut, "policyctl:") {
		t.Fatalf("explain on the ext_proc port: exit %d %s", code, errOut)
	}
}

// TestCheckErrors: a kernel that is not there and bad TLS flags are usage or connection
// errors (exit 2) that say what to fix.
func TestCheckErrors(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	ca, _ := writeCA(t, dir)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--kernel", testenv.FreeAddr(t), "/"}, "cannot reach the kernel at"},
		{[]string{"--tls-cert", "c.pem", "/"}, "--tls-cert, --tls-key and --tls-server-name need --tls-ca"},
		{[]string{"--tls-ca", filepath.Join(dir, "none.pem"), "/"}, "--tls-ca: open"},
		{[]string{"--tls-ca", notPEM, "/"}, "no PEM certificate in it"},
		{[]string{"--tls-ca", ca, "--tls-cert", "c.pem", "/"}, "--tls-cert and --tls-key go together"},
		{[]string{"--tls-ca", ca, "--tls-cert", notPEM, "--tls-key", notPEM, "/"}, "--tls-cert, --tls-key:"},
		{[]string{"GET", "/a", "/b", "/c"}, "give the request as [METHOD] PATH"},
	} {
		code, out, errOut := runMain(t, append([]string{"check"}, c.args...)...)
		if code != ExitError || !strings.Contains(errOut, c.want) {
			t.Errorf("%q: exit %d\n%s%s\nwant %q", c.args, code, out, errOut, c.want)
		}
	}
}

// TestTLSConfig: --tls-ca trusts its file's CA; the name checked is the host of --kernel
// unless --tls-server-name says otherwise (none for a Unix socket); a client certificate is
// loaded with its key.
func TestTLSConfig(t *testing.T) {
	dir := t.TempDir()
	ca, key := writeCA(t, dir)
	f := tlsFlags{ca: ca}
	c, err := f.config("kernel.example:9001")
	if err != nil || c.ServerName != "kernel.example" || c.RootCAs == nil || len(c.Certificates) != 0 || c.MinVersion < 0x0303 {
		t.Fatalf("%+v %v", c, err)
	}
	if c, err := f.config("unix:///run/k.sock"); err != nil || c.ServerName != "" {
		t.Fatalf("unix: %q %v", c.ServerName, err)
	}
	f.serverName = "policy-kernel.internal"
	if c, err := f.config("10.0.0.1:9001"); err != nil || c.ServerName != "policy-kernel.internal" {
		t.Fatalf("server name: %q %v", c.ServerName, err)
	}
	f.cert, f.key = ca, key // the CA's own certificate serves as a client certificate here
	if c, err := f.config("10.0.0.1:9001"); err != nil || len(c.Certificates) != 1 {
		t.Fatalf("client certificate: %v", err)
	}
	if c, err := (&tlsFlags{}).config("x:1"); c != nil || err != nil {
		t.Fatalf("plaintext: %v %v", c, err)
	}
}

// writeCA writes a self-signed CA certificate and its key as PEM files.
func writeCA(t *testing.T, dir string) (certFile, keyFile string) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

// TestExplainRemoteErrors: every answer of --kernel-admin that is not an explain report is an
// error (exit 2) that says what went wrong: a URL that is not one, nothing listening, a
// server without /debug/explain, a refusal with its reason, and an answer that is not a report.
func TestExplainRemoteErrors(t *testing.T) {
	answer := func(code int, body string) string {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(code)
			_, _ = w.Write([]byte(body))
		}))
		t.Cleanup(srv.Close)
		return srv.URL
	}
	gone := httptest.NewServer(http.NotFoundHandler())
	gone.Close()
	for _, c := range []struct{ url, want string }{
		{"127.0.0.1:9190", "give the admin listener's URL, e.g. http://127.0.0.1:9190"},
		{"ftp://h/", "give the admin listener's URL"},
		{gone.URL, "cannot reach the kernel's admin listener at"},
		{answer(404, "404 page not found"), "has no /debug/explain: is it the kernel's admin listener"},
		{answer(429, `{"error":"4 explain calls are running; try again"}`), "the kernel refused: 429: 4 explain calls are running; try again"},
		{answer(502, "<html>bad gateway</html>"), "the kernel answered 502: <html>bad gateway</html>"},
		{answer(200, "[1]"), "the kernel's answer is not an explain report"},
		{answer(200, `{"route":"/r","traces":[{"phase":"request","entry":{"nope":1}}]}`), "the kernel's answer: traces[0]:"},
	} {
		code, out, errOut := runMain(t, "explain", "--kernel-admin", c.url, "/r")
		if code != ExitError || !strings.Contains(errOut, c.want) {
			t.Errorf("%s: exit %d\n%s%s\nwant %q", c.url, code, out, errOut, c.want)
		}
	}
}

// TestLocalAgent: the in-process agent of explain and validate is healthy once loaded.
func TestLocalAgent(t *testing.T) {
	p := filepath.Join(t.TempDir(), "a.yaml")
	if err := os.WriteFile(p, []byte(explainAgent), 0o600); err != nil {
		t.Fatal(err)
	}
	clients, closeAll, err := loadAgents([]string{p}, nil, &bytes.Buffer{})
	defer closeAll()
	if err != nil || len(clients) != 1 || clients["a"] == nil {
		t.Fatalf("%v %v", clients, err)
	}
	if err := clients["a"].Check(t.Context()); err != nil {
		t.Fatalf("check: %v", err)
	}
	if info, err := clients["a"].GetAgentConfig(t.Context()); err != nil || len(info.GetSupportedPolicies()) == 0 {
		t.Fatalf("describe: %v %v", info, err)
	}
	if err := clients["a"].Close(); err != nil {
		t.Fatal(err)
	}
}
