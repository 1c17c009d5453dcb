package kernel

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"github.com/policy-engine/policy-engine/agent"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/redact"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// execAgent is an AgentClient that runs chains on a real agent executor in the test's process:
// the agent's own policies, its traces, and its answers to ValidateChains.
type execAgent struct{ exec *agent.Executor }

func (a execAgent) Execute(ctx context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
	return a.exec.Execute(ctx, req), nil
}

func (a execAgent) GetAgentConfig(context.Context) (*agentv1.GetAgentConfigResponse, error) {
	return a.exec.Describe(), nil
}

func (a execAgent) ValidateChains(_ context.Context, entries []*agentv1.ChainEntry) (*agentv1.ValidateChainsResponse, error) {
	return &agentv1.ValidateChainsResponse{Errors: a.exec.ValidateChains(entries), Facts: a.exec.EntryFacts(entries)}, nil
}

func (a execAgent) Check(ctx context.Context) error { return a.exec.HealthCheck(ctx) }
func (a execAgent) Close() error                    { return nil }

// newExecAgent loads an agent config with the apiKeyAuth key secret-1 (user alice).
func newExecAgent(t *testing.T) execAgent {
	t.Helper()
	cfg, err := agent.ParseConfig("agent.yaml", []byte(`agent_core:
  name: a
  socket_path: /unused.sock
  policies:
    config:
      apiKeyAuth:
        keys: [{key: secret-1, user_id: alice}]
`))
	if err != nil {
		t.Fatal(err)
	}
	exec := agent.NewExecutor(logging.New(io.Discard, "agent", zerolog.ErrorLevel))
	if err := exec.Load(cfg.AgentCore, "v"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(exec.Close)
	return execAgent{exec}
}

const explainKernelYAML = `policy_kernel:
  agents: [{name: a, socket_path: /unused.sock, timeout_ms: 2000}]
  server: {max_body_size_bytes: 4096}
  route_policies:
    - route_name: /api/v1/users
      request_policy_chain:
        - policy: apiKeyAuth
          metadata: {header_name: X-Tenant-Key}
  default_policy:
    request_policy_chain:
      - policy: allowAll
`

// explainAdmin is the kernel's /debug/explain handler over a kernel serving cfg with client as
// agent "a", and the buffer its logs go to.
func explainAdmin(t *testing.T, cfg string, client AgentClient) (http.Handler, *Server, *testenv.SyncBuffer) {
	t.Helper()
	kc, err := ParseConfig("kernel.yaml", []byte(cfg))
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewOfflineServer(kc.PolicyKernel, map[string]AgentClient{"a": client})
	if err != nil {
		t.Fatal(err)
	}
	logs := &testenv.SyncBuffer{}
	k := &Kernel{server: s, log: logging.New(logs, "kernel", zerolog.InfoLevel)}
	return k.adminRoutes()["/debug/explain"], s, logs
}

// postExplain POSTs body to h and returns the status and the decoded JSON answer.
func postExplain(t *testing.T, h http.Handler, body string) (int, http.Header, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/debug/explain", strings.NewReader(body)))
	if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("content-type %q", ct)
	}
	return rec.Code, rec.Header(), rec.Body.String()
}

func errorOf(t *testing.T, body string) string {
	t.Helper()
	var e struct{ Error string }
	if err := json.Unmarshal([]byte(body), &e); err != nil || e.Error == "" {
		t.Fatalf("not a JSON error: %s (%v)", body, err)
	}
	return e.Error
}

