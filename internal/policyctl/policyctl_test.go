package policyctl

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/internal/headers"
	"github.com/policy-engine/policy-engine/internal/redact"
	_ "github.com/policy-engine/policy-engine/policies/all"
)

func TestParseHeaders(t *testing.T) {
	got, err := parseHeaders("-H", []string{"X-API-Key: demo ", "Accept:application/json", "X-Empty:"})
	if err != nil || !slices.Equal(got, [][2]string{{"x-api-key", "demo"}, {"accept", "application/json"}, {"x-empty", ""}}) {
		t.Fatalf("%q %v", got, err)
	}
	for _, bad := range []string{"X-API-Key", ": v", "bad name: v", "x-a: se\x01cret"} {
		_, err := parseHeaders("-H", []string{bad})
		if err == nil {
			t.Errorf("%q accepted", bad)
			continue
		}
		// The value may be a credential: the error never shows it.
		if strings.Contains(err.Error(), "se\x01cret") || !strings.Contains(err.Error(), "-H") {
			t.Errorf("%q: %v", bad, err)
		}
	}
}

// FuzzParseHeaders: any flag value is a header Envoy would accept, or an error; never a panic.
func FuzzParseHeaders(f *testing.F) {
	for _, s := range []string{"X-API-Key: demo-key-123", "a:b:c", ":", "x:\t", "é: v"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		hs, err := parseHeaders("-H", []string{s})
		if err != nil {
			return
		}
		if len(hs) != 1 || headers.ValidName(hs[0][0]) != nil || headers.ValidValue(hs[0][1]) != nil || hs[0][0] != strings.ToLower(hs[0][0]) {
			t.Fatalf("%q parsed as %q", s, hs)
		}
	})
}

func TestParseInterleaved(t *testing.T) {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	var rf requestFlags
	rf.register(fs)
	pos, err := parseInterleaved(fs, []string{"-H", "a: 1", "POST", "--route", "r", "/p", "-H", "b: 2", "--", "-x"})
	if err != nil || !slices.Equal(pos, []string{"POST", "/p", "-x"}) || rf.route != "r" || len(rf.headers) != 2 {
		t.Fatalf("%q %v %+v", pos, err, rf)
	}
	if _, _, err := rf.request([]string{"POST", "p"}); err == nil {
		t.Fatal("a path without / accepted")
	}
	if _, _, err := rf.request([]string{"A", "B", "/c"}); err == nil {
		t.Fatal("three positional arguments accepted")
	}
	rf.upstreamStatus = 42
	if _, _, err := rf.request([]string{"/c"}); err == nil {
		t.Fatal("upstream status 42 accepted")
	}
}

func TestRedactor(t *testing.T) {
	r := newRedactor([]string{"X-Tenant-Key"})
	for name, want := range map[string]bool{
		"authorization": true, "X-API-Key": true, "cookie": true, "set-cookie": true, "x-session-id": true,
		"x-auth-token": true, "x-tenant-key": true, "x-user-id": false, "content-type": false, "x-request-id": false,
	} {
		if r.Sensitive(name) != want {
			t.Errorf("%s: sensitive %v, want %v", name, !want, want)
		}
	}
	if got := r.path("/a?api_key=s1&x=1&access%5Ftoken=s2&sig=s3&flag"); got != "/a?api_key=[redacted]&x=1&access%5Ftoken=[redacted]&sig=[redacted]&flag" {
		t.Errorf("path %s", got)
	}
	d := r.diff([][2]string{{"a", "1"}, {"b", "2"}, {"x-api-key", "k"}, {"v", "1"}, {"v", "2"}},
		[][2]string{{"a", "1"}, {"b", "3"}, {"c", "4"}, {"authorization", "Bearer t"}, {"v", "1"}, {"v", "2"}})
	want := []Mutation{{"changed", "b", "3"}, {"added", "c", "4"}, {"added", "authorization", redact.Redacted}, {"removed", "x-api-key", ""}}
	if !slices.Equal(d, want) {
		t.Errorf("diff %+v", d)
	}
}

