package faults

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"golang.org/x/sys/unix"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// Who may talk to the kernel: the ext_proc port binds loopback unless told otherwise, serves
// TLS and mTLS with certificates it reads again when they change, caps its connections, and
// ends streams that idle. Without these, whoever reaches the port can ask whether an API key
// is valid, forge source.address, write forged audit records, and park streams until the
// kernel runs out of memory.

// testCA is a certificate authority made for one test.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

var serial = big.NewInt(time.Now().UnixNano())

func nextSerial() *big.Int {
	serial = new(big.Int).Add(serial, big.NewInt(1))
	return new(big.Int).Set(serial)
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: nextSerial(), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue makes a leaf certificate for 127.0.0.1 (a server) or a client, as PEM cert and key.
func (ca *testCA) issue(t *testing.T, name string, client bool) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: nextSerial(), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"},
	}
	if client {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		tmpl.IPAddresses, tmpl.DNSNames = nil, nil
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

// clientTLS is the TLS of Envoy's ext_proc cluster: trust roots and, for mTLS, a certificate.
func clientTLS(t *testing.T, roots *testCA, certPEM, keyPEM []byte) *tls.Config {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(roots.pem)
	c := &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}
	if certPEM != nil {
		pair, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			t.Fatal(err)
		}
		c.Certificates = []tls.Certificate{pair}
	}
	return c
}

// writeFile writes a file atomically (a rename), as a secret rotation does.
func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// lockdownKernel is a kernel config with one apiKeyAuth route, /keyed, one with a response
// chain, /audited, and the given server settings.
func lockdownKernel(server string) string {
	if server != "" {
		server = "  server:\n" + server
	}
	return `policy_kernel:
` + server + `  agents:
    - name: default
      socket_path: "{{SOCK}}"
      timeout_ms: 500
  route_policies:
    - route_name: /keyed
      request_policy_chain: [{policy: apiKeyAuth}]
    - route_name: /audited
      request_policy_chain: [{policy: apiKeyAuth}]
      response_policy_chain: [{policy: addSecurityHeaders}]
`
}

// dialTLS is an Envoy whose ext_proc cluster uses tc.
func dialTLS(t *testing.T, e *testenv.Env, tc *tls.Config) *envoytest.Client {
	t.Helper()
	cfg := envoyConfig
	cfg.TLS = tc
	c, err := envoytest.Dial(e.KernelAddr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// tlsFiles writes a server certificate of ca and, when clientCA is set, the client CA file; it
// returns the server settings that name them.
func tlsFiles(t *testing.T, dir string, ca, clientCA *testCA, require bool) string {
	t.Helper()
	cert, key := ca.issue(t, "policy-kernel", false)
	writeFile(t, filepath.Join(dir, "server.crt"), cert)
	writeFile(t, filepath.Join(dir, "server.key"), key)
	s := fmt.Sprintf("    tls:\n      cert_file: %q\n      key_file: %q\n", filepath.Join(dir, "server.crt"), filepath.Join(dir, "server.key"))
	if clientCA != nil {
		writeFile(t, filepath.Join(dir, "client-ca.crt"), clientCA.pem)
		s += fmt.Sprintf("      client_ca_file: %q\n      require_client_cert: %v\n", filepath.Join(dir, "client-ca.crt"), require)
	}
	return s
}

// refusedAtTransport reports whether a request never reached the kernel's chain: the stream
// could not be opened (Envoy answers status_on_error with a gRPC error in its details).
func refusedAtTransport(s shot) bool {
	return s.err == nil && s.res.Forwarded == nil && strings.HasPrefix(s.res.Details, envoytest.DetailsGRPCErrorPrefix)
}

// TestLockdownTLS serves the ext_proc port over TLS: Envoy with the CA is served, a
// plaintext client is refused before any policy runs (it cannot probe API keys).
func TestLockdownTLS(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t, "server CA")
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: lockdownKernel(tlsFiles(t, dir, ca, nil, false))})

	if s := play(dialTLS(t, e, clientTLS(t, ca, nil, nil)), "/keyed", keyed("/keyed")); !served(s) {
		t.Fatalf("TLS client: %s", s.outcome())
	}
	if s := play(e.Dial(t, envoyConfig), "/keyed", keyed("/keyed")); !refusedAtTransport(s) {
		t.Fatalf("plaintext client on a TLS port: %s, want the stream refused", s.outcome())
	}
	if !strings.Contains(e.Kernel.Output(), `"tls":true`) {
		t.Fatalf("the serving line does not say TLS:\n%s", e.Kernel.Output())
	}
}

