package kernel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/batch"
)

// maxBatchBytes bounds one batch of requests; a larger request is sent alone.
const maxBatchBytes = 64 << 10

// shrinkPendingAbove is the peak of pending calls past which an emptied map is made anew.
const shrinkPendingAbove = 256

// maxInFlightCalls bounds the calls outstanding on one agent. Past it, a call waits for a slot
// within its own deadline; one that never gets a slot was never sent.
const maxInFlightCalls = 8192

var (
	// errClientClosed is returned by calls on a closed client.
	errClientClosed = errors.New("agent client closed")
	// errStreamEnded is a stream the agent ended cleanly: it answers every request it reads
	// before it ends a stream, so the requests still waiting were never run.
	errStreamEnded = errors.New("agent ended the stream")
	// errSendStuck is a stream whose send blocked longer than the agent's timeout: the agent
	// stopped reading it.
	errSendStuck = errors.New("agent stopped reading the stream")
	// errStrayReply is a reply for a call that was never made: the agent cannot be trusted
	// with the calls waiting on that stream.
	errStrayReply = errors.New("reply for a call that was never made")
	// errStreamUnavailable makes a broken stream's own errors count as an unavailable agent.
	errStreamUnavailable = status.Error(codes.Unavailable, "agent stream unusable")
)

// streamAgentClient runs calls over long-lived ExecuteStream streams, one per pooled
// connection, matching replies to calls by call_id. Compared with a unary RPC per call it
// saves the HTTP/2 stream set-up and tear-down, the headers and the trailers of every call;
// and the requests that are ready at the same time go out as one message (internal/batch),
// as the agent's replies come back, so that under load gRPC's cost per message is shared.
//
// A stream that breaks fails the calls waiting on it and is replaced by the next call. A call
// is reported as not delivered (ErrNotDelivered, so that it may be retried) only when the
// agent surely did not run it: no stream could be opened, the request could not be sent, or
// the agent ended the stream cleanly, which it does only after answering every request it
// read. An agent that does not know ExecuteStream is called with unary Execute instead.
type streamAgentClient struct {
	unary  *grpcAgentClient
	lanes  []*lane
	next   atomic.Uint32
	callID atomic.Uint64
	slots  chan struct{}
	// stuckAfter is how long one send may block before its stream is given up.
	stuckAfter time.Duration
	closed     atomic.Bool
	stopWatch  chan struct{}
	watchDone  chan struct{}

	// learned is the policy set the agent advertised last (GetAgentConfig); it is replaced
	// only when the set changes, so that its pointer names the set.
	learned atomic.Pointer[agentv1.GetAgentConfigResponse]
	// verify makes every new stream learn the agent's policy set before a call goes out on
	// it: a new stream is a new connection when the agent was restarted or replaced.
	verify bool
	// onLearn is called, before that first call, when the policy set changed.
	onLearn func(AgentClient, *agentv1.GetAgentConfigResponse)
}

// lane is one connection's stream, replaced when it breaks.
type lane struct {
	c      *streamAgentClient
	i      int
	cur    atomic.Pointer[laneStream]
	unary  atomic.Bool // the agent does not implement ExecuteStream
	mu     sync.Mutex
	opener *streamOpen // the open in progress, if any
}

// streamOpen is an attempt to open a lane's stream that many calls may wait for.
type streamOpen struct {
	done chan struct{}
	ls   *laneStream
	err  error
}

// laneStream is one open ExecuteStream.
type laneStream struct {
	lane   *lane
	stream agentv1.PolicyAgent_ExecuteStreamClient
	cancel context.CancelFunc
	// sender batches the requests; its write runs in one goroutine at a time.
	sender       *batch.Sender
	sendingSince atomic.Int64 // unix nanoseconds of the send in progress, 0 when none

	mu      sync.Mutex
	pending map[uint64]*call
	// peak is the most calls pending at once since pending was made: a Go map keeps the room
	// of its largest size, so once a burst is over and the map is empty it is made anew.
	peak   int
	err    error         // set once the stream is broken; no call is added after
	failed chan struct{} // closed when err is set
	// chainIDs says that the stream's agent keeps chains by id (chain_ids); known are the
	// chain ids sent on the stream with their policies, which later calls send without them.
	chainIDs bool
	known    map[uint64]struct{}
}