// TestMainUsage: usage errors exit 2 and say why; -h exits 0.
func TestMainUsage(t *testing.T) {
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{nil, ExitError, "usage:"},
		{[]string{"frobnicate"}, ExitError, `unknown command "frobnicate"`},
		{[]string{"check", "-h"}, 0, "policyctl check"},
		{[]string{"check", "--nope", "/"}, ExitError, "flag provided but not defined"},
		{[]string{"explain", "/"}, ExitError, "--config kernel.yaml --agent-config agent.yaml"},
		{[]string{"explain", "--kernel", "127.0.0.1:9001", "/"}, ExitError, "the ext_proc port (--kernel) does not explain requests"},
		{[]string{"explain", "--config", "/nonexistent/k.yaml", "--agent-config", "/nonexistent/a.yaml", "/"}, ExitError, "k.yaml"},
		{[]string{"check", "--body", "@/nonexistent/body", "/"}, ExitError, "--body"},
	} {
		var out, errOut bytes.Buffer
		if code := Main(t.Context(), c.args, &out, &errOut); code != c.code || !strings.Contains(out.String()+errOut.String(), c.want) {
			t.Errorf("%q: exit %d, output %s%s; want %d and %q", c.args, code, out.String(), errOut.String(), c.code, c.want)
		}
	}
}

const explainKernel = `policy_kernel:
  agents:
    - name: a
      socket_path: /unused/a.sock
      timeout_ms: 1000
  route_policies:
    - route_name: /upload
      request_policy_chain:
        - policy: apiKeyAuth
          metadata: {header_name: X-Tenant-Key}
        - policy: apiKeyAuth
          metadata: {header_name: X-Other-Key}
          mode: shadow
      response_policy_chain:
        - policy: addSecurityHeaders
          metadata: {headers: {X-Early: "1"}}
    - route_name: /broken
      request_policy_chain:
        - policy: addSecurityHeaders
  default_policy:
    request_policy_chain:
      - policy: allowAll
`

const explainAgent = `agent_core:
  name: a
  socket_path: /unused/a.sock
  policies:
    config:
      apiKeyAuth:
        keys:
          - key_sha256: "a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873"
            user_id: u
`

// TestExplainOffline: explain in-process, with a shadow entry and a credential header named by
// the route's own config, which is never printed; a wrong agent name is a clear error.
func TestExplainOffline(t *testing.T) {
	dir := t.TempDir()
	k, a := filepath.Join(dir, "k.yaml"), filepath.Join(dir, "a.yaml")
	if err := os.WriteFile(k, []byte(explainKernel), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(a, []byte(explainAgent), 0o600); err != nil {
		t.Fatal(err)
	}
	var out, errOut bytes.Buffer
	code := Main(t.Context(), []string{"explain", "--config", k, "--agent-config", a, "--message-timeout", "5s", "POST", "/upload/x", "-H", "X-Tenant-Key: demo-key-123", "--body", "data"}, &out, &errOut)
	text := out.String()
	if code != ExitUpstream || !strings.Contains(text, "route: /upload (picked by path prefix") ||
		!strings.Contains(text, "apiKeyAuth (shadow)") || !strings.Contains(text, "shadow (") || !strings.Contains(text, "set header x-early: 1") ||
		!strings.Contains(text, "set header x-user-id: u") || !strings.Contains(text, "set state user_id = u") ||
		!strings.Contains(text, "x-tenant-key: [redacted]") || strings.Contains(text+errOut.String(), "demo-key-123") {
		t.Fatalf("exit %d\n%s%s", code, text, errOut.String())
	}

	out.Reset()
	errOut.Reset()
	if code := Main(t.Context(), []string{"explain", "--config", k, "--agent-config", a, "--message-timeout", "5s", "GET", "/"}, &out, &errOut); code != ExitUpstream ||
		!strings.Contains(out.String(), "route: default (picked by default") || !strings.Contains(out.String(), "1. allowAll") {
		t.Fatalf("default: exit %d\n%s%s", code, out.String(), errOut.String())
	}

	// An invalid route: refused, and explain says why.
	out.Reset()
	errOut.Reset()
	if code := Main(t.Context(), []string{"explain", "--config", k, "--agent-config", a, "--route", "/broken", "GET", "/"}, &out, &errOut); code != ExitRefused ||
		!strings.Contains(out.String(), "route: /broken (picked by attribute") || !strings.Contains(out.String(), `the route is refused: policy "addSecurityHeaders" does not run in the request phase`) {
		t.Fatalf("invalid: exit %d\n%s%s", code, out.String(), errOut.String())
	}

	if err := os.WriteFile(a, []byte(strings.Replace(explainAgent, "name: a", "name: b", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	errOut.Reset()
	if code := Main(t.Context(), []string{"explain", "--config", k, "--agent-config", a, "/"}, &out, &errOut); code != ExitError ||
		!strings.Contains(errOut.String(), `agent "a" of the kernel config has no agent config`) {
		t.Fatalf("wrong agent: exit %d %s", code, errOut.String())
	}
}