// TestLockdownMTLS requires client certificates: a client without one, or with one from
// another CA, is refused; Envoy with its certificate is served.
func TestLockdownMTLS(t *testing.T) {
	dir := t.TempDir()
	ca, clientCA, rogueCA := newTestCA(t, "server CA"), newTestCA(t, "client CA"), newTestCA(t, "rogue CA")
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: lockdownKernel(tlsFiles(t, dir, ca, clientCA, true))})

	cert, key := clientCA.issue(t, "envoy", true)
	if s := play(dialTLS(t, e, clientTLS(t, ca, cert, key)), "/keyed", keyed("/keyed")); !served(s) {
		t.Fatalf("client with a certificate: %s", s.outcome())
	}
	if s := play(dialTLS(t, e, clientTLS(t, ca, nil, nil)), "/keyed", keyed("/keyed")); !refusedAtTransport(s) {
		t.Fatalf("client without a certificate: %s, want refused", s.outcome())
	}
	rc, rk := rogueCA.issue(t, "envoy", true)
	if s := play(dialTLS(t, e, clientTLS(t, ca, rc, rk)), "/keyed", keyed("/keyed")); !refusedAtTransport(s) {
		t.Fatalf("client with a certificate of another CA: %s, want refused", s.outcome())
	}
	if s := play(e.Dial(t, envoyConfig), "/keyed", keyed("/keyed")); !refusedAtTransport(s) {
		t.Fatalf("plaintext client: %s, want refused", s.outcome())
	}
	// Each refusal is counted, and logged (throttled) with the remote address.
	if n := metric(t, e, `policy_kernel_tls_handshake_failures_total`); n < 3 {
		t.Fatalf("refused handshakes counted: %v, want at least 3", n)
	}
	testenv.WaitFor(t, 5*time.Second, "the refusal logged", func() bool {
		l := logLinesWith(t, e.Kernel.Output(), "ext_proc TLS handshake refused")
		return len(l) == 1 && l[0].Level == "warn" && l[0].Metadata["remote"] != nil
	})
}

// TestLockdownTLSRotation replaces the server certificate and the client CA while the kernel
// runs: new connections get the new ones, without a restart or a reload.
func TestLockdownTLSRotation(t *testing.T) {
	dir := t.TempDir()
	oldCA, newCA := newTestCA(t, "old CA"), newTestCA(t, "new CA")
	oldClients, newClients := newTestCA(t, "old client CA"), newTestCA(t, "new client CA")
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: lockdownKernel(tlsFiles(t, dir, oldCA, oldClients, true))})

	oc, ok := oldClients.issue(t, "envoy", true)
	nc, nk := newClients.issue(t, "envoy", true)
	if s := play(dialTLS(t, e, clientTLS(t, oldCA, oc, ok)), "/keyed", keyed("/keyed")); !served(s) {
		t.Fatalf("before rotation: %s", s.outcome())
	}
	if s := play(dialTLS(t, e, clientTLS(t, newCA, nc, nk)), "/keyed", keyed("/keyed")); !refusedAtTransport(s) {
		t.Fatalf("new CA before rotation: %s, want refused", s.outcome())
	}
	tlsFiles(t, dir, newCA, newClients, true)
	var s shot
	testenv.WaitFor(t, testenv.StartTimeout, "the rotated certificates to be served", func() bool {
		s = play(dialTLS(t, e, clientTLS(t, newCA, nc, nk)), "/keyed", keyed("/keyed"))
		return served(s)
	})
	if s := play(dialTLS(t, e, clientTLS(t, oldCA, oc, ok)), "/keyed", keyed("/keyed")); !refusedAtTransport(s) {
		t.Fatalf("old certificates after rotation: %s, want refused", s.outcome())
	}
	if n := metric(t, e, `policy_kernel_tls_reload_total{status="success"}`); n < 1 {
		t.Fatalf("tls reloads counted: %v", n)
	}
}

