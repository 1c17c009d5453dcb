package kernel

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// TestBrokenAgentExchangeDeniesEvenFailOpen: fail_open covers an agent that cannot be reached or
// does not answer in time. An agent that was reached and whose answer cannot be used (it did not
// marshal or unmarshal, was too large, or carried no status) is an invalid agent response: 500,
// whatever fail_open says.
func TestBrokenAgentExchangeDeniesEvenFailOpen(t *testing.T) {
	cfg := strings.Replace(baseConfig, "timeout_ms: 50", failOpenConfig, 1)
	f := func(name string, resp *agentv1.PolicyResponse, err error, wantCode string) {
		t.Helper()
		fa := &fakeAgent{fn: func(context.Context, *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) { return resp, err }}
		k := newTestKernel(t, cfg, fa)
		st := k.open(t)
		r := st.send(t, reqHeaders("/api/v1/users", true, ""))
		st.end(t)
		if wantCode == "" {
			if r.GetRequestHeaders() == nil {
				t.Errorf("%s: fail-open must continue, got %v", name, r)
			}
			return
		}
		ir := r.GetImmediateResponse()
		if ir.GetStatus().GetCode() != 500 || jsonErrorOf(t, ir) != wantCode {
			t.Errorf("%s: got %v, want 500 %s", name, r, wantCode)
		}
	}
	f("reply did not unmarshal", nil, status.Error(codes.Internal, "grpc: failed to unmarshal the received message: string field contains invalid UTF-8"), "invalid_agent_response")
	f("agent could not marshal its reply", nil, status.Error(codes.Internal, "grpc: error while marshaling: string field contains invalid UTF-8"), "invalid_agent_response")
	f("reply over the size limit", nil, status.Error(codes.ResourceExhausted, "grpc: received message larger than max (3145728 vs. 2097152)"), "invalid_agent_response")
	f("handler error", nil, status.Error(codes.Unknown, "boom"), "invalid_agent_response")
	f("not an agent", nil, status.Error(codes.Unimplemented, "unknown service policyengine.agent.v1.PolicyAgent"), "invalid_agent_response")
	f("reply without a status", &agentv1.PolicyResponse{}, nil, "invalid_agent_response")
	f("no reply at all", nil, nil, "invalid_agent_response")
	// What fail_open is for still continues.
	f("unavailable", nil, status.Error(codes.Unavailable, "connection refused"), "")
	f("deadline", nil, status.Error(codes.DeadlineExceeded, "deadline exceeded"), "")
	f("context deadline", nil, context.DeadlineExceeded, "")
}

// TestStreamCancelledDuringAgentCall: Envoy resets a stream whenever its HTTP request ends, also
// while the agent is still deciding (the client went away). That is a normal end: the agent call
// is cancelled, and nothing is logged or counted as an agent failure.
func TestStreamCancelledDuringAgentCall(t *testing.T) {
	cfg := strings.Replace(baseConfig, "policy_kernel:\n", "policy_kernel:\n  server: {message_timeout_ms: 5000}\n", 1)
	cfg = strings.Replace(cfg, "timeout_ms: 50\n", "timeout_ms: 4000\n", 1)
	inCall := make(chan struct{})
	cancelled := make(chan struct{})
	fa := &fakeAgent{fn: func(ctx context.Context, _ *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		close(inCall)
		<-ctx.Done()
		close(cancelled)
		return nil, status.FromContextError(ctx.Err()).Err()
	}}
	k := newTestKernel(t, cfg, fa)
	st := k.open(t)
	st.in <- reqHeaders("/api/v1/users", true, "")
	<-inCall
	if err := st.end(t); err != nil {
		t.Fatalf("Process returned %v", err)
	}
	select {
	case <-cancelled:
	case <-time.After(time.Second):
		t.Fatal("the agent call was not cancelled with the stream")
	}
	if n := k.state.metrics.unavailable.Get() + k.state.metrics.timeouts.Get(); n != 0 {
		t.Errorf("a cancelled stream counted %d agent failures", n)
	}
	if strings.Contains(k.logs.String(), "policy agent call failed") {
		t.Errorf("a cancelled stream was logged as an agent failure:\n%s", k.logs.String())
	}
}

// TestEachFailureKindIsLogged: failures are logged at most once per interval so that a failure
// on every request does not flood the log, but each kind on its own: a client that can make a
// policy fail, or send broken streams, at will must not be able to keep the agent's failures
// out of the log.
func TestEachFailureKindIsLogged(t *testing.T) {
	fa := &fakeAgent{fn: func(_ context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		switch req.GetContext().GetHeaders()["x-fail"] {
		case "policy":
			return &agentv1.PolicyResponse{Status: &agentv1.ResponseStatus{Code: agentv1.StatusCode_POLICY_ERROR}, Message: "boom"}, nil
		case "reply":
			return ok(&agentv1.Instruction{Type: agentv1.InstructionType(77)}), nil
		}
		return nil, status.Error(codes.Unavailable, "connection refused")
	}}
	k := newTestKernel(t, baseConfig, fa)
	for _, kind := range []string{"policy", "reply", "agent", "policy", "reply", "agent"} {
		st := k.open(t)
		st.send(t, reqHeaders("/api/v1/users", true, "", "x-fail", kind))
		st.end(t)
	}
	st := k.open(t)
	st.sendErr(t, reqBody("x"))
	logs := k.logs.String()
	for _, want := range []string{"policy failed; request denied", "invalid agent response; request denied", "policy agent call failed", "ext_proc protocol error"} {
		if n := strings.Count(logs, want); n != 1 {
			t.Errorf("%q logged %d times, want once:\n%s", want, n, logs)
		}
	}
}

// TestRetriesBoundedByMaxAttempts: a call that never reached the agent is tried at most
// max_attempts times; one that reached it (a policy may have run) or timed out, once.
func TestRetriesBoundedByMaxAttempts(t *testing.T) {
	f := func(maxAttempts int, agentErr error, wantCalls int) {
		t.Helper()
		var calls atomic.Int32
		fa := &fakeAgent{fn: func(ctx context.Context, _ *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
			calls.Add(1)
			if errors.Is(agentErr, context.DeadlineExceeded) {
				<-ctx.Done()
			}
			return nil, agentErr
		}}
		cfg := strings.Replace(baseConfig, "retry: {max_attempts: 3, backoff_ms: 1}", fmt.Sprintf("retry: {max_attempts: %d, backoff_ms: 1}", maxAttempts), 1)
		k := newTestKernel(t, cfg, fa)
		st := k.open(t)
		st.send(t, reqHeaders("/api/v1/users", true, ""))
		st.end(t)
		if int(calls.Load()) != wantCalls {
			t.Errorf("max_attempts %d, %v: %d calls, want %d", maxAttempts, agentErr, calls.Load(), wantCalls)
		}
	}
	notDelivered := fmt.Errorf("%w: %w", ErrNotDelivered, status.Error(codes.Unavailable, "connection refused"))
	for n := 1; n <= 5; n++ {
		f(n, notDelivered, n)
		f(n, status.Error(codes.Unavailable, "transport is closing"), 1)
		f(n, status.Error(codes.Internal, "boom"), 1)
		f(n, context.DeadlineExceeded, 1)
	}
}