// TestExplainHandlerRefuses: /debug/explain takes POSTed JSON only, answers every refusal with
// a JSON error that says why, and runs at most maxExplains calls at once.
func TestExplainHandlerRefuses(t *testing.T) {
	h, _, logs := explainAdmin(t, explainKernelYAML, newExecAgent(t))

	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/debug/explain", nil))
	if rec.Code != http.StatusMethodNotAllowed || rec.Header().Get("Allow") != "POST" || !strings.Contains(errorOf(t, rec.Body.String()), "POST the request as JSON") {
		t.Fatalf("GET: %d %v %s", rec.Code, rec.Header(), rec.Body.String())
	}

	for _, c := range []struct{ body, want string }{
		{`{"path": "/x"`, "the request must be JSON"},
		{`{"path": "/x", "nope": 1}`, `unknown field "nope"`},
		{`{"path": "/x"} {}`, "the request must be one JSON object"},
		{`{"path": "x"}`, `path "x": it must start with /`},
		{`{"path": "/x", "headers": [[":authority", "h"]]}`, "pseudo-headers come from method, path and the host header"},
		{`{"path": "/x", "attributes": {"request.path": "/y"}}`, "only xds.route_name and source.address are sent"},
		{`{"path": "/x", "upstream": {"status": 42}}`, "upstream.status 42: not an HTTP status"},
	} {
		code, _, body := postExplain(t, h, c.body)
		if code != http.StatusBadRequest || !strings.Contains(errorOf(t, body), c.want) {
			t.Errorf("%s: %d %s, want 400 and %q", c.body, code, body, c.want)
		}
	}

	// The input is bounded by the config's body size: twice a body, and 1 MiB of JSON.
	big := `{"path": "/x", "body": "` + strings.Repeat("a", maxExplainInput+2*4096) + `"}`
	if code, _, body := postExplain(t, h, big); code != http.StatusRequestEntityTooLarge || !strings.Contains(errorOf(t, body), "too large") {
		t.Errorf("big: %d %.200s", code, body)
	}

	// maxExplains calls running: the next one is told to try again, and nothing runs.
	sem := h.(*explainHandler).sem
	for range maxExplains {
		sem <- struct{}{}
	}
	if code, _, body := postExplain(t, h, `{"path": "/x"}`); code != http.StatusTooManyRequests || !strings.Contains(errorOf(t, body), "4 explain calls are running") {
		t.Errorf("busy: %d %s", code, body)
	}
	<-sem
	if code, _, body := postExplain(t, h, `{"path": "/x"}`); code != http.StatusOK {
		t.Errorf("one slot free: %d %s", code, body)
	}
	if len(sem) != maxExplains-1 {
		t.Errorf("the call kept its slot: %d taken", len(sem))
	}
	if strings.Count(logs.String(), "request explained on the admin listener") != 1 {
		t.Errorf("audit logs: %s", logs.String())
	}

	// A kernel without a config yet.
	empty := &explainHandler{s: NewServer(logging.New(io.Discard, "kernel", zerolog.Disabled), newKernelMetrics()), sem: make(chan struct{}, 1)}
	if code, _, body := postExplain(t, empty, `{"path": "/x"}`); code != http.StatusServiceUnavailable || errorOf(t, body) != "no config loaded" {
		t.Errorf("no config: %d %s", code, body)
	}
	if _, err := empty.s.Explain(context.Background(), &ExplainInput{Path: "/"}); err == nil {
		t.Error("Explain without a config")
	}
}