// TestLockdownMaxConnections holds connections that never speak: past max_connections the
// kernel closes new ones at once and counts them, and a connection that never finishes its
// handshake is closed after the handshake timeout, so it cannot hold its place.
func TestLockdownMaxConnections(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: lockdownKernel("    max_connections: 3\n")})
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for range 3 {
		c, err := net.Dial("tcp", e.KernelAddr)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	testenv.WaitFor(t, 5*time.Second, "3 connections counted", func() bool {
		return metric(t, e, `policy_kernel_connections_active`) == 3
	})
	// The fourth is closed at once: reading it ends without waiting.
	c, err := net.Dial("tcp", e.KernelAddr)
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Fatalf("fourth connection not closed: %v", err)
	}
	c.Close()
	if s := play(e.Dial(t, envoyConfig), "/keyed", keyed("/keyed")); !refusedAtTransport(s) {
		t.Fatalf("request past the limit: %s, want refused", s.outcome())
	}
	if n := metric(t, e, `policy_kernel_connections_refused_total`); n < 2 {
		t.Fatalf("connections refused counted: %v, want at least 2", n)
	}
	// The silent connections are closed by the handshake timeout (5 s); then Envoy is served.
	testenv.WaitFor(t, 10*time.Second, "the silent connections to be closed", func() bool {
		return metric(t, e, `policy_kernel_connections_active`) == 0
	})
	if s := play(e.Dial(t, envoyConfig), "/keyed", keyed("/keyed")); !served(s) {
		t.Fatalf("after the silent connections were closed: %s", s.outcome())
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

// TestLockdownIdleStream parks streams: one that sends nothing, and one that sends its
// request headers and then nothing. Both are ended after stream_idle_timeout_ms with a
// non-OK status (an OK end would be Envoy's "continue"), and counted. A request whose
// upstream answers after the idle time is refused, never let through unjudged.
func TestLockdownIdleStream(t *testing.T) {
	const idle = 1500 * time.Millisecond
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: lockdownKernel(fmt.Sprintf("    stream_idle_timeout_ms: %d\n", idle.Milliseconds()))})
	cc, err := grpc.NewClient(e.KernelAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	client := extprocv3.NewExternalProcessorClient(cc)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	silent, err := client.Process(ctx)
	if err != nil {
		t.Fatal(err)
	}
	parked, err := client.Process(ctx)
	if err != nil {
		t.Fatal(err)
	}
	hdrs := keyed("/audited")
	if err := parked.Send(requestHeaders(hdrs)); err != nil {
		t.Fatal(err)
	}
	if _, err := parked.Recv(); err != nil {
		t.Fatalf("request headers answer: %v", err)
	}
	start := time.Now()
	for name, st := range map[string]extprocv3.ExternalProcessor_ProcessClient{"silent": silent, "parked": parked} {
		_, err := st.Recv()
		if status.Code(err) != codes.DeadlineExceeded {
			t.Fatalf("%s stream ended with %v after %v, want DeadlineExceeded after about %v", name, err, time.Since(start), idle)
		}
	}
	if d := time.Since(start); d > idle+margin+time.Second {
		t.Fatalf("streams ended after %v, want about %v", d, idle)
	}
	if n := metric(t, e, `policy_kernel_streams_idle_closed_total`); n < 2 {
		t.Fatalf("idle streams counted: %v, want 2", n)
	}

	// Envoy's own stream whose upstream takes longer than the idle time: refused, not let
	// through without its response chain.
	c := e.Dial(t, envoyConfig)
	slow := func(*envoytest.Forwarded) *envoytest.Response {
		time.Sleep(idle + time.Second)
		return &envoytest.Response{Status: 200}
	}
	res, err := c.Do(ctx, keyed("/audited"), slow)
	if err != nil {
		t.Fatal(err)
	}
	if res.Status != 500 || testenv.Header(res.Headers, "x-content-type-options") != "" {
		t.Fatalf("slow upstream: %d %s, want 500 (the response chain never ran)", res.Status, res.Details)
	}
	// A quick one on the same connection is served with its response chain.
	res, err = c.Do(ctx, keyed("/audited"), okUpstream)
	if err != nil || res.Status != 200 || testenv.Header(res.Headers, "x-content-type-options") == "" {
		t.Fatalf("quick upstream: %v %+v", err, res)
	}
}

