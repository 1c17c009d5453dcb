package agent

import (
	"context"
	"errors"
	"io"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/batch"
	"github.com/policy-engine/policy-engine/internal/proctune"
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
	// work hands chains to idle workers; workers counts the kept ones.
	work     chan func()
	quit     chan struct{}
	quitOnce sync.Once

	drainOnce sync.Once
	drainMu   sync.Mutex
	drain     chan struct{}
}

func newService(exec *Executor, maxConcurrent int) *service {
	s := &service{exec: exec, sem: make(chan struct{}, maxConcurrent), work: make(chan func()), quit: make(chan struct{})}
	for range workers() {
		go s.worker()
	}
	return s
}

// run executes a chain once a slot is free; a caller that gives up while waiting gets a
// TIMEOUT answer.
func (s *service) run(ctx context.Context, req *agentv1.PolicyRequest) *agentv1.PolicyResponse {
	cc := newChainCtx(ctx, s.exec.deadlineOf(req))
	defer cc.release()
	return s.runIn(cc, req)
}

// runIn is run in a chain context made by the caller.
func (s *service) runIn(cc *chainCtx, req *agentv1.PolicyRequest) *agentv1.PolicyResponse {
	if req.GetChainId() != 0 && len(req.GetPolicies()) == 0 {
		// A chain named by an id this agent does not keep (another stream's, or one kept
		// before a restart): never run as an empty chain, which would allow.
		return chainUnknown(req)
	}
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

// chainUnknown answers a request whose chain_id names no chain the stream keeps: nothing ran.
func chainUnknown(req *agentv1.PolicyRequest) *agentv1.PolicyResponse {
	return fail(&agentv1.PolicyResponse{RequestId: req.GetRequestId(), CallId: req.GetCallId()},
		agentv1.StatusCode_CHAIN_UNKNOWN, "", "unknown chain_id")
}

// maxStreamChains bounds the chains one ExecuteStream keeps by id; past it they are all
// dropped, and the kernel sends each again with its next call (CHAIN_UNKNOWN).
const maxStreamChains = 4096

// streamChains are the chains a kernel sent on one ExecuteStream with a chain_id. Only the
// stream's receiving goroutine uses it, in the order of the requests.
type streamChains map[uint64][]*agentv1.Policy

// resolve keeps req's chain under its id, or fills req's policies from the chain kept under
// its id; false when req names an id the stream does not keep. m (if set) counts which.
func (sc *streamChains) resolve(req *agentv1.PolicyRequest, m *agentMetrics) bool {
	id := req.GetChainId()
	if id == 0 {
		return true
	}
	if len(req.GetPolicies()) > 0 {
		if *sc == nil || len(*sc) >= maxStreamChains {
			*sc = make(streamChains, 16)
		}
		(*sc)[id] = req.GetPolicies()
		if m != nil {
			m.chainKept.Inc()
		}
		return true
	}
	p, ok := (*sc)[id]
	req.Policies = p
	if m != nil {
		if ok {
			m.chainNamed.Inc()
		} else {
			m.chainUnknown.Inc()
		}
	}
	return ok
}

func (s *service) GetAgentConfig(context.Context, *agentv1.GetAgentConfigRequest) (*agentv1.GetAgentConfigResponse, error) {
	d := s.exec.Describe()
	d.ChainIds = true
	return d, nil
}

// ValidateChains checks chain entries as Execute will run them; see Executor.ValidateChains.
func (s *service) ValidateChains(_ context.Context, req *agentv1.ValidateChainsRequest) (*agentv1.ValidateChainsResponse, error) {
	return &agentv1.ValidateChainsResponse{Errors: s.exec.ValidateChains(req.GetEntries()), Facts: s.exec.EntryFacts(req.GetEntries())}, nil
}

func (s *service) Execute(ctx context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
	return s.run(ctx, req), nil
}

// maxReplyBatchBytes bounds one batch of replies; a larger reply is sent alone.
const maxReplyBatchBytes = 64 << 10

// ExecuteStream serves many chains over one stream. Each request runs in a goroutine of its
// own (a pooled worker when one is idle) so that a slow policy does not hold up the others;
// the replies that are ready at the same time go back as one batch.
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
	)
	// A reply that cannot be sent is lost with the stream, which the kernel sees break.
	sender := batch.NewSender(func(b *batch.Batch) error { return stream.SendMsg(b) },
		func([]batch.Frame, error) {}, maxReplyBatchBytes)
	run := func(id uint64, cc *chainCtx, req *agentv1.PolicyRequest) {
		defer wg.Done()
		resp := s.runIn(cc, req)
		mu.Lock()
		if calls[id] == cc {
			delete(calls, id)
		}
		mu.Unlock()
		cc.release()
		f, err := batch.Encode(id, resp)
		if err == nil && sender.Enqueue(f) != nil {
			f.Release()
		}
	}
	recvDone := make(chan error, 1)
	go func() {
		var chains streamChains
		for {
			b, err := stream.Recv()
			if err != nil {
				recvDone <- err
				return
			}
			for _, req := range b.GetRequests() {
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
				known := chains.resolve(req, s.exec.metrics)
				cc := newChainCtx(ctx, s.exec.deadlineOf(req))
				mu.Lock()
				if stopped {
					// Read after the drain began: neither run nor answered.
					mu.Unlock()
					cc.release()
					return
				}
				wg.Add(1)
				if !known {
					// Answered here, in order: nothing runs.
					mu.Unlock()
					cc.release()
					f, err := batch.Encode(id, chainUnknown(req))
					if err == nil && sender.Enqueue(f) != nil {
						f.Release()
					}
					wg.Done()
					continue
				}
				calls[id] = cc
				mu.Unlock()
				s.dispatch(func() { run(id, cc, req) })
			}
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
	sender.Wait()
	if err == nil || errors.Is(err, io.EOF) || status.Code(err) == codes.Canceled {
		return nil
	}
	return err
}

// workers is how many goroutines are kept waiting for chains to run. A worker keeps the stack
// it grew, where a new goroutine would grow its own for every chain; chains that find no idle
// worker (many slow policies at once) run in goroutines of their own. It scales with the
// processors the agent may get, not with the one it runs on while idle (internal/proctune).
func workers() int { return max(16, 8*proctune.Ceiling()) }

// dispatch runs job in an idle worker, or in a new goroutine when none is idle.
func (s *service) dispatch(job func()) {
	select {
	case s.work <- job:
	default:
		go job()
	}
}

// worker runs the jobs handed to it until the service stops.
func (s *service) worker() {
	for {
		select {
		case job := <-s.work:
			job()
		case <-s.quit:
			return
		}
	}
}

// stop ends the workers once they are idle; chains dispatched later run in goroutines of
// their own.
func (s *service) stop() { s.quitOnce.Do(func() { close(s.quit) }) }

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
