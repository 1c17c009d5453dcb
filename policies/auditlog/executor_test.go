package auditlog

import (
	"context"
	"io"
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/agent"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/policies/bodytransform"
	_ "github.com/policy-engine/policy-engine/policies/rolecheck"
	"github.com/rs/zerolog"
)

// TestThroughExecutor runs an exchange the way the agent does: the request chain records the
// start time in state, and the response chain [responseBodyTransform, auditLog] removes
// internal_id from the body and logs the transformed body, redacted.
func TestThroughExecutor(t *testing.T) {
	out := captureStdout(t)
	cfg, err := agent.ParseConfig("agent.yaml", []byte(`
agent_core:
  name: test
  socket_path: unix:///nonexistent.sock
  policies:
    config:
      auditLog:
        sink: stdout
        queue_size: 64
`))
	if err != nil {
		t.Fatal(err)
	}
	level, _ := logging.ParseLevel("error")
	e := agent.NewExecutor(logging.New(io.Discard, "agent", level))
	if err := e.Load(cfg.AgentCore, "v1"); err != nil {
		t.Fatal(err)
	}
	defer e.Close()

	rc := &agentv1.RequestContext{
		Method:  "GET",
		Path:    "/api/v1/users/7?api_key=SECRET-QUERY",
		Headers: map[string]string{"x-api-key": "SECRET-HEADER", "x-request-id": "req-9"},
	}
	reqResp := e.Execute(context.Background(), &agentv1.PolicyRequest{
		RequestId: "req-9",
		RouteName: "users",
		Phase:     agentv1.PolicyPhase_REQUEST,
		Policies:  []*agentv1.Policy{{Name: Name}},
		Context:   rc,
	})
	if reqResp.GetStatus().GetCode() != agentv1.StatusCode_OK {
		t.Fatalf("request phase: %v", reqResp)
	}
	// The kernel keeps SET_STATE instructions and sends them with the response phase.
	state := map[string]string{"user_id": "user-7"}
	for _, in := range reqResp.GetInstructions() {
		if st := in.GetState(); st != nil {
			state[st.GetKey()] = st.GetValue()
		}
	}
	if state[StateStart] == "" {
		t.Fatalf("request phase set no %s: %v", StateStart, reqResp.GetInstructions())
	}

	body := `{"id":7,"internal_id":"db-000123","name":"Ada","password":"SECRET-BODY","items":[{"internal_id":1,"sku":"A"}]}`
	resp := e.Execute(context.Background(), &agentv1.PolicyRequest{
		RequestId: "req-9",
		RouteName: "users",
		Phase:     agentv1.PolicyPhase_RESPONSE,
		Policies: []*agentv1.Policy{
			{Name: bodytransform.Name, Metadata: map[string]string{"remove_fields": `["internal_id","items.internal_id"]`}},
			{Name: Name, Metadata: map[string]string{"log_response_body": "true"}},
		},
		Context:  rc,
		State:    state,
		Response: &agentv1.ResponseContext{StatusCode: 200, Headers: map[string]string{"content-type": "application/json"}, Body: []byte(body)},
	})
	if resp.GetStatus().GetCode() != agentv1.StatusCode_OK {
		t.Fatalf("response phase: %v", resp)
	}
	var newBody string
	for _, in := range resp.GetInstructions() {
		if in.GetType() != agentv1.InstructionType_SET_BODY {
			t.Fatalf("unexpected instruction %v", in)
		}
		newBody = string(in.GetBody().GetBody())
	}
	// The client gets the body without internal_id; the password is the upstream's business.
	if want := `{"id":7,"name":"Ada","password":"SECRET-BODY","items":[{"sku":"A"}]}`; newBody != want {
		t.Fatalf("body = %s, want %s", newBody, want)
	}

	e.Close() // closes the factories, which flushes the audit log
	text := out.String()
	for _, s := range []string{"SECRET-QUERY", "SECRET-HEADER", "SECRET-BODY", "db-000123"} {
		if strings.Contains(text, s) {
			t.Errorf("%q in the audit log: %s", s, text)
		}
	}
	recs := parseRecords(t, text)
	if len(recs) != 1 {
		t.Fatalf("%d records, want 1: %s", len(recs), text)
	}
	r := recs[0]
	if r.RequestID != "req-9" || r.Route != "users" || r.Status != 200 || r.UserID != "user-7" ||
		r.Decision != "allowed" || r.DurationMS == nil || r.Path != "/api/v1/users/7?api_key=[REDACTED]" {
		t.Fatalf("record = %+v", r)
	}
	if want := `{"id":7,"name":"Ada","password":"[REDACTED]","items":[{"sku":"A"}]}`; r.ResponseBody == nil || *r.ResponseBody != want {
		t.Fatalf("logged body = %v, want %s", r.ResponseBody, want)
	}
}

// TestShadowRecorded checks that a request the chain allowed while a shadow entry would have
// refused it gets a record listing the shadow decision, and that a request no shadow entry
// would have refused gets none in the request phase.
func TestShadowRecorded(t *testing.T) {
	out := captureStdout(t)
	cfg, err := agent.ParseConfig("agent.yaml", []byte(`
agent_core:
  name: test
  socket_path: unix:///nonexistent.sock
  policies:
    config:
      auditLog: {sink: stdout, queue_size: 64}
`))
	if err != nil {
		t.Fatal(err)
	}
	e := agent.NewExecutor(logging.New(io.Discard, "agent", zerolog.ErrorLevel))
	if err := e.Load(cfg.AgentCore, "v1"); err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	run := func(id string, state map[string]string) {
		t.Helper()
		resp := e.Execute(context.Background(), &agentv1.PolicyRequest{
			RequestId: id, RouteName: "admin", Phase: agentv1.PolicyPhase_REQUEST, State: state,
			Policies: []*agentv1.Policy{
				{Name: "roleCheck", Metadata: map[string]string{"required_roles": "admin"}, Shadow: true},
				{Name: Name},
			},
			Context: &agentv1.RequestContext{Method: "GET", Path: "/admin"},
		})
		if resp.GetStatus().GetCode() != agentv1.StatusCode_OK {
			t.Fatalf("%s: %v", id, resp.GetStatus())
		}
	}
	run("no-role", nil)
	run("admin", map[string]string{"jwt.claims": `{"roles":["admin"]}`})
	e.Close()
	recs := parseRecords(t, out.String())
	if len(recs) != 1 {
		t.Fatalf("%d records, want 1: %s", len(recs), out)
	}
	r := recs[0]
	if r.RequestID != "no-role" || r.Decision != "allowed" || len(r.Shadow) != 1 ||
		r.Shadow[0].Policy != "roleCheck" || r.Shadow[0].Decision != "deny" || r.Shadow[0].Status != 403 {
		t.Fatalf("record = %+v", r)
	}
}