// requestHeaders is the request_headers message Envoy sends for r.
func requestHeaders(r *envoytest.Request) *extprocv3.ProcessingRequest {
	hm := &corev3.HeaderMap{}
	add := func(k, v string) { hm.Headers = append(hm.Headers, &corev3.HeaderValue{Key: k, RawValue: []byte(v)}) }
	add(":method", "GET")
	add(":path", r.Path)
	add(":authority", "api.example.com")
	add(":scheme", "http")
	for _, h := range r.Headers {
		add(h[0], h[1])
	}
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestHeaders{
		RequestHeaders: &extprocv3.HttpHeaders{Headers: hm, EndOfStream: true}}}
}

// TestLockdownDefaultAddress starts the kernel with no listen address in its config and no
// --listen: it binds loopback only.
func TestLockdownDefaultAddress(t *testing.T) {
	kbin, _ := testenv.Binaries(t)
	dir := t.TempDir()
	port := testenv.FreeAddr(t)
	_, p, _ := net.SplitHostPort(port)
	cfg := filepath.Join(dir, "kernel.yaml")
	writeFile(t, cfg, []byte(`policy_kernel:
  server:
    port: `+p+`
  agents:
    - name: default
      socket_path: "`+filepath.Join(dir, "agent.sock")+`"
  observability:
    metrics_port: -1
    admin_port: -1
`))
	k := testenv.Start(t, kbin, nil, "--config", cfg, "--agent-wait", "0s")
	testenv.WaitFor(t, testenv.StartTimeout, "the kernel to serve", func() bool {
		if k.Exited() {
			t.Fatalf("kernel exited:\n%s", k.Output())
		}
		return strings.Contains(k.Output(), "policy-kernel serving")
	})
	for _, l := range testenv.LogLines(t, k.Output()) {
		if l.Message == "policy-kernel serving" {
			if addr, _ := l.Metadata["address"].(string); addr != "127.0.0.1:"+p {
				t.Fatalf("default listen address %q, want 127.0.0.1:%s", addr, p)
			}
			return
		}
	}
	t.Fatalf("no serving line:\n%s", k.Output())
}

