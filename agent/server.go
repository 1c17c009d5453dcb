package agent

import (
	"context"
	"errors"
	"io"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	// Marshals the agent API and ext_proc messages without reflection.
	_ "github.com/policy-engine/policy-engine/internal/vtcodec"
)

// service implements the PolicyAgent gRPC service.
type service struct {
	agentv1.UnimplementedPolicyAgentServer
	exec *Executor
	// sem bounds the chains running at once (server.max_concurrent_requests), across unary
	// calls and streams alike.
	sem chan struct{}

	drainOnce sync.Once
	drainMu   sync.Mutex
	drain     chan struct{}
}

func newService(exec *Executor, maxConcurrent int) *service {
	return &service{exec: exec, sem: make(chan struct{}, maxConcurrent)}
}

// run executes a chain once a slot is free; a caller that gives up while waiting gets a
// TIMEOUT answer.
func (s *service) run(ctx context.Context, req *agentv1.PolicyRequest) *agentv1.PolicyResponse {
	cc := newChainCtx(ctx, deadlineOf(req))
	defer cc.release()
	return s.runIn(cc, req)
}

// runIn is run in a chain context made by the caller.
func (s *service) runIn(cc *chainCtx, req *agentv1.PolicyRequest) *agentv1.PolicyResponse {
	select {
	case s.sem <- struct{}{}:
	default:
		// Only a caller that has to wait asks for Done, which arms the chain's timer.
		select {
		case s.sem <- struct{}{}:
		case <-cc.Done():
			return fail(&agentv1.PolicyResponse{RequestId: req.GetRequestId(), CallId: req.GetCallId()},
				agentv1.StatusCode_TIMEOUT, "", "agent busy: max_concurrent_requests reached")
		}
	}
	defer func() { <-s.sem }()
	return s.exec.execute(cc, req)
}

func (s *service) GetAgentConfig(context.Context, *agentv1.GetAgentConfigRequest) (*agentv1.GetAgentConfigResponse, error) {
	return s.exec.Describe(), nil
}

func (s *service) Execute(ctx context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
	return s.run(ctx, req), nil
}

// ExecuteStream serves many chains over one stream. Each request runs in its own goroutine so
// that a slow policy does not hold up the others; sends are serialised.
//
// A request with cancel set stops the running call with its call_id: the kernel sends it when
// the call's caller is gone (Envoy reset the stream), so that the policies stop too.
//
// The stream ends cleanly (status OK) only after every request read from it has been answered,
// so a client may take the requests it sent and never got an answer for as never run. When the
// agent drains, its streams stop reading, answer what they read and end that way, so the
// kernel moves its calls to another stream at once instead of waiting for a hard stop.
func (s *service) ExecuteStream(stream agentv1.PolicyAgent_ExecuteStreamServer) error {
	ctx := stream.Context()
	var (
		mu      sync.Mutex // guards stopped, calls and the wg.Add that stopped forbids
		stopped bool
		calls   = map[uint64]*chainCtx{} // running calls by call_id, for cancel messages
		wg      sync.WaitGroup
		sendMu  sync.Mutex
		sendErr error
	)
	recvDone := make(chan error, 1)
	go func() {
		for {
			req, err := stream.Recv()
			if err != nil {
				recvDone <- err
				return
			}
			id := req.GetCallId()
			if req.GetCancel() {
				mu.Lock()
				cc := calls[id]
				mu.Unlock()
				if cc != nil {
					cc.cancel()
				}
				continue
			}
			cc := newChainCtx(ctx, deadlineOf(req))
			mu.Lock()
			if stopped {
				// Read after the drain began: neither run nor answered.
				mu.Unlock()
				return
			}
			wg.Add(1)
			calls[id] = cc
			mu.Unlock()
			go func() {
				defer wg.Done()
				resp := s.runIn(cc, req)
				mu.Lock()
				if calls[id] == cc {
					delete(calls, id)
				}
				mu.Unlock()
				cc.release()
				sendMu.Lock()
				defer sendMu.Unlock()
				if sendErr == nil {
					sendErr = stream.Send(resp)
				}
			}()
		}
	}()
	var err error
	select {
	case err = <-recvDone:
	case <-s.draining():
	}
	mu.Lock()
	stopped = true
	mu.Unlock()
	wg.Wait()
	if err == nil || errors.Is(err, io.EOF) || status.Code(err) == codes.Canceled {
		return nil
	}
	return err
}

// draining returns a channel closed when the agent begins to shut down.
func (s *service) draining() <-chan struct{} {
	s.drainOnce.Do(func() { s.drain = make(chan struct{}) })
	return s.drain
}

// beginDrain makes every ExecuteStream stop reading and end once its requests are answered.
func (s *service) beginDrain() {
	s.draining()
	s.drainMu.Lock()
	defer s.drainMu.Unlock()
	select {
	case <-s.drain:
	default:
		close(s.drain)
	}
}