// call is one Execute waiting for its reply. Calls are pooled with their channel and timer.
type call struct {
	done  chan callResult
	timer *time.Timer
	// expired fires when the call's timeout passes; nil when the call has none.
	expired <-chan time.Time
}

// start arms the call's timer for timeout; 0 means no timeout of the call's own.
func (cl *call) start(timeout time.Duration) {
	if timeout <= 0 {
		cl.expired = nil
		return
	}
	if cl.timer == nil {
		cl.timer = time.NewTimer(timeout)
	} else {
		cl.timer.Reset(timeout)
	}
	cl.expired = cl.timer.C
}

func (cl *call) stop() {
	if cl.expired != nil {
		cl.timer.Stop()
		cl.expired = nil
	}
}

func getCall(timeout time.Duration) *call {
	cl := callPool.Get().(*call)
	cl.start(timeout)
	return cl
}

func putCall(cl *call) {
	cl.stop()
	callPool.Put(cl)
}

type callResult struct {
	resp *agentv1.PolicyResponse
	err  error
	// notSent says that the request never left: another stream may be tried.
	notSent bool
}

var callPool = sync.Pool{New: func() any { return &call{done: make(chan callResult, 1)} }}

// newStreamAgentClient wraps a pool of connections; stuckAfter is the agent's call timeout.
func newStreamAgentClient(unary *grpcAgentClient, stuckAfter time.Duration) *streamAgentClient {
	c := &streamAgentClient{
		unary:      unary,
		slots:      make(chan struct{}, maxInFlightCalls),
		stuckAfter: stuckAfter,
		stopWatch:  make(chan struct{}),
		watchDone:  make(chan struct{}),
	}
	for i := range unary.conns {
		c.lanes = append(c.lanes, &lane{c: c, i: i})
	}
	go c.watch()
	return c
}

// Execute runs one chain on the agent within ctx.
func (c *streamAgentClient) Execute(ctx context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
	return c.ExecuteTimeout(ctx, req, 0)
}

// ExecuteTimeout runs one chain on the agent within ctx and timeout, without deriving a
// context for the timeout (0: none): a pooled timer does the work of the several allocations
// of context.WithTimeout. Running out of time is reported as context.DeadlineExceeded.
func (c *streamAgentClient) ExecuteTimeout(ctx context.Context, req *agentv1.PolicyRequest, timeout time.Duration) (*agentv1.PolicyResponse, error) {
	if c.closed.Load() {
		return nil, fmt.Errorf("%w: %w", ErrNotDelivered, errClientClosed)
	}
	cl := getCall(timeout)
	defer putCall(cl)
	select {
	case c.slots <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("%w: waiting for a free call slot: %w", ErrNotDelivered, ctx.Err())
	case <-cl.expired:
		return nil, fmt.Errorf("%w: waiting for a free call slot: %w", ErrNotDelivered, context.DeadlineExceeded)
	}
	defer func() { <-c.slots }()
	l := c.lanes[int(c.next.Add(1)%uint32(len(c.lanes)))]
	// full sends the chain's policies with its id even where the stream knows the id: the
	// agent answered CHAIN_UNKNOWN (it no longer keeps it), and nothing ran.
	full := false
	// A stream found broken before the request went out is replaced once.
	for attempt := 0; ; attempt++ {
		if l.unary.Load() {
			return c.unaryWithin(ctx, l.i, req, timeout)
		}
		ls, err := l.stream(ctx, cl)
		if err != nil {
			if l.unary.Load() {
				return c.unaryWithin(ctx, l.i, req, timeout)
			}
			return nil, fmt.Errorf("%w: open stream: %w", ErrNotDelivered, err)
		}
		resp, err, retry := ls.execute(ctx, cl, req, c.callID.Add(1), full)
		if err == nil && !full && req.GetChainId() != 0 && resp.GetStatus().GetCode() == agentv1.StatusCode_CHAIN_UNKNOWN {
			ls.forget(req.GetChainId())
			full = true
			continue
		}
		if !retry || attempt == 1 {
			return resp, err
		}
	}
}