// TestLockdownPermissionsAtStartup starts both binaries, without --validate, on a config in a
// directory every user may write to: both refuse to start, exit 1 and say why. The same
// directory seen through a read-only bind mount (how Kubernetes mounts a ConfigMap) is
// accepted, where the test can make one.
func TestLockdownPermissionsAtStartup(t *testing.T) {
	kbin, abin := testenv.Binaries(t)
	root := t.TempDir()
	dir := filepath.Join(root, "etc")
	run := filepath.Join(root, "run")
	for _, d := range []string{dir, run} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	sock := filepath.Join(run, "agent.sock")
	kcfg, acfg := filepath.Join(dir, "kernel.yaml"), filepath.Join(dir, "agent.yaml")
	writeFile(t, kcfg, []byte(`policy_kernel:
  agents:
    - name: default
      socket_path: "`+sock+`"
  observability:
    metrics_port: -1
    admin_port: -1
`))
	writeFile(t, acfg, []byte(strings.NewReplacer("{{SOCK}}", sock, `  observability:
    metrics_address: "{{AGENT_METRICS}}"
`, "").Replace(agentYAML)))
	if err := os.Chmod(dir, os.ModeSticky|0o777); err != nil {
		t.Fatal(err)
	}
	want := `config directory "` + dir + `" is writable by every user (mode 1777)`
	refused := func(name, bin string, args ...string) {
		t.Helper()
		p := testenv.Start(t, bin, nil, args...)
		err, ok := p.Wait(testenv.StartTimeout)
		if !ok {
			t.Fatalf("%s started on a world-writable config directory:\n%s", name, p.Output())
		}
		if got := fatalLine(t, p.Output()); p.Cmd.ProcessState.ExitCode() != 1 || !strings.Contains(got, want) {
			t.Fatalf("%s: %v, output:\n%s\nwant exit 1 and %q", name, err, p.Output(), want)
		}
		t.Logf("reliability: %s on a world-writable config directory: exit 1: %s", name, strings.TrimSpace(p.Output()))
	}
	refused("agent", abin, "--config", acfg)
	refused("kernel", kbin, "--config", kcfg, "--listen", testenv.FreeAddr(t), "--agent-wait", "0s")

	// The same directory through a read-only bind mount: nobody can write there.
	ro := filepath.Join(root, "ro")
	if err := os.Mkdir(ro, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(dir, ro, "", unix.MS_BIND, ""); err != nil {
		t.Skipf("no bind mount here (%v): the read-only case is covered by internal/fsperm's unit test", err)
	}
	t.Cleanup(func() { unix.Unmount(ro, unix.MNT_DETACH) })
	if err := unix.Mount("", ro, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
		t.Skipf("no read-only remount here (%v)", err)
	}
	a := testenv.Start(t, abin, nil, "--config", filepath.Join(ro, "agent.yaml"))
	testenv.WaitDial(t, a, "unix", sock)
	addr := testenv.FreeAddr(t)
	k := testenv.Start(t, kbin, nil, "--config", filepath.Join(ro, "kernel.yaml"), "--listen", addr, "--agent-wait", "5s")
	testenv.WaitDial(t, k, "tcp", addr)
	// Stop both before the mount goes, so that it is not busy.
	t.Cleanup(func() { k.Stop(t); a.Stop(t) })
}

// fatalLine returns the errors of the JSON line a process writes when it stops on an error
// (level error, "fatal": true), one a line, or "" when there is none.
func fatalLine(t *testing.T, out string) string {
	t.Helper()
	for _, l := range testenv.LogLines(t, out) {
		if l.Level == "error" && l.Metadata["fatal"] == true {
			var errs []string
			list, _ := l.Metadata["errors"].([]any)
			for _, e := range list {
				s, _ := e.(string)
				errs = append(errs, s)
			}
			return strings.Join(errs, "\n")
		}
	}
	return ""
}

// logLines returns the lines of a process's JSON log with message msg.
func logLinesWith(t *testing.T, logs, msg string) []testenv.LogLine {
	t.Helper()
	var out []testenv.LogLine
	for _, l := range testenv.LogLines(t, logs) {
		if strings.Contains(l.Message, msg) {
			out = append(out, l)
		}
	}
	return out
}

// TestLockdownDebugLogs: at info nothing is logged per request; at debug (after a reload) the
// kernel logs the route it picked and how the agent call ended, the agent each policy's run
// and the context updates, credentials redacted; a request with no route is logged (throttled)
// and counted as no_route.
func TestLockdownDebugLogs(t *testing.T) {
	kernelYAML := lockdownKernel("")
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: kernelYAML})
	c := e.Dial(t, envoyConfig)
	traffic := func() {
		t.Helper()
		if s := play(c, "/keyed", keyed("/keyed?api_key=fault-key-1")); !served(s) {
			t.Fatalf("keyed request: %s", s.outcome())
		}
		// No route and no default_policy: it goes on without policy, and is counted.
		if s := play(c, "/elsewhere", request("/elsewhere")); s.outcome() != "upstream" {
			t.Fatalf("unrouted request: %s", s.outcome())
		}
	}
	traffic()
	// The first unrouted request logs its route name once (warn); let that line arrive first.
	time.Sleep(300 * time.Millisecond)
	kn, an := len(testenv.LogLines(t, e.Kernel.Output())), len(testenv.LogLines(t, e.Agent.Output()))
	traffic()
	time.Sleep(300 * time.Millisecond) // lines still in the pipes
	if k, a := len(testenv.LogLines(t, e.Kernel.Output())), len(testenv.LogLines(t, e.Agent.Output())); k != kn || a != an {
		t.Fatalf("at info, requests logged %d kernel and %d agent lines:\n%s\n%s", k-kn, a-an, e.Kernel.Output(), e.Agent.Output())
	}
	if n := metric(t, e, `policy_kernel_requests_total{route="",agent="",status="no_route"}`); n != 2 {
		t.Fatalf("no_route requests counted: %v, want 2", n)
	}

	writeAtomically(t, e, e.KernelConfig, kernelYAML+"  observability: {log_level: debug}\n")
	e.Reload(t, "config reloaded")
	writeAtomically(t, e, e.AgentConfig, agentYAML+"    log_level: debug\n")
	e.Agent.Reload(t, "config reloaded")
	time.Sleep(5100 * time.Millisecond) // past the throttle of the unrouted line
	traffic()
	// The logs arrive through pipes: wait for the last lines the traffic writes.
	testenv.WaitFor(t, 5*time.Second, "the debug lines", func() bool {
		return len(logLinesWith(t, e.Kernel.Output(), "no route and no default_policy")) > 0 && len(logLinesWith(t, e.Agent.Output(), "chain ran")) > 0
	})

	klog, alog := e.Kernel.Output(), e.Agent.Output()
	if strings.Contains(klog+alog, "fault-key-1") {
		t.Fatalf("the API key reached a log:\n%s\n%s", klog, alog)
	}
	if l := logLinesWith(t, klog, "route picked"); len(l) == 0 || l[len(l)-1].Level != "debug" || l[len(l)-1].Metadata["route"] != "/keyed" || l[len(l)-1].Metadata["path"] != "/keyed" {
		t.Fatalf("no debug line of the route picked (query string left out):\n%s", klog)
	}
	if l := logLinesWith(t, klog, "agent call answered"); len(l) == 0 || l[len(l)-1].Metadata["status"] != "OK" {
		t.Fatalf("no debug line of the agent call:\n%s", klog)
	}
	if l := logLinesWith(t, klog, "no route and no default_policy"); len(l) != 1 || l[0].Level != "debug" {
		t.Fatalf("unrouted request lines %d, want 1 at debug:\n%s", len(l), klog)
	}
	pl := logLinesWith(t, alog, "policy ran")
	if len(pl) == 0 || pl[len(pl)-1].Metadata["policy"] != "apiKeyAuth" || pl[len(pl)-1].Level != "debug" {
		t.Fatalf("no debug line of the policy's run:\n%s", alog)
	}
	if u := fmt.Sprint(pl[len(pl)-1].Metadata["updates"]); !strings.Contains(u, "set header x-user-id (10 bytes)") || strings.Contains(u, "fault-user") {
		t.Fatalf("context updates %q, want the header apiKeyAuth set", u)
	}
	if l := logLinesWith(t, alog, "chain ran"); len(l) == 0 {
		t.Fatalf("no debug line of the chain's run:\n%s", alog)
	}
}

