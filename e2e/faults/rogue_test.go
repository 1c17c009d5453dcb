package faults

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/testenv"
	"github.com/policy-engine/policy-engine/internal/uds"
)

// rogueAgent is an agent that speaks the agent API but answers what the request's x-rogue header
// asks for: the replies a faulty or hostile agent could send. It serves Execute and
// ExecuteStream alike, and counts the chains it was asked to run.
type rogueAgent struct {
	agentv1.UnimplementedPolicyAgentServer
	calls atomic.Int64
}

// rogueReplies are the answers, by the x-rogue header's value, and the kernel's answer to each.
var rogueReplies = map[string]struct {
	reply func(req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error)
	want  string
}{
	"unknown-instruction": {func(req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		return okReply(req, &agentv1.Instruction{Type: agentv1.InstructionType(99)}), nil
	}, "500 invalid_agent_response"},
	"unknown-status": {func(req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		r := okReply(req)
		r.Status.Code = agentv1.StatusCode(42)
		return r, nil
	}, "500 invalid_agent_response"},
	"no-status": {func(req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		return &agentv1.PolicyResponse{RequestId: req.GetRequestId(), CallId: req.GetCallId()}, nil
	}, "500 invalid_agent_response"},
	// A reply for a call id the kernel never issued: the stream cannot be trusted, and the
	// calls waiting on it are invalid agent responses. (A late reply to a call that timed out
	// carries an id that was issued, and is dropped.)
	"other-call": {func(req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		r := okReply(req)
		r.CallId = req.GetCallId() + 1000
		return r, nil
	}, "500 invalid_agent_response"},
	"header-without-payload": {func(req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		return okReply(req, &agentv1.Instruction{Type: agentv1.InstructionType_SET_HEADER}), nil
	}, "500 invalid_agent_response"},
	"immediate-status-99": {func(req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		return okReply(req, &agentv1.Instruction{Type: agentv1.InstructionType_IMMEDIATE_RESPONSE,
			Payload: &agentv1.Instruction_ImmediateResponse{ImmediateResponse: &agentv1.ImmediateResponse{StatusCode: 99}}}), nil
	}, "500 invalid_agent_response"},
	"denied-without-response": {func(req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		r := okReply(req)
		r.Status.Code = agentv1.StatusCode_POLICY_DENIED
		return r, nil
	}, "403 forbidden"},
	"handler-error": {func(*agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		return nil, errors.New("rogue handler failed")
	}, "500 invalid_agent_response"},
	"unavailable-after-delivery": {func(*agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		return nil, status.Error(codes.Unavailable, "rogue agent going away")
	}, "upstream"}, // the route's agent is fail-open, and this is what fail_open is for
	"header-injection": {func(req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		return okReply(req,
			&agentv1.Instruction{Type: agentv1.InstructionType_SET_HEADER, Payload: &agentv1.Instruction_Header{Header: &agentv1.HeaderInstruction{Key: "x-a", Value: "1\r\nx-injected: 1"}}},
			&agentv1.Instruction{Type: agentv1.InstructionType_SET_HEADER, Payload: &agentv1.Instruction_Header{Header: &agentv1.HeaderInstruction{Key: "bad name", Value: "1"}}},
			&agentv1.Instruction{Type: agentv1.InstructionType_SET_HEADER, Payload: &agentv1.Instruction_Header{Header: &agentv1.HeaderInstruction{Key: "host", Value: "evil.example"}}},
			&agentv1.Instruction{Type: agentv1.InstructionType_REMOVE_HEADER, Payload: &agentv1.Instruction_Header{Header: &agentv1.HeaderInstruction{Key: ":path"}}},
		), nil
	}, "upstream"}, // every one of those mutations is dropped
	"fine": {func(req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		return okReply(req), nil
	}, "upstream"},
}

func okReply(req *agentv1.PolicyRequest, ins ...*agentv1.Instruction) *agentv1.PolicyResponse {
	return &agentv1.PolicyResponse{RequestId: req.GetRequestId(), CallId: req.GetCallId(), Instructions: ins,
		Status: &agentv1.ResponseStatus{Code: agentv1.StatusCode_OK}}
}

func (r *rogueAgent) answer(req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
	r.calls.Add(1)
	mode, ok := rogueReplies[req.GetContext().GetHeaders()["x-rogue"]]
	if !ok {
		return okReply(req), nil
	}
	return mode.reply(req)
}