// unaryWithin calls unary Execute, for agents without ExecuteStream.
func (c *streamAgentClient) unaryWithin(ctx context.Context, i int, req *agentv1.PolicyRequest, timeout time.Duration) (*agentv1.PolicyResponse, error) {
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	return c.unary.executeOn(ctx, i, req)
}

// callErr is the error of a call that stopped waiting: its context's, or a deadline error
// when its own timer fired.
func callErr(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return context.DeadlineExceeded
}

// stream returns the lane's open stream, opening one if there is none. Calls that arrive while
// a stream is being opened wait for that one, each until its own deadline.
func (l *lane) stream(ctx context.Context, cl *call) (*laneStream, error) {
	if ls := l.cur.Load(); ls != nil {
		return ls, nil
	}
	l.mu.Lock()
	if ls := l.cur.Load(); ls != nil {
		l.mu.Unlock()
		return ls, nil
	}
	op := l.opener
	if op == nil {
		op = &streamOpen{done: make(chan struct{})}
		l.opener = op
		go l.open(op)
	}
	l.mu.Unlock()
	select {
	case <-op.done:
		return op.ls, op.err
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-cl.expired:
		return nil, context.DeadlineExceeded
	}
}

// open opens a stream for the lane. The stream's context is not a call's: it lives until the
// stream breaks or the client is closed.
func (l *lane) open(op *streamOpen) {
	defer close(op.done)
	sctx, cancel := context.WithCancel(context.Background())
	st, err := l.c.unary.agents[l.i].ExecuteStream(sctx)
	var info *agentv1.GetAgentConfigResponse
	if err == nil && l.c.verify {
		// Asked after the stream is open, on its connection: if the agent that answers is
		// not the stream's, the stream's connection is gone and the stream with it.
		info, err = l.c.learnOn(l.i)
	}
	if err == nil && l.c.closed.Load() {
		err = errClientClosed
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.opener = nil
	if err != nil {
		cancel()
		op.err = err
		return
	}
	ls := &laneStream{lane: l, stream: st, cancel: cancel, pending: map[uint64]*call{}, failed: make(chan struct{}),
		chainIDs: info.GetChainIds()}
	if ls.chainIDs {
		ls.known = map[uint64]struct{}{}
	}
	ls.sender = batch.NewSender(ls.write, ls.unsent, maxBatchBytes)
	l.cur.Store(ls)
	op.ls = ls
	go ls.receive()
}

// execute sends one request on the stream and waits for its reply. retry says that the
// stream was already broken and nothing was sent, so another stream may be tried. A request
// whose chain id the stream has carried with its policies goes without them, unless full.
func (ls *laneStream) execute(ctx context.Context, cl *call, req *agentv1.PolicyRequest, id uint64, full bool) (_ *agentv1.PolicyResponse, _ error, retry bool) {
	ls.mu.Lock()
	if ls.err != nil {
		ls.mu.Unlock()
		return nil, fmt.Errorf("%w: %w", ErrNotDelivered, ls.err), true
	}
	ls.pending[id] = cl
	ls.peak = max(ls.peak, len(ls.pending))
	idOnly := false
	if cid := req.GetChainId(); cid != 0 && ls.chainIDs {
		// Marked before it is queued: a call that sees the mark first and overtakes this
		// one gets CHAIN_UNKNOWN and is sent again in full.
		_, idOnly = ls.known[cid]
		idOnly = idOnly && !full
		ls.known[cid] = struct{}{}
	}
	ls.mu.Unlock()

	req.CallId = id
	var (
		f   batch.Frame
		err error
	)
	if idOnly {
		ps := req.Policies
		req.Policies = nil
		f, err = batch.Encode(id, req)
		req.Policies = ps
	} else {
		f, err = batch.Encode(id, req)
	}
	if err == nil {
		err = ls.sender.Enqueue(f)
		if err != nil {
			f.Release()
		}
	}
	if err != nil {
		// Not queued. If the stream failed meanwhile, fail handed the call an error: drop it.
		if ls.take(id) == nil {
			<-cl.done
		}
		return nil, fmt.Errorf("%w: %w", ErrNotDelivered, err), ctx.Err() == nil
	}
	var expired bool
	select {
	case r := <-cl.done:
		return r.resp, r.err, r.notSent && ctx.Err() == nil
	case <-ctx.Done():
	case <-cl.expired:
		expired = true
	}
	if ls.take(id) == nil {
		// The reply (or the stream's failure) is already on its way: take it, so that the
		// pooled call is empty, and answer with it.
		r := <-cl.done
		return r.resp, r.err, false
	}
	if expired {
		// The agent has the same deadline and stops by itself.
		return nil, context.DeadlineExceeded, false
	}
	// The caller is gone (Envoy reset its stream): tell the agent to stop the call.
	go ls.sendCancel(id)
	return nil, callErr(ctx), false
}

// sendCancel asks the agent to stop a call whose caller is gone. It is best effort: on a
// broken stream the call's own deadline stops it anyway.
func (ls *laneStream) sendCancel(id uint64) {
	f, err := batch.Encode(0, &agentv1.PolicyRequest{CallId: id, Cancel: true})
	if err != nil {
		return
	}
	if ls.sender.Enqueue(f) != nil {
		f.Release()
	}
}

// write sends one batch on the stream, for the sender.
func (ls *laneStream) write(b *batch.Batch) error {
	ls.sendingSince.Store(time.Now().UnixNano())
	err := ls.stream.SendMsg(b)
	ls.sendingSince.Store(0)
	if errors.Is(err, io.EOF) {
		// The stream is over and its status comes from Recv: wait for receive to learn it,
		// so that the next attempt knows, for one, whether the agent has ExecuteStream.
		t := time.NewTimer(ls.lane.c.stuckAfter)
		defer t.Stop()
		select {
		case <-ls.failed:
			return fmt.Errorf("stream already ended: %w", ls.err)
		case <-t.C:
		}
	}
	return err
}

// unsent fails the calls whose requests could not be sent, as not delivered, and then the
// stream.
func (ls *laneStream) unsent(frames []batch.Frame, err error) {
	for _, f := range frames {
		if cl := ls.take(f.ID); cl != nil {
			cl.done <- callResult{err: fmt.Errorf("%w: %w", ErrNotDelivered, err), notSent: true}
		}
	}
	ls.fail(err)
}

// forget makes the stream send a chain's policies again with its next call: the agent
// answered CHAIN_UNKNOWN for it.
func (ls *laneStream) forget(chainID uint64) {
	ls.mu.Lock()
	delete(ls.known, chainID)
	ls.mu.Unlock()
}

// take removes a call that no longer waits and returns it. It returns nil when the call was
// already taken by the receiver or by fail, which will send (or has sent) its result.
func (ls *laneStream) take(id uint64) *call {
	if id == 0 {
		return nil
	}
	ls.mu.Lock()
	defer ls.mu.Unlock()
	cl, ok := ls.pending[id]
	if !ok {
		return nil
	}
	delete(ls.pending, id)
	if len(ls.pending) == 0 && ls.peak > shrinkPendingAbove {
		ls.pending, ls.peak = map[uint64]*call{}, 0
	}
	return cl
}

// receive hands each reply to its call until the stream breaks.
func (ls *laneStream) receive() {
	for {
		b, err := ls.stream.Recv()
		if err != nil {
			ls.fail(err)
			return
		}
		for _, resp := range b.GetResponses() {
			id := resp.GetCallId()
			if id == 0 || id > ls.lane.c.callID.Load() {
				ls.fail(fmt.Errorf("%w: call_id %d", errStrayReply, id))
				return
			}
			// A reply for a call that gave up is dropped.
			if cl := ls.take(id); cl != nil {
				cl.done <- callResult{resp: resp, err: checkReplyUTF8(resp)}
			}
		}
	}
}

// fail marks the stream broken, takes it off its lane and fails every waiting call. The
// calls were sent, so they may have run, except when the agent ended the stream cleanly or
// does not implement it.
func (ls *laneStream) fail(err error) {
	ls.mu.Lock()
	if ls.err != nil {
		ls.mu.Unlock()
		return
	}
	callErr := fmt.Errorf("agent stream broke: %w", err)
	switch {
	case errors.Is(err, io.EOF):
		err = errStreamEnded
		callErr = fmt.Errorf("%w: %w", ErrNotDelivered, errStreamEnded)
	case status.Code(err) == codes.Unimplemented:
		ls.lane.unary.Store(true)
		callErr = fmt.Errorf("%w: %w", ErrNotDelivered, err)
	case errors.Is(err, errStrayReply):
		callErr = fmt.Errorf("%w: %w", errInvalidAgentResponse, err)
	case status.Code(err) == codes.Unknown:
		// Not a gRPC status (a stuck send, the client closing): for the caller the agent is
		// unavailable, as it would be if the connection had dropped.
		callErr = fmt.Errorf("agent stream broke: %w: %w", err, errStreamUnavailable)
	}
	ls.err = err
	close(ls.failed)
	ls.mu.Unlock()
	ls.lane.cur.CompareAndSwap(ls, nil)
	// Cancelling the stream ends a send in progress; the requests still queued were never
	// sent, and the sender hands them to unsent.
	ls.cancel()
	ls.sender.Close(err)
	ls.mu.Lock()
	pending := ls.pending
	ls.pending = nil
	ls.mu.Unlock()
	for _, cl := range pending {
		cl.done <- callResult{err: callErr}
	}
}

// watch gives up streams whose send has blocked longer than stuckAfter, so that an agent that
// stopped reading does not hold calls beyond their deadlines: the blocked send fails and the
// next call opens a new stream.
func (c *streamAgentClient) watch() {
	defer close(c.watchDone)
	tick := time.NewTicker(max(c.stuckAfter/4, 10*time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-c.stopWatch:
			return
		case now := <-tick.C:
			for _, l := range c.lanes {
				ls := l.cur.Load()
				if ls == nil {
					continue
				}
				if since := ls.sendingSince.Load(); since != 0 && now.UnixNano()-since > int64(c.stuckAfter) {
					ls.fail(errSendStuck)
				}
			}
		}
	}
}

// learnTimeout bounds the GetAgentConfig call of a new stream.
const learnTimeout = time.Second

// learnOn asks the agent on connection i for its policy set and, when it changed, tells
// onLearn before returning; it returns the agent's answer.
func (c *streamAgentClient) learnOn(i int) (*agentv1.GetAgentConfigResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), learnTimeout)
	defer cancel()
	info, err := c.unary.agents[i].GetAgentConfig(ctx, &agentv1.GetAgentConfigRequest{})
	if err != nil {
		return nil, fmt.Errorf("learn the agent's policies: %w", err)
	}
	if c.learn(info) && c.onLearn != nil {
		c.onLearn(c, info)
	}
	return info, nil
}