// TestLockdownFailureLogLevels: a failed policy is an ERROR in both processes, an agent timeout
// a WARN, a retried call an INFO line; the reasons go with them.
func TestLockdownFailureLogLevels(t *testing.T) {
	routes := `    - route_name: /panics
      agent: closed
      request_policy_chain: [{policy: testPanic}]
    - route_name: /slow
      agent: closed
      request_policy_chain: [{policy: testSleep, metadata: {sleep_ms: 1500}}]
    - route_name: /keyed
      agent: closed
      request_policy_chain: [{policy: apiKeyAuth}]
`
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: twoAgents(300, 1000, routes), AgentBin: testenv.Build(t, testenv.TestAgentPackage)})
	c := e.Dial(t, envoyConfig)
	if s := play(c, "/panics", request("/panics")); s.outcome() != "500 policy_error" {
		t.Fatalf("failing policy: %s", s.outcome())
	}
	if s := play(c, "/slow", request("/slow")); s.outcome() != "500 policy_agent_timeout" {
		t.Fatalf("slow policy: %s", s.outcome())
	}
	// logs is read again at each try: a line reaches the test's copy of a process's output a
	// little after the answer it came with.
	level := func(logs func() string, msg string) string {
		t.Helper()
		var l []testenv.LogLine
		testenv.WaitFor(t, 5*time.Second, "a line "+msg, func() bool { l = logLinesWith(t, logs(), msg); return len(l) > 0 })
		return l[0].Level
	}
	if lv := level(e.Kernel.Output, "policy failed; request denied"); lv != "error" {
		t.Errorf("kernel's policy failure at %s, want error", lv)
	}
	if lv := level(e.Agent.Output, "policy failed"); lv != "error" {
		t.Errorf("agent's policy failure at %s, want error", lv)
	}
	if lv := level(e.Kernel.Output, "policy agent call failed"); lv != "warn" {
		t.Errorf("agent timeout at %s, want warn", lv)
	}
	e.Agent.Kill()
	if s := play(c, "/keyed", keyed("/keyed")); s.outcome() != "500 policy_agent_unavailable" {
		t.Fatalf("agent gone: %s", s.outcome())
	}
	var retry []testenv.LogLine
	testenv.WaitFor(t, 5*time.Second, "a retry line", func() bool {
		retry = logLinesWith(t, e.Kernel.Output(), "retrying")
		return len(retry) > 0
	})
	if retry[0].Level != "info" || retry[0].Metadata["agent"] != "closed" {
		t.Errorf("retry line %s", retry[0].Text)
	}
}