func (r *rogueAgent) GetAgentConfig(context.Context, *agentv1.GetAgentConfigRequest) (*agentv1.GetAgentConfigResponse, error) {
	return &agentv1.GetAgentConfigResponse{AgentName: "rogue", AgentVersion: "rogue", SupportedPolicies: []*agentv1.PolicyInfo{
		{Name: "rogue", SupportedPhases: []agentv1.PolicyPhase{agentv1.PolicyPhase_REQUEST}},
	}}, nil
}

func (r *rogueAgent) Execute(_ context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
	return r.answer(req)
}

// ExecuteStream answers each call on the stream; a handler error ends the stream with it, as a
// broken agent would.
func (r *rogueAgent) ExecuteStream(st agentv1.PolicyAgent_ExecuteStreamServer) error {
	var mu sync.Mutex
	for {
		b, err := st.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		for _, req := range b.GetRequests() {
			if req.GetCancel() {
				continue
			}
			resp, err := r.answer(req)
			if err != nil {
				return err
			}
			mu.Lock()
			err = st.Send(&agentv1.PolicyResponseBatch{Responses: []*agentv1.PolicyResponse{resp}})
			mu.Unlock()
			if err != nil {
				return err
			}
		}
	}
}

// serveRogue serves a rogue agent on the socket until the test ends.
func serveRogue(t *testing.T, sock string) *rogueAgent {
	t.Helper()
	ln, err := uds.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	r := &rogueAgent{}
	agentv1.RegisterPolicyAgentServer(srv, r)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(srv.Stop)
	return r
}

// TestRogueAgent has the kernel talk to an agent that answers nonsense: unknown instructions and
// status codes, replies to other calls or without a status, handler errors, header injections.
// Each gets the specification's answer (§3.5: an invalid agent response is a 500, even for a
// fail-open agent), the kernel keeps serving, and no chain is sent twice.
func TestRogueAgent(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{NoAgent: true, KernelYAML: `policy_kernel:
  server: {message_timeout_ms: 500}
  agents:
    - name: rogue
      socket_path: "{{SOCK}}"
      timeout_ms: 400
      retry: {max_attempts: 3, backoff_ms: 10}
      health_check_interval_ms: 200
      fail_open: true
  route_policies:
    - route_name: /rogue
      request_policy_chain: [{policy: rogue}]
`})
	rogue := serveRogue(t, e.AgentSock)
	testenv.WaitFor(t, 10*time.Second, "the kernel to be ready", func() bool { code, _ := e.Get(t, "/health/ready"); return code == 200 })
	c := e.Dial(t, envoyConfig)
	var shots []shot
	for name, mode := range rogueReplies {
		before := rogue.calls.Load()
		s := play(c, "/rogue", request("/rogue", [2]string{"x-rogue", name}))
		shots = append(shots, s)
		if got := s.outcome(); got != mode.want {
			t.Errorf("%s: %s, want %s", name, got, mode.want)
		}
		if s.res != nil && s.res.Forwarded != nil {
			for _, h := range []string{"x-a", "x-injected", "bad name"} {
				if v := testenv.Header(s.res.Forwarded.Headers, h); v != "" {
					t.Errorf("%s: %s reached the upstream as %q", name, h, v)
				}
			}
			if s.res.Forwarded.Authority != "api.example.com" || s.res.Forwarded.Path != "/rogue" {
				t.Errorf("%s: authority %q, path %q", name, s.res.Forwarded.Authority, s.res.Forwarded.Path)
			}
		}
		if n := rogue.calls.Load() - before; n != 1 {
			t.Errorf("%s: the chain was sent %d times", name, n)
		}
		t.Logf("reliability: rogue agent: %s → %s in %v", name, s.outcome(), s.latency.Round(time.Millisecond))
		if s := play(c, "/rogue", request("/rogue", [2]string{"x-rogue", "fine"})); s.outcome() != "upstream" {
			t.Fatalf("after %s: %s", name, s.outcome())
		}
		alive(t, e)
	}
	tl := count(shots)
	if tl.lost() != 0 {
		t.Errorf("%d requests lost", tl.lost())
	}
	tl.report(t, "rogue agent replies")
}