// TestExplainHandlerReport: an explained request runs through the real chain and the agent's
// policies: the answer names the route, the rule that picked it, the chain and each entry's
// trace, and what the client gets; it never holds the API key (under the route's own header
// name), the Authorization value or a credential of the query, and neither does the audit log.
func TestExplainHandlerReport(t *testing.T) {
	h, _, logs := explainAdmin(t, explainKernelYAML, newExecAgent(t))

	code, hdr, body := postExplain(t, h, `{"method": "POST", "path": "/api/v1/users/7", "headers": [["host", "api.example.com"], ["content-type", "application/json"]], "body": "{}"}`)
	var rep ExplainReport
	if code != http.StatusOK || json.Unmarshal([]byte(body), &rep) != nil || hdr.Get("Cache-Control") != "no-store" {
		t.Fatalf("no key: %d %v %s", code, hdr, body)
	}
	if rep.Route != "/api/v1/users" || rep.Rule != "path prefix" || rep.Agent != "a" || rep.Invalid != "" ||
		len(rep.RequestChain) != 1 || rep.RequestChain[0].Policy != "apiKeyAuth" || len(rep.ResponseChain) != 0 || rep.AgentCalls != 1 {
		t.Fatalf("no key: %s", body)
	}
	if rep.Result.Status != 401 || !rep.Result.LocalReply || rep.Result.Forwarded != nil {
		t.Fatalf("no key: result %+v", rep.Result)
	}
	if len(rep.Traces) != 1 || rep.Traces[0].Phase != "request" || !strings.Contains(string(rep.Traces[0].Entry), `"outcome":"deny"`) ||
		!strings.Contains(string(rep.Traces[0].Entry), `"policy":"apiKeyAuth"`) {
		t.Fatalf("no key: traces %s", body)
	}

	code, _, body = postExplain(t, h, `{"path": "/api/v1/users/7?api_key=query-secret&page=2",
		"headers": [["host", "api.example.com"], ["X-Tenant-Key", "secret-1"], ["authorization", "Bearer bearer-secret"]],
		"attributes": {"source.address": "10.0.0.9:5000"},
		"upstream": {"status": 201, "headers": [["set-cookie", "sid=cookie-secret"], ["content-type", "text/plain"]], "body": "made"}}`)
	rep = ExplainReport{}
	if code != http.StatusOK || json.Unmarshal([]byte(body), &rep) != nil {
		t.Fatalf("good key: %d %s", code, body)
	}
	for _, secret := range []string{"secret-1", "bearer-secret", "query-secret", "cookie-secret"} {
		if strings.Contains(body, secret) || strings.Contains(logs.String(), secret) {
			t.Errorf("%s shown:\n%s\n%s", secret, body, logs.String())
		}
	}
	f := rep.Result.Forwarded
	if rep.Result.Status != 201 || rep.Result.LocalReply || f == nil || rep.Result.Body != "made" {
		t.Fatalf("good key: result %s", body)
	}
	if f.Method != "GET" || f.Authority != "api.example.com" || f.Path != "/api/v1/users/7?api_key=[redacted]&page=2" ||
		testenv.Header(f.Headers, "x-user-id") != "alice" || testenv.Header(f.Headers, "authorization") != redact.Redacted {
		t.Errorf("forwarded %+v", f)
	}
	if v := testenv.Header(f.Headers, "x-tenant-key"); v != "" && v != redact.Redacted {
		t.Errorf("the key header forwarded as %q", v)
	}
	if testenv.Header(rep.Result.Headers, "set-cookie") != redact.Redacted || testenv.Header(rep.Result.Headers, "content-type") != "text/plain" {
		t.Errorf("answer headers %q", rep.Result.Headers)
	}
	if len(rep.Traces) != 1 || !strings.Contains(string(rep.Traces[0].Entry), `"outcome":"allow"`) || !strings.Contains(string(rep.Traces[0].Entry), "alice") {
		t.Errorf("good key: traces %s", body)
	}
	testenv.CheckAuditLog(t, logs.String(), map[string]string{"request explained on the admin listener": "info"})
	if !strings.Contains(logs.String(), `"path":"/api/v1/users/7?api_key=[redacted]&page=2"`) || !strings.Contains(logs.String(), `"status":201`) {
		t.Errorf("audit log: %s", logs.String())
	}

	// The xds.route_name attribute picks the route before the path does.
	code, _, body = postExplain(t, h, `{"path": "/api/v1/users", "attributes": {"xds.route_name": "other"}}`)
	rep = ExplainReport{}
	if code != http.StatusOK || json.Unmarshal([]byte(body), &rep) != nil || rep.Route != "/api/v1/users" || rep.Rule != "path prefix" {
		t.Fatalf("unknown route name: %d %s", code, body)
	}
	code, _, body = postExplain(t, h, `{"path": "/elsewhere"}`)
	rep = ExplainReport{}
	if code != http.StatusOK || json.Unmarshal([]byte(body), &rep) != nil || rep.Route != "default" || rep.Rule != "default" ||
		rep.Result.Status != 200 || len(rep.RequestChain) != 1 || rep.RequestChain[0].Policy != "allowAll" {
		t.Fatalf("default: %d %s", code, body)
	}
}

