package agent

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.uber.org/goleak"
)

type ctxKey struct{}

func TestChainCtxWithoutDone(t *testing.T) {
	parent := context.WithValue(context.Background(), ctxKey{}, "v")
	c := newChainCtx(parent, time.Now().Add(80*time.Millisecond))
	defer c.release()
	if c.Value(ctxKey{}) != "v" {
		t.Error("value of the parent not visible")
	}
	if d, ok := c.Deadline(); !ok || time.Until(d) > 80*time.Millisecond {
		t.Errorf("deadline %v %v", d, ok)
	}
	if err := c.Err(); err != nil {
		t.Fatalf("Err before the deadline: %v", err)
	}
	time.Sleep(100 * time.Millisecond)
	if err := c.Err(); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Err after the deadline: %v", err)
	}
	// Done asked for after the deadline is closed at once.
	select {
	case <-c.Done():
	default:
		t.Fatal("Done not closed after the deadline")
	}
}

func TestChainCtxDoneAtDeadline(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	c := newChainCtx(context.Background(), time.Now().Add(50*time.Millisecond))
	done := c.Done()
	if c.Done() != done {
		t.Fatal("Done returned another channel")
	}
	if err := c.Err(); err != nil {
		t.Fatalf("Err while Done is open: %v", err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed at the deadline")
	}
	if err := c.Err(); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Err = %v", err)
	}
	c.release()
}

func TestChainCtxParentCancelled(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	parent, cancel := context.WithCancel(context.Background())
	c := newChainCtx(parent, time.Now().Add(time.Hour))
	// Without Done: Err follows the parent.
	cancel()
	if err := c.Err(); !errors.Is(err, context.Canceled) {
		t.Fatalf("Err after the parent's cancel: %v", err)
	}
	c.release()

	parent, cancel = context.WithCancel(context.Background())
	c = newChainCtx(parent, time.Now().Add(time.Hour))
	done := c.Done()
	// A context derived from it sees the cancellation too.
	child, stopChild := context.WithCancel(c)
	defer stopChild()
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed when the parent was cancelled")
	}
	select {
	case <-child.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("derived context not cancelled")
	}
	if !errors.Is(c.Err(), context.Canceled) {
		t.Fatalf("Err = %v", c.Err())
	}
	c.release()
}

func TestChainCtxEarlierParentDeadline(t *testing.T) {
	parent, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	c := newChainCtx(parent, time.Now().Add(time.Hour))
	defer c.release()
	d, _ := c.Deadline()
	if time.Until(d) > time.Second {
		t.Fatalf("deadline %v: want the parent's earlier one", d)
	}
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed at the parent's deadline")
	}
}

func TestChainCtxReleaseStopsTimers(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	for range 100 {
		c := newChainCtx(context.Background(), time.Now().Add(time.Hour))
		_ = c.Done()
		c.release()
		if c.Err() != nil {
			t.Fatal("released context reports an error")
		}
	}
}

func TestChainCtxCancel(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	// Cancelled before Done is asked for.
	c := newChainCtx(context.Background(), time.Time{})
	if _, ok := c.Deadline(); ok {
		t.Error("a chain without a deadline reports one")
	}
	c.cancel()
	c.cancel()
	if !errors.Is(c.Err(), context.Canceled) {
		t.Fatalf("Err = %v", c.Err())
	}
	select {
	case <-c.Done():
	default:
		t.Fatal("Done open after cancel")
	}
	c.release()
	// Cancelled while a policy waits on Done.
	c = newChainCtx(context.Background(), time.Now().Add(time.Hour))
	done := c.Done()
	go c.cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed by cancel")
	}
	if !errors.Is(c.Err(), context.Canceled) {
		t.Fatalf("Err = %v", c.Err())
	}
	c.release()
}

func TestChainCtxStoppedAt(t *testing.T) {
	now := time.Now()
	c := newChainCtx(context.Background(), now.Add(time.Hour))
	defer c.release()
	if c.stoppedAt(now) || !c.stoppedAt(now.Add(time.Hour)) {
		t.Fatal("stoppedAt must compare the given time with the deadline")
	}
	c.cancel()
	if !c.stoppedAt(now) {
		t.Fatal("a cancelled chain is stopped")
	}
	parent, cancel := context.WithCancel(context.Background())
	c2 := newChainCtx(parent, now.Add(time.Hour))
	defer c2.release()
	cancel()
	if !c2.stoppedAt(now) {
		t.Fatal("a chain whose parent is done is stopped")
	}
}
