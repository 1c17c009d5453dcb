package e2e

import (
	"encoding/json"
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

// TestPolicyctlExplainKernel explains requests on a running kernel (its admin listener's
// /debug/explain, through the live snapshot and the live agent) with the real binaries: a
// 401, a 403, a 200 with a shadow entry, a refused JWT; the endpoint is not on the metrics
// listener; no credential is ever printed.
func TestPolicyctlExplainKernel(t *testing.T) {
	ctl := testenv.Build(t, "github.com/policy-engine/policy-engine/cmd/policyctl")
	kernelCfg := strings.Replace(exampleConfig(t, "kernel-config.yaml"), `        - policy: "rateLimit"
`, `        - policy: "rateLimit"
          mode: shadow
`, 1)
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: exampleConfig(t, "agent-config.yaml"), KernelYAML: kernelCfg, AgentEnv: []string{demoKeyEnv}})
	admin := "http://" + e.AdminAddr
	token := "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
	secrets := []string{"demo-key-123", "wrong-key", "eyJ", "a52782e3a2d4dd2f95f6"}
	oneSpace := regexp.MustCompile(` +`)
	explain := func(code int, args ...string) string {
		t.Helper()
		out, errOut, got := runCtl(t, ctl, nil, append([]string{"explain", "--kernel-admin", admin, "--message-timeout", "5s"}, args...)...)
		if got != code {
			t.Fatalf("explain %q: exit %d, want %d\n%s%s", args, got, code, out, errOut)
		}
		for _, s := range secrets {
			if strings.Contains(out+errOut, s) {
				t.Errorf("explain %q shows the credential %q:\n%s", args, s, out)
			}
		}
		return oneSpace.ReplaceAllString(out, " ")
	}
	has := func(out string, want ...string) {
		t.Helper()
		for _, s := range want {
			if !strings.Contains(out, s) {
				t.Errorf("explain output lacks %q:\n%s", s, out)
			}
		}
	}

	// The README's command, on this kernel's admin address.
	var readme []string
	for _, l := range readmeCommands(t, "bin/policyctl explain") {
		if strings.Contains(l, "--kernel-admin") {
			readme = append(readme, l)
		}
	}
	if len(readme) != 1 {
		t.Fatalf("README explain --kernel-admin commands: %q", readme)
	}
	_, words := shellWords(t, strings.Replace(readme[0], "http://127.0.0.1:9190", admin, 1))
	if words[2] != "--kernel-admin" || words[3] != admin {
		t.Fatalf("README command %q", readme[0])
	}
	out := explain(0, words[4:]...)
	has(out, "1. apiKeyAuth allow (", "\n 200\n")

	out = explain(1, "GET", "/api/v1/users")
	has(out, "route: /api/v1/users (picked by path prefix", "request chain:\n 1. apiKeyAuth deny (", "\n 2. rateLimit (shadow) not run",
		"response chain:\n 1. addSecurityHeaders not run", "local reply 401")
	out = explain(1, "GET", "/api/v1/users", "-H", "X-API-Key: wrong-key")
	has(out, "1. apiKeyAuth deny (", "local reply 403")
	out = explain(0, "GET", "/api/v1/users", "-H", "X-API-Key: demo-key-123")
	has(out, "1. apiKeyAuth allow (", "set header x-user-id: api-client", "set state user_id = api-client",
		"2. rateLimit (shadow) shadow (", "1. addSecurityHeaders allow (", "set header x-frame-options: DENY",
		"x-api-key: [redacted]", "\n 200\n")
	t.Logf("policyctl explain --kernel-admin, a 200:\n%s", out)
	out = explain(1, "--route", "/api/v1/admin", "POST", "/elsewhere", "-H", "Authorization: "+token)
	has(out, "route: /api/v1/admin (picked by attribute", "1. auditLog allow (", "2. jwtValidation deny (", "3. roleCheck not run", "local reply 401")

	// --json carries the same explanation.
	raw := explain(0, "--json", "GET", "/api/v1/users", "-H", "X-API-Key: demo-key-123")
	var rep struct {
		Outcome string
		Explain struct {
			RequestChain []struct{ Policy, Outcome string } `json:"request_chain"`
		}
	}
	if err := json.Unmarshal([]byte(raw), &rep); err != nil || rep.Outcome != "upstream" || len(rep.Explain.RequestChain) != 2 ||
		rep.Explain.RequestChain[1].Outcome != "shadow" {
		t.Fatalf("--json: %v %+v\n%s", err, rep, raw)
	}

	// The endpoint itself: secrets redacted in its JSON too; POST only; admin listener only.
	post := func(addr, body string) (int, string) {
		t.Helper()
		r, err := http.Post("http://"+addr+"/debug/explain", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer r.Body.Close()
		b, _ := io.ReadAll(r.Body)
		return r.StatusCode, string(b)
	}
	code, body := post(e.AdminAddr, `{"method":"GET","path":"/api/v1/users?api_key=demo-key-123","headers":[["x-api-key","demo-key-123"],["authorization","`+token+`"]]}`)
	if code != 200 || !strings.Contains(body, `"agent_calls":2`) || !strings.Contains(body, `"[redacted]"`) {
		t.Fatalf("POST /debug/explain: %d %s", code, body)
	}
	for _, s := range secrets {
		if strings.Contains(body, s) {
			t.Errorf("/debug/explain shows %q: %s", s, body)
		}
	}
	if code, body := post(e.AdminAddr, `{"path":"no-slash"}`); code != 400 || !strings.Contains(body, "must start with /") {
		t.Errorf("bad request: %d %s", code, body)
	}
	if code, _ := e.GetAdmin(t, "/debug/explain"); code != 405 {
		t.Errorf("GET /debug/explain: %d, want 405", code)
	}
	if code, _ := post(e.MetricsAddr, `{"path":"/api/v1/users"}`); code != 404 {
		t.Errorf("/debug/explain on the metrics listener: %d, want 404", code)
	}
	// The kernel logs that a request was explained, without its credentials.
	logs := e.Kernel.Logs.String()
	if !strings.Contains(logs, "request explained on the admin listener") {
		t.Errorf("no log line of the explained requests:\n%s", logs)
	}
	for _, s := range secrets {
		if strings.Contains(logs, s) {
			t.Errorf("the kernel's log shows %q", s)
		}
	}

	// policyctl pointed at the metrics listener or nothing: a clear error.
	if _, errOut, code := runCtl(t, ctl, nil, "explain", "--kernel-admin", "http://"+e.MetricsAddr, "/api/v1/users"); code != 2 || !strings.Contains(errOut, "has no /debug/explain") {
		t.Errorf("metrics listener: exit %d: %s", code, errOut)
	}
	if _, errOut, code := runCtl(t, ctl, nil, "explain", "--kernel-admin", "http://"+testenv.FreeAddr(t), "/api/v1/users"); code != 2 || !strings.Contains(errOut, "cannot reach the kernel's admin listener") {
		t.Errorf("nothing there: exit %d: %s", code, errOut)
	}
}