// TestExplainOldAgent: an agent that predates PolicyRequest.explain answers without traces;
// the report counts its call and has an empty list of traces (not null), and the kernel asked
// it for them.
func TestExplainOldAgent(t *testing.T) {
	fa := &fakeAgent{info: testInfo()}
	_, s, _ := explainAdmin(t, baseConfig, fa)
	rep, err := s.Explain(context.Background(), &ExplainInput{Method: "GET", Path: "/api/v1/users", Headers: [][2]string{{"x-api-key", "k"}}})
	if err != nil {
		t.Fatal(err)
	}
	// Two calls: the request chain (auth) and the response chain (hdr).
	if rep.AgentCalls != 2 || rep.Traces == nil || len(rep.Traces) != 0 || rep.Result.Status != 200 || rep.Result.Forwarded == nil {
		t.Fatalf("%+v", rep)
	}
	if fa.ncalls() != 2 || !fa.call(0).GetExplain() || !fa.call(1).GetExplain() {
		t.Fatalf("the agent was not asked for traces: %d calls", fa.ncalls())
	}
	b, _ := json.Marshal(rep)
	if !bytes.Contains(b, []byte(`"traces":[]`)) {
		t.Errorf("%s", b)
	}
}

// TestRedactTrace: an entry's header and state values under credential names, and the headers
// of its immediate response, are hidden; the rest is kept.
func TestRedactTrace(t *testing.T) {
	tr := &agentv1.EntryTrace{Policy: "p", Instructions: []*agentv1.Instruction{
		{Payload: &agentv1.Instruction_Header{Header: &agentv1.HeaderInstruction{Key: "authorization", Value: "Bearer t"}}},
		{Payload: &agentv1.Instruction_Header{Header: &agentv1.HeaderInstruction{Key: "x-tenant-key", Value: "k"}}},
		{Payload: &agentv1.Instruction_Header{Header: &agentv1.HeaderInstruction{Key: "x-user-id", Value: "alice"}}},
		{Payload: &agentv1.Instruction_State{State: &agentv1.StateInstruction{Key: "access_token", Value: "t"}}},
		{Payload: &agentv1.Instruction_State{State: &agentv1.StateInstruction{Key: "user_id", Value: "alice"}}},
		{Payload: &agentv1.Instruction_ImmediateResponse{ImmediateResponse: &agentv1.ImmediateResponse{StatusCode: 401,
			Headers: map[string]string{"set-cookie": "s", "www-authenticate": "Bearer"}}}},
	}}
	redactTrace(redact.New([]string{"X-Tenant-Key"}), tr)
	ins := tr.GetInstructions()
	got := []string{ins[0].GetHeader().GetValue(), ins[1].GetHeader().GetValue(), ins[2].GetHeader().GetValue(),
		ins[3].GetState().GetValue(), ins[4].GetState().GetValue(), ins[5].GetImmediateResponse().GetHeaders()["set-cookie"],
		ins[5].GetImmediateResponse().GetHeaders()["www-authenticate"]}
	want := []string{redact.Redacted, redact.Redacted, "alice", redact.Redacted, "alice", redact.Redacted, "Bearer"}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("instruction %d: %q, want %q", i, got[i], want[i])
		}
	}
	if e := explainEntries([]*agentv1.Policy{{Name: "a", Shadow: true, OnFailure: "allow", Metadata: map[string]string{"header_name": "k"}}}); len(e) != 1 || e[0] != (ExplainEntry{Policy: "a", Shadow: true, OnFailure: "allow"}) {
		t.Errorf("entries %+v", e)
	}
}
