package kernel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/batch"
	"github.com/policy-engine/policy-engine/internal/testenv"
	"github.com/policy-engine/policy-engine/internal/uds"
)

// streamFake is a PolicyAgent whose ExecuteStream behaves as a test asks: it answers each
// request with its request id and call id after the wait its route name asks for ("hold"
// waits for release; "sleep" waits 300 ms).
type streamFake struct {
	agentv1.UnimplementedPolicyAgentServer
	executed atomic.Int64
	release  chan struct{}
	cancels  chan uint64 // call ids of the cancel messages received
	// endAfterRead makes a stream read one request and end cleanly without answering it.
	endAfterRead bool
	// noRead makes a stream never read.
	noRead bool
	// duplicate makes every reply go out twice: the second is for a call no longer waiting.
	duplicate bool
	// stray makes replies carry a call id that was never issued.
	stray bool
}

func newStreamFake() *streamFake {
	return &streamFake{release: make(chan struct{}), cancels: make(chan uint64, 16)}
}

func (f *streamFake) answer(ctx context.Context, req *agentv1.PolicyRequest) *agentv1.PolicyResponse {
	switch req.GetRouteName() {
	case "hold":
		select {
		case <-f.release:
		case <-ctx.Done():
		}
	case "sleep":
		time.Sleep(300 * time.Millisecond)
	}
	f.executed.Add(1)
	return &agentv1.PolicyResponse{RequestId: req.GetRequestId(), CallId: req.GetCallId(), Status: &agentv1.ResponseStatus{}}
}

func (f *streamFake) Execute(ctx context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
	return f.answer(ctx, req), nil
}

func (f *streamFake) ExecuteStream(st agentv1.PolicyAgent_ExecuteStreamServer) error {
	if f.noRead {
		<-st.Context().Done()
		return nil
	}
	var mu sync.Mutex
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		b, err := st.Recv()
		if err != nil {
			return nil
		}
		if f.endAfterRead {
			return nil
		}
		for _, req := range b.GetRequests() {
			if req.GetCancel() {
				f.cancels <- req.GetCallId()
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				resp := f.answer(st.Context(), req)
				mu.Lock()
				defer mu.Unlock()
				if f.stray {
					resp.CallId += 1 << 40
				}
				out := &agentv1.PolicyResponseBatch{Responses: []*agentv1.PolicyResponse{resp}}
				_ = st.Send(out)
				if f.duplicate {
					_ = st.Send(out)
				}
			}()
		}
	}
}

// unaryStreamFake has no ExecuteStream.
type unaryStreamFake struct {
	agentv1.UnimplementedPolicyAgentServer
	f *streamFake
}

func (u *unaryStreamFake) Execute(ctx context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
	return u.f.answer(ctx, req), nil
}

// serveAgent serves impl on a Unix socket at path until the returned server is stopped.
func serveAgent(t *testing.T, path string, impl agentv1.PolicyAgentServer) *grpc.Server {
	t.Helper()
	ln, err := uds.Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	agentv1.RegisterPolicyAgentServer(srv, impl)
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(srv.Stop)
	return srv
}