// TestPolicyctlExplainKernelSkip explains, on a running kernel, a request whose chain the
// kernel lets go without the agent (every entry's when condition false): each entry shows as
// skipped, decided by the kernel, and no agent call is made; a POST on the same route runs
// the entry on the agent.
func TestPolicyctlExplainKernelSkip(t *testing.T) {
	ctl := testenv.Build(t, "github.com/policy-engine/policy-engine/cmd/policyctl")
	kernelCfg := `policy_kernel:
  agents: [{name: default-agent, socket_path: "{{SOCK}}"}]
  route_policies:
    - route_name: /w
      request_policy_chain:
        - policy: apiKeyAuth
          metadata: {header_name: X-API-Key}
          when: 'request.method != "GET"'
`
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: exampleConfig(t, "agent-config.yaml"), KernelYAML: kernelCfg, AgentEnv: []string{demoKeyEnv}})
	explain := func(code int, args ...string) string {
		t.Helper()
		out, errOut, got := runCtl(t, ctl, nil, append([]string{"explain", "--kernel-admin", "http://" + e.AdminAddr}, args...)...)
		if got != code {
			t.Fatalf("explain %q: exit %d, want %d\n%s%s", args, got, code, out, errOut)
		}
		return regexp.MustCompile(` +`).ReplaceAllString(out, " ")
	}
	out := explain(0, "GET", "/w")
	for _, want := range []string{"1. apiKeyAuth skipped", "the kernel decided, the agent was not called", `when: request.method != "GET"`} {
		if !strings.Contains(out, want) {
			t.Errorf("GET: explain output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "predates") {
		t.Errorf("a kernel skip explained as an old agent:\n%s", out)
	}
	out = explain(1, "POST", "/w")
	if !strings.Contains(out, "1. apiKeyAuth deny (") || !strings.Contains(out, "local reply 401") {
		t.Errorf("POST: explain output:\n%s", out)
	}
}