// TestPodEmptyDirSocketDirectory starts the agent and the kernel with their sockets in a
// world-writable directory: refused as it is, accepted when it is the mount of a pod's emptyDir
// volume (a bind mount from a path shaped like the kubelet's, as a pod sees it), the normal
// socket directory of a pod's containers.
func TestPodEmptyDirSocketDirectory(t *testing.T) {
	kbin, abin := testenv.Binaries(t)
	root := t.TempDir()
	etc, run := filepath.Join(root, "etc"), filepath.Join(root, "run")
	src := filepath.Join(root, "node", "pods", "6f1c", "volumes", "kubernetes.io~empty-dir", "run")
	for _, d := range []string{etc, run, src} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{run, src} {
		if err := os.Chmod(d, 0o777); err != nil {
			t.Fatal(err)
		}
	}
	sock := filepath.Join(run, "agents", "agent.sock")
	kcfg, acfg := filepath.Join(etc, "kernel.yaml"), filepath.Join(etc, "agent.yaml")
	writeFile(t, kcfg, []byte(`policy_kernel:
  agents:
    - name: default
      socket_path: "`+sock+`"
  route_policies:
    - route_name: /keyed
      request_policy_chain: [{policy: apiKeyAuth}]
  observability:
    metrics_port: -1
    admin_port: -1
`))
	writeFile(t, acfg, []byte(strings.NewReplacer("{{SOCK}}", sock, `  observability:
    metrics_address: "{{AGENT_METRICS}}"
`, "").Replace(agentYAML)))

	p := testenv.Start(t, abin, nil, "--config", acfg)
	if _, ok := p.Wait(testenv.StartTimeout); !ok || p.Cmd.ProcessState.ExitCode() != 1 || !strings.Contains(fatalLine(t, p.Output()), "is writable by every user") {
		t.Fatalf("agent with its socket in a plain world-writable directory: want exit 1, output:\n%s", p.Output())
	}

	if err := unix.Mount(src, run, "", unix.MS_BIND, ""); err != nil {
		t.Skipf("no bind mount here (%v): the emptyDir case is covered by internal/fsperm's unit test", err)
	}
	t.Cleanup(func() { unix.Unmount(run, unix.MNT_DETACH) })
	a := testenv.Start(t, abin, nil, "--config", acfg)
	testenv.WaitDial(t, a, "unix", sock)
	addr := testenv.FreeAddr(t)
	k := testenv.Start(t, kbin, nil, "--config", kcfg, "--listen", addr, "--agent-wait", "5s")
	testenv.WaitDial(t, k, "tcp", addr)
	c, err := envoytest.Dial(addr, envoyConfig)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	testenv.WaitFor(t, testenv.StartTimeout, "the keyed route to refuse a request without a key", func() bool {
		return play(c, "/keyed", request("/keyed")).outcome() == "401 unauthorized"
	})
	// Stop both before the mount goes, so that it is not busy.
	t.Cleanup(func() { k.Stop(t); a.Stop(t) })
}