func newTestStreamClient(t *testing.T, path string, conns int) *streamAgentClient {
	t.Helper()
	u, err := dialAgent(path, conns, 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	c := newStreamAgentClient(u, 200*time.Millisecond)
	t.Cleanup(func() { c.Close() })
	return c
}

func socketPath(t *testing.T) string { return filepath.Join(t.TempDir(), "agent.sock") }

func callAgentFor(c AgentClient, timeout time.Duration, route, id string) (*agentv1.PolicyResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return c.Execute(ctx, &agentv1.PolicyRequest{RequestId: id, RouteName: route})
}

// warm makes calls until one succeeds, as the kernel's retries would: on a loaded machine
// the first connection attempt can time out.
func warm(t *testing.T, c AgentClient) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := callAgentFor(c, 2*time.Second, "", "warm")
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no call succeeded within 10s: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// pendingCalls counts the calls waiting on the client's streams.
func pendingCalls(c *streamAgentClient) int {
	n := 0
	for _, l := range c.lanes {
		if ls := l.cur.Load(); ls != nil {
			ls.mu.Lock()
			n += len(ls.pending)
			ls.mu.Unlock()
		}
	}
	return n
}

func TestStreamClientMatchesRepliesToCalls(t *testing.T) {
	path := socketPath(t)
	f := newStreamFake()
	f.duplicate = true // replies for calls no longer waiting must be dropped
	serveAgent(t, path, f)
	c := newTestStreamClient(t, path, 2)
	warm(t, c)
	warm(t, c)
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for g := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 50 {
				id := fmt.Sprintf("g%d-%d", g, i)
				resp, err := callAgentFor(c, 5*time.Second, "", id)
				if err != nil {
					errs <- err
					return
				}
				if resp.GetRequestId() != id {
					errs <- fmt.Errorf("call %s got the reply of %s", id, resp.GetRequestId())
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := f.executed.Load(); got != 32*50+2 {
		t.Errorf("agent ran %d calls, want %d", got, 32*50+2)
	}
	if n := pendingCalls(c); n != 0 {
		t.Errorf("%d calls still pending after all returned", n)
	}
	// Two connections, each with one stream.
	streams := 0
	for _, l := range c.lanes {
		if l.cur.Load() != nil {
			streams++
		}
	}
	if streams != 2 {
		t.Errorf("%d streams open, want 2", streams)
	}
}

func TestStreamClientDeadlineLeavesNothingBehind(t *testing.T) {
	path := socketPath(t)
	f := newStreamFake()
	serveAgent(t, path, f)
	c := newTestStreamClient(t, path, 1)
	warm(t, c)
	opts := goleak.IgnoreCurrent()
	start := time.Now()
	_, err := callAgentFor(c, 50*time.Millisecond, "sleep", "late")
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want a deadline error", err)
	}
	if errors.Is(err, ErrNotDelivered) {
		t.Errorf("a call that reached the agent was reported as not delivered: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("call returned after %s, want about its 50ms deadline", d)
	}
	if n := pendingCalls(c); n != 0 {
		t.Errorf("%d calls pending after the deadline", n)
	}
	// The late reply arrives and is dropped; the stream keeps working.
	time.Sleep(350 * time.Millisecond)
	resp, err := callAgentFor(c, 5*time.Second, "", "after")
	if err != nil || resp.GetRequestId() != "after" {
		t.Fatalf("call after a late reply: %v, %v", resp, err)
	}
	goleak.VerifyNone(t, opts)
}

func TestStreamClientAgentKilledMidCallAndRestarted(t *testing.T) {
	path := socketPath(t)
	f := newStreamFake()
	srv := serveAgent(t, path, f)
	c := newTestStreamClient(t, path, 2)
	warm(t, c)
	errc := make(chan error, 1)
	go func() {
		_, err := callAgentFor(c, 5*time.Second, "hold", "mid")
		errc <- err
	}()
	time.Sleep(100 * time.Millisecond) // the call is now inside the agent
	srv.Stop()                         // the agent dies: connections drop at once
	select {
	case err := <-errc:
		if err == nil {
			t.Fatal("call on a killed agent succeeded")
		}
		if errors.Is(err, ErrNotDelivered) {
			t.Errorf("a call the agent had read was reported as not delivered: %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("call did not return after the agent died")
	}
	// While the agent is down, calls fail quickly; once the client has seen the streams
	// break, they fail as not delivered.
	var err error
	for i := range 4 {
		start := time.Now()
		_, err = callAgentFor(c, time.Second, "", fmt.Sprint("down-", i))
		if err == nil {
			t.Fatal("call with no agent succeeded")
		}
		if d := time.Since(start); d > 500*time.Millisecond {
			t.Errorf("call with no agent took %s", d)
		}
	}
	if !errors.Is(err, ErrNotDelivered) {
		t.Errorf("call with no agent: err = %v, want ErrNotDelivered", err)
	}
	// The agent comes back on the same socket; calls go through new streams.
	f2 := newStreamFake()
	serveAgent(t, path, f2)
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, err := callAgentFor(c, time.Second, "", "back")
		if err == nil && resp.GetRequestId() == "back" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no successful call within 5s of the agent's restart: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if f2.executed.Load() == 0 {
		t.Error("the restarted agent ran nothing")
	}
}

func TestStreamClientCleanEndIsNotDelivered(t *testing.T) {
	path := socketPath(t)
	f := newStreamFake()
	f.endAfterRead = true
	serveAgent(t, path, f)
	c := newTestStreamClient(t, path, 1)
	_, err := callAgentFor(c, 2*time.Second, "", "dropped")
	if !errors.Is(err, ErrNotDelivered) || !errors.Is(err, errStreamEnded) {
		t.Fatalf("err = %v, want ErrNotDelivered from a cleanly ended stream", err)
	}
	if f.executed.Load() != 0 {
		t.Fatal("the fake ran a call it should have dropped")
	}
}

func TestStreamClientFallsBackToUnary(t *testing.T) {
	path := socketPath(t)
	f := newStreamFake()
	serveAgent(t, path, &unaryStreamFake{f: f})
	c := newTestStreamClient(t, path, 1)
	// The first call learns that the agent has no ExecuteStream; it was not run, so it is
	// reported as not delivered and may be retried.
	_, err := callAgentFor(c, 2*time.Second, "", "first")
	if err != nil && !errors.Is(err, ErrNotDelivered) {
		t.Fatalf("first call: %v", err)
	}
	for i := range 3 {
		id := fmt.Sprint("unary-", i)
		resp, err := callAgentFor(c, 2*time.Second, "", id)
		if err != nil || resp.GetRequestId() != id {
			t.Fatalf("call %d: %v, %v", i, resp, err)
		}
	}
	if !c.lanes[0].unary.Load() {
		t.Error("lane not switched to unary")
	}
}

func TestStreamClientNoAgentIsNotDelivered(t *testing.T) {
	c := newTestStreamClient(t, socketPath(t), 1)
	_, err := callAgentFor(c, time.Second, "", "x")
	if !errors.Is(err, ErrNotDelivered) {
		t.Fatalf("err = %v, want ErrNotDelivered", err)
	}
}

func TestStreamClientGivesUpStuckStream(t *testing.T) {
	path := socketPath(t)
	f := newStreamFake()
	f.noRead = true
	serveAgent(t, path, f)
	c := newTestStreamClient(t, path, 1)
	body := make([]byte, 1<<20)
	var wg sync.WaitGroup
	var maxDur atomic.Int64
	results := make(chan error, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
			defer cancel()
			start := time.Now()
			_, err := c.Execute(ctx, &agentv1.PolicyRequest{Context: &agentv1.RequestContext{Body: body}})
			if d := int64(time.Since(start)); d > maxDur.Load() {
				maxDur.Store(d)
			}
			results <- err
		}()
	}
	wg.Wait()
	close(results)
	for err := range results {
		if err == nil {
			t.Error("a call on an agent that reads nothing succeeded")
		}
	}
	// Calls stop at their deadline, or when the stuck send is given up (200ms): a blocked
	// send would otherwise hold its call forever. The bound leaves room for a loaded machine.
	if d := time.Duration(maxDur.Load()); d > 3*time.Second {
		t.Errorf("slowest call took %s", d)
	}
}

func TestStreamClientBoundsCallsInFlight(t *testing.T) {
	path := socketPath(t)
	f := newStreamFake()
	serveAgent(t, path, f)
	c := newTestStreamClient(t, path, 1)
	warm(t, c)
	c.slots = make(chan struct{}, 2)
	var wg sync.WaitGroup
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := callAgentFor(c, 5*time.Second, "hold", fmt.Sprint(i)); err != nil {
				t.Errorf("held call: %v", err)
			}
		}()
	}
	time.Sleep(100 * time.Millisecond)
	_, err := callAgentFor(c, 50*time.Millisecond, "", "third")
	if !errors.Is(err, ErrNotDelivered) || !strings.Contains(err.Error(), "call slot") {
		t.Errorf("third call: err = %v, want not delivered for want of a slot", err)
	}
	close(f.release)
	wg.Wait()
	if _, err := callAgentFor(c, time.Second, "", "after"); err != nil {
		t.Errorf("call after the slots freed: %v", err)
	}
}

func TestStreamClientClose(t *testing.T) {
	path := socketPath(t)
	f := newStreamFake()
	serveAgent(t, path, f)
	c := newTestStreamClient(t, path, 1)
	warm(t, c)
	errc := make(chan error, 1)
	go func() {
		_, err := callAgentFor(c, 5*time.Second, "hold", "open")
		errc <- err
	}()
	time.Sleep(100 * time.Millisecond)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err == nil || errors.Is(err, ErrNotDelivered) {
		t.Errorf("call in flight at Close: err = %v, want a delivered-call failure", err)
	}
	if _, err := callAgentFor(c, time.Second, "", "late"); !errors.Is(err, ErrNotDelivered) {
		t.Errorf("call after Close: err = %v, want ErrNotDelivered", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestStreamFailClassifiesErrors(t *testing.T) {
	f := func(err error, notDelivered bool) {
		t.Helper()
		l := &lane{}
		ls := &laneStream{lane: l, cancel: func() {}, pending: map[uint64]*call{1: {done: make(chan callResult, 1)}}, failed: make(chan struct{})}
		ls.sender = batch.NewSender(func(*batch.Batch) error { return nil }, ls.unsent, 1)
		l.cur.Store(ls)
		cl := ls.pending[1]
		ls.fail(err)
		r := <-cl.done
		if got := errors.Is(r.err, ErrNotDelivered); got != notDelivered {
			t.Errorf("fail(%v): not delivered = %v, want %v (%v)", err, got, notDelivered, r.err)
		}
		if l.cur.Load() != nil {
			t.Errorf("fail(%v): stream still on its lane", err)
		}
		ls.fail(errors.New("again")) // a second failure changes nothing
	}
	f(io.EOF, true)
	f(status.Error(codes.Unimplemented, "no"), true)
	f(status.Error(codes.Unavailable, "gone"), false)
	f(errSendStuck, false)
	f(errStrayReply, false)
}

func TestStreamErrorsForTheKernel(t *testing.T) {
	f := func(err error) error {
		l := &lane{}
		ls := &laneStream{lane: l, cancel: func() {}, pending: map[uint64]*call{1: {done: make(chan callResult, 1)}}, failed: make(chan struct{})}
		ls.sender = batch.NewSender(func(*batch.Batch) error { return nil }, ls.unsent, 1)
		cl := ls.pending[1]
		ls.fail(err)
		return (<-cl.done).err
	}
	// A stuck or closed stream is an unavailable agent (fail_open applies) ...
	for _, e := range []error{errSendStuck, errClientClosed} {
		if err := f(e); !agentUnreachable(err) || status.Code(err) != codes.Unavailable || !errors.Is(err, e) {
			t.Errorf("%v: caller sees %v (code %v)", e, err, status.Code(err))
		}
	}
	// ... a stray reply an invalid one (500 whatever fail_open says).
	if err := f(errStrayReply); agentUnreachable(err) || !errors.Is(err, errInvalidAgentResponse) {
		t.Errorf("stray reply: caller sees %v", err)
	}
}

func TestStreamClientStrayReplyIsInvalid(t *testing.T) {
	path := socketPath(t)
	f := newStreamFake()
	f.stray = true
	serveAgent(t, path, f)
	c := newTestStreamClient(t, path, 1)
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := callAgentFor(c, 2*time.Second, "", "x")
		if errors.Is(err, errInvalidAgentResponse) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("err = %v, want an invalid agent response", err)
		}
		time.Sleep(20 * time.Millisecond) // the first connection attempt may time out when loaded
	}
}

func TestStreamClientSendsCancelForAbandonedCalls(t *testing.T) {
	path := socketPath(t)
	f := newStreamFake()
	serveAgent(t, path, f)
	c := newTestStreamClient(t, path, 1)
	warm(t, c)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	_, err := c.Execute(ctx, &agentv1.PolicyRequest{RouteName: "hold", RequestId: "gone"})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want the caller's cancellation", err)
	}
	select {
	case id := <-f.cancels:
		if id == 0 {
			t.Fatal("cancel without a call id")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the agent got no cancel for the abandoned call")
	}
	// A call that ran out of its own time is not cancelled: the agent has the same deadline.
	_, err = c.ExecuteTimeout(context.Background(), &agentv1.PolicyRequest{RouteName: "sleep"}, 30*time.Millisecond)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v", err)
	}
	select {
	case id := <-f.cancels:
		t.Fatalf("cancel sent for call %d that timed out", id)
	case <-time.After(200 * time.Millisecond):
	}
	close(f.release)
}

func TestStreamClientOwnTimeout(t *testing.T) {
	path := socketPath(t)
	f := newStreamFake()
	serveAgent(t, path, f)
	c := newTestStreamClient(t, path, 1)
	warm(t, c)
	start := time.Now()
	_, err := c.ExecuteTimeout(context.Background(), &agentv1.PolicyRequest{RouteName: "sleep"}, 50*time.Millisecond)
	if !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrNotDelivered) {
		t.Fatalf("err = %v, want a deadline error of a delivered call", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("call returned after %s, want about 50ms", d)
	}
	if n := pendingCalls(c); n != 0 {
		t.Errorf("%d calls pending after the timeout", n)
	}
	// No free slot within the timeout: never sent.
	c.slots = make(chan struct{})
	if _, err := c.ExecuteTimeout(context.Background(), &agentv1.PolicyRequest{}, 30*time.Millisecond); !errors.Is(err, ErrNotDelivered) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("no slot: err = %v, want not delivered by deadline", err)
	}
}