// learn records info as the agent's policy set when the set changed; it reports whether it did.
func (c *streamAgentClient) learn(info *agentv1.GetAgentConfigResponse) bool {
	for {
		cur := c.learned.Load()
		if cur != nil && !policySetChanged(cur, info) {
			return false
		}
		if c.learned.CompareAndSwap(cur, info) {
			return true
		}
	}
}

// GetAgentConfig asks the agent for its config with a unary call, and learns its policy set.
func (c *streamAgentClient) GetAgentConfig(ctx context.Context) (*agentv1.GetAgentConfigResponse, error) {
	info, err := c.unary.GetAgentConfig(ctx)
	if err == nil && c.verify {
		c.learn(info)
	}
	return info, err
}

// ValidateChains asks the agent to build chain entries; see chainValidator.
func (c *streamAgentClient) ValidateChains(ctx context.Context, entries []*agentv1.ChainEntry) (*agentv1.ValidateChainsResponse, error) {
	return c.unary.ValidateChains(ctx, entries)
}

// Check asks the agent's health service.
func (c *streamAgentClient) Check(ctx context.Context) error { return c.unary.Check(ctx) }

// Close ends every stream, failing the calls still waiting, and closes the connections.
func (c *streamAgentClient) Close() error {
	if c.closed.Swap(true) {
		return nil
	}
	close(c.stopWatch)
	<-c.watchDone
	for _, l := range c.lanes {
		l.mu.Lock()
		op := l.opener
		l.mu.Unlock()
		if op != nil {
			<-op.done
		}
		if ls := l.cur.Load(); ls != nil {
			ls.fail(errClientClosed)
		}
	}
	return c.unary.Close()
}

var (
	_ AgentClient     = (*streamAgentClient)(nil)
	_ timeoutExecutor = (*streamAgentClient)(nil)
	_ chainValidator  = (*streamAgentClient)(nil)
)
