package agent

import (
	"context"
	"errors"
	"io"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// service implements the PolicyAgent gRPC service.
type service struct {
	agentv1.UnimplementedPolicyAgentServer
	exec *Executor
	// sem bounds the chains running at once (server.max_concurrent_requests), across unary
	// calls and streams alike.
	sem chan struct{}
}

func newService(exec *Executor, maxConcurrent int) *service {
	return &service{exec: exec, sem: make(chan struct{}, maxConcurrent)}
}

// run executes a chain once a slot is free; a caller that gives up while waiting gets a
// TIMEOUT answer.
func (s *service) run(ctx context.Context, req *agentv1.PolicyRequest) *agentv1.PolicyResponse {
	select {
	case s.sem <- struct{}{}:
	case <-ctx.Done():
		return fail(&agentv1.PolicyResponse{RequestId: req.GetRequestId(), CallId: req.GetCallId()},
			agentv1.StatusCode_TIMEOUT, "", "agent busy: max_concurrent_requests reached")
	}
	defer func() { <-s.sem }()
	return s.exec.Execute(ctx, req)
}

func (s *service) GetAgentConfig(context.Context, *agentv1.GetAgentConfigRequest) (*agentv1.GetAgentConfigResponse, error) {
	return s.exec.Describe(), nil
}

func (s *service) Execute(ctx context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
	return s.run(ctx, req), nil
}

// ExecuteStream serves many chains over one stream. Each request runs in its own goroutine so
// that a slow policy does not hold up the others; sends are serialised.
func (s *service) ExecuteStream(stream agentv1.PolicyAgent_ExecuteStreamServer) error {
	ctx := stream.Context()
	var (
		sendMu  sync.Mutex
		wg      sync.WaitGroup
		sendErr error
	)
	defer wg.Wait()
	for {
		req, err := stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			if status.Code(err) == codes.Canceled {
				return nil
			}
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp := s.run(ctx, req)
			sendMu.Lock()
			defer sendMu.Unlock()
			if sendErr == nil {
				sendErr = stream.Send(resp)
			}
		}()
	}
}