func TestStreamClientUnaryFallbackTimeout(t *testing.T) {
	path := socketPath(t)
	f := newStreamFake()
	serveAgent(t, path, &unaryStreamFake{f: f})
	c := newTestStreamClient(t, path, 1)
	warm(t, c)
	resp, err := c.ExecuteTimeout(context.Background(), &agentv1.PolicyRequest{RequestId: "u"}, time.Second)
	if err != nil || resp.GetRequestId() != "u" {
		t.Fatalf("unary call: %v, %v", resp, err)
	}
	_, err = c.ExecuteTimeout(context.Background(), &agentv1.PolicyRequest{RouteName: "sleep"}, 50*time.Millisecond)
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("slow unary call: err = %v, want DeadlineExceeded", err)
	}
}

func TestStreamClientUnaryCallsPassThrough(t *testing.T) {
	path := socketPath(t)
	serveAgent(t, path, newStreamFake()) // no GetAgentConfig, no health service
	c := newTestStreamClient(t, path, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.GetAgentConfig(ctx); status.Code(err) != codes.Unimplemented {
		t.Errorf("GetAgentConfig: err = %v, want the agent's Unimplemented", err)
	}
	if err := c.Check(ctx); status.Code(err) != codes.Unimplemented {
		t.Errorf("Check: err = %v, want the agent's Unimplemented", err)
	}
}

// eofStream is an ExecuteStream whose sends fail with io.EOF, as grpc-go reports a stream
// that has already ended.
type eofStream struct {
	agentv1.PolicyAgent_ExecuteStreamClient
}

func (eofStream) SendMsg(any) error { return io.EOF }

func TestStreamSendOnEndedStream(t *testing.T) {
	c := &streamAgentClient{stuckAfter: 20 * time.Millisecond}
	l := &lane{c: c}
	// The receiver has learnt the stream's end: the send says so.
	ls := &laneStream{lane: l, stream: eofStream{}, cancel: func() {}, pending: map[uint64]*call{}, failed: make(chan struct{})}
	ls.err = errStreamEnded
	close(ls.failed)
	if err := ls.write(&batch.Batch{}); err == nil || !errors.Is(err, errStreamEnded) {
		t.Errorf("write on an ended stream: %v, want %v", err, errStreamEnded)
	}
	// The receiver never says: the send gives up after stuckAfter with io.EOF.
	ls = &laneStream{lane: l, stream: eofStream{}, cancel: func() {}, pending: map[uint64]*call{}, failed: make(chan struct{})}
	start := time.Now()
	if err := ls.write(&batch.Batch{}); !errors.Is(err, io.EOF) || time.Since(start) < 20*time.Millisecond {
		t.Errorf("write: %v after %s, want io.EOF after the stuck timeout", err, time.Since(start))
	}
}

func TestStreamExecuteOnClosedSender(t *testing.T) {
	c := &streamAgentClient{stuckAfter: time.Second}
	c.callID.Store(1)
	l := &lane{c: c}
	ls := &laneStream{lane: l, cancel: func() {}, pending: map[uint64]*call{}, failed: make(chan struct{})}
	ls.sender = batch.NewSender(func(*batch.Batch) error { return nil }, ls.unsent, 1<<10)
	ls.sender.Close(errClientClosed) // closed, but the stream not yet marked failed
	cl := getCall(time.Second)
	defer putCall(cl)
	_, err, retry := ls.execute(context.Background(), cl, &agentv1.PolicyRequest{}, 1, false)
	if !errors.Is(err, ErrNotDelivered) || !errors.Is(err, errClientClosed) || !retry {
		t.Errorf("execute on a closed sender: %v (retry %v), want not delivered and a retry", err, retry)
	}
	if len(ls.pending) != 0 {
		t.Errorf("the call is still pending: %v", ls.pending)
	}
}

// A burst of calls grows a stream's map of pending calls; once the burst is over the map is
// made anew, so that a stream does not keep the room of its largest burst.
func TestPendingMapShrinksAfterABurst(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.sock")
	f := newStreamFake()
	serveAgent(t, path, f)
	c := newTestStreamClient(t, path, 1)
	warm(t, c)
	const burst = 2 * shrinkPendingAbove
	var wg sync.WaitGroup
	for i := range burst {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := callAgentFor(c, 10*time.Second, "hold", fmt.Sprint(i)); err != nil {
				t.Error(err)
			}
		}()
	}
	testenv.WaitFor(t, 10*time.Second, "the burst to be pending", func() bool { return pendingCalls(c) == burst })
	ls := c.lanes[0].cur.Load()
	ls.mu.Lock()
	grown := ls.peak
	ls.mu.Unlock()
	if grown != burst {
		t.Fatalf("peak %d while %d calls are pending", grown, burst)
	}
	close(f.release)
	wg.Wait()
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if len(ls.pending) != 0 || ls.peak != 0 {
		t.Fatalf("after the burst: %d pending, peak %d; want an empty map made anew", len(ls.pending), ls.peak)
	}
}
