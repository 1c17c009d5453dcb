package agent

import (
	"context"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
)

// FuzzAgentConfig parses arbitrary agent configs: a config is refused with an error that names
// the file, or accepted with every default filled in, and loads into an executor (this test
// binary registers only the package's own test policies, which do no I/O).
func FuzzAgentConfig(f *testing.F) {
	f.Add([]byte("agent_core:\n  name: a\n  socket_path: /s.sock\n"))
	f.Add([]byte("agent_core:\n  name: a\n  socket_path: unix:///s.sock\n  server: {max_concurrent_requests: 5}\n  policies:\n    fail_on_unknown: true\n    config:\n      t.state: {fail: false}\n"))
	f.Add([]byte("agent_core:\n  name: a\n  socket_path: s\n  resource_limits: {max_body_size_bytes: -1}\n  observability: {log_level: loud}\n"))
	if b, err := os.ReadFile("../config/agent-config.yaml"); err == nil {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := ParseConfig("agent.yaml", data)
		if err != nil {
			if !strings.Contains(err.Error(), "agent.yaml") {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		c := cfg.AgentCore
		if c.Name == "" || c.SocketPath == "" || c.Server.MaxConcurrentRequests <= 0 || c.Server.RequestTimeoutMS <= 0 || c.Server.MaxChainDurationMS <= 0 ||
			c.ResourceLimits.MaxBodySizeBytes <= 0 || c.ResourceLimits.MaxStateSizeBytes <= 0 {
			t.Fatalf("accepted with settings out of bounds: %+v", c)
		}
		e := NewExecutor(logging.New(io.Discard, "agent", zerolog.ErrorLevel))
		if err := e.Load(c, "v"); err == nil {
			e.Close()
		}
	})
}

// FuzzExecute runs arbitrary PolicyRequests, as the agent receives them from the wire, through
// the executor: it answers every one, within its deadline, with a reply that marshals, echoes
// the request's ids and carries only instructions the kernel knows.
func FuzzExecute(f *testing.F) {
	seeds := []*agentv1.PolicyRequest{
		req(p("t.setHeader", "key", "x-a", "value", "1"), p("t.requireHeader", "key", "x-a", "want", "1")),
		req(p("t.state", "key", "k", "value", "v"), p("t.body", "value", "b"), p("t.query", "key", "q")),
		req(onFailure(p("t.fail"), "continue"), onFailure(p("t.panic"), "skip_remaining"), p("t.denyBare")),
		req(p("t.badInstruction"), p("nope"), p("t.sleep", "sleep", "1h")),
		req(cached(p("t.cached"), "s1", time.Minute), cached(p("t.cached", "want", "deny"), "s2", time.Second, `request.method`, `state["seen"]`)),
		req(cached(p("t.counter"), "s3", time.Minute, `request.query["q"]`), cached(p("t.cached"), "", 0, `1 +`)),
		req(shadowed(p("t.guard", "key", "x-k", "want", "v")), shadowed(p("t.setHeader", "key", "x-a", "value", "1")), shadowed(p("t.status", "value", "POLICY_ERROR")), shadowed(p("t.badInstruction"))),
		req(when(p("t.setHeader", "key", "x-a", "value", "1"), `request.method == "GET"`), when(p("t.guard", "key", "x-k", "want", "v"), `"user" in state`),
			onFailure(when(p("t.state", "key", "user", "value", "u"), `request.headers["x-none"] == ""`), "continue"), when(p("t.denyBare"), `bad ==`)),
		{RequestId: "r", CallId: 7, Phase: agentv1.PolicyPhase_RESPONSE, Policies: []*agentv1.Policy{p("t.responseOnly"), p("t.removeHeader", "key", "a")},
			Response: &agentv1.ResponseContext{StatusCode: 200, Headers: map[string]string{"a": "1"}, Body: []byte("x")}, State: map[string]string{"k": "v"}},
	}
	for _, s := range seeds {
		b, err := proto.Marshal(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	e := NewExecutor(logging.New(io.Discard, "agent", zerolog.ErrorLevel))
	if err := e.Load(testCore(), "v1"); err != nil {
		f.Fatal(err)
	}
	defer e.Close()
	f.Fuzz(func(t *testing.T, data []byte) {
		r := &agentv1.PolicyRequest{}
		if proto.Unmarshal(data, r) != nil {
			return // gRPC refuses it before the agent sees it
		}
		// The kernel always sends a deadline; a fuzzed t.sleep must not outlast the run.
		r.DeadlineMs = 20
		resp := e.Execute(context.Background(), r)
		if _, err := proto.Marshal(resp); err != nil {
			t.Fatalf("reply does not marshal: %v", err)
		}
		if resp.GetRequestId() != r.GetRequestId() || resp.GetCallId() != r.GetCallId() {
			t.Fatalf("reply ids %q/%d for request %q/%d", resp.GetRequestId(), resp.GetCallId(), r.GetRequestId(), r.GetCallId())
		}
		code := resp.GetStatus().GetCode()
		if resp.GetStatus() == nil || code > agentv1.StatusCode_TIMEOUT {
			t.Fatalf("reply status %v", resp.GetStatus())
		}
		immediate := false
		for _, in := range resp.GetInstructions() {
			switch in.GetType() {
			case agentv1.InstructionType_SET_HEADER, agentv1.InstructionType_REMOVE_HEADER:
				if in.GetHeader().GetKey() == "" {
					t.Fatalf("header instruction without a name: %v", in)
				}
			case agentv1.InstructionType_SET_STATE:
				if in.GetState().GetKey() == "" {
					t.Fatalf("state instruction without a key: %v", in)
				}
			case agentv1.InstructionType_IMMEDIATE_RESPONSE:
				if in.GetImmediateResponse() == nil {
					t.Fatalf("immediate response without a payload: %v", in)
				}
				immediate = true
			case agentv1.InstructionType_SET_BODY, agentv1.InstructionType_CONTINUE:
			default:
				t.Fatalf("instruction of unknown type %d", in.GetType())
			}
		}
		if code == agentv1.StatusCode_POLICY_DENIED && !immediate {
			t.Fatalf("denial without an immediate response: %v", resp)
		}
		if code == agentv1.StatusCode_OK && immediate {
			t.Fatalf("OK with an immediate response: %v", resp)
		}
		// A chain of shadow entries enforces nothing: it may only strip owned headers, and
		// only fails for a policy the agent lacks or a deadline.
		allShadow := len(r.GetPolicies()) > 0
		for _, pol := range r.GetPolicies() {
			allShadow = allShadow && pol.GetShadow()
		}
		if allShadow {
			if code == agentv1.StatusCode_POLICY_DENIED {
				t.Fatalf("shadow chain denied: %v", resp)
			}
			for _, in := range resp.GetInstructions() {
				if in.GetType() != agentv1.InstructionType_REMOVE_HEADER {
					t.Fatalf("shadow chain returned %v", in)
				}
			}
		}
	})
}
