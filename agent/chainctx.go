package agent

import (
	"context"
	"sync"
	"time"
)

// chainCtx is the context a chain runs in: the stream's context with the request's deadline
// (none when zero), and cancellable on its own when the kernel gives the call up.
// context.WithTimeout would arm a timer and register the child with the stream's context, whose
// lock every request on the stream then shares; most policies never ask for Done, so chainCtx
// does neither unless Done is called. Until then, Err compares the clock with the deadline.
type chainCtx struct {
	context.Context // the parent: values and cancellation
	deadline        time.Time

	mu         sync.Mutex
	done       chan struct{}
	err        error
	timer      *time.Timer
	stopParent func() bool
}

func newChainCtx(parent context.Context, deadline time.Time) *chainCtx {
	return &chainCtx{Context: parent, deadline: deadline}
}

// Deadline returns the chain's deadline, or the parent's when that is earlier.
func (c *chainCtx) Deadline() (time.Time, bool) {
	d, ok := c.Context.Deadline()
	if c.deadline.IsZero() || (ok && d.Before(c.deadline)) {
		return d, ok
	}
	return c.deadline, true
}

// Done returns a channel closed at the deadline or when the parent is done, made on first use.
func (c *chainCtx) Done() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done != nil {
		return c.done
	}
	c.done = make(chan struct{})
	if c.err != nil {
		close(c.done) // cancelled before anyone asked for Done
		return c.done
	}
	if err := c.errLocked(); err != nil {
		c.closeLocked(err)
		return c.done
	}
	if !c.deadline.IsZero() {
		c.timer = time.AfterFunc(time.Until(c.deadline), func() { c.close(context.DeadlineExceeded) })
	}
	c.stopParent = context.AfterFunc(c.Context, func() { c.close(c.Context.Err()) })
	return c.done
}

// Err reports why the chain must stop: the parent's error, or DeadlineExceeded once the
// deadline has passed.
func (c *chainCtx) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return c.err
	}
	if c.done != nil {
		return nil // Done is not closed yet: Err stays nil until it is
	}
	return c.errLocked()
}

func (c *chainCtx) errLocked() error {
	if err := c.Context.Err(); err != nil {
		return err
	}
	if !c.deadline.IsZero() && !time.Now().Before(c.deadline) {
		return context.DeadlineExceeded
	}
	return nil
}

// stoppedAt reports whether the chain must stop at now, a time the caller read: the deadline
// has passed, or the chain or its parent was cancelled. It is Err without a clock read.
func (c *chainCtx) stoppedAt(now time.Time) bool {
	if !c.deadline.IsZero() && !now.Before(c.deadline) {
		return true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err != nil || c.Context.Err() != nil
}

// cancel stops the chain: Err reports context.Canceled from now on.
func (c *chainCtx) cancel() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return
	}
	c.err = context.Canceled
	if c.done != nil {
		close(c.done)
	}
}

func (c *chainCtx) close(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closeLocked(err)
}

func (c *chainCtx) closeLocked(err error) {
	if c.err == nil {
		c.err = err
		close(c.done)
	}
}

// deadlineOf is the deadline of a request's chain: the kernel's deadline_ms, at most the
// agent's limit (server.max_chain_duration_ms), and that limit when the kernel sets none. No
// chain runs without a deadline.
func deadlineOf(req interface{ GetDeadlineMs() int64 }, limit time.Duration) time.Time {
	if ms := req.GetDeadlineMs(); ms > 0 {
		limit = min(limit, time.Duration(ms)*time.Millisecond)
	}
	return time.Now().Add(limit)
}

// release stops what Done started; the chain is over.
func (c *chainCtx) release() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.timer != nil {
		c.timer.Stop()
	}
	if c.stopParent != nil {
		c.stopParent()
	}
}

var _ context.Context = (*chainCtx)(nil)
