package policy

import (
	"context"
	"testing"
	"time"
)

func TestAnswerBy(t *testing.T) {
	if _, ok := AnswerBy(context.Background()); ok {
		t.Error("a context without deadline has an answer time")
	}
	// f checks that with left until the deadline, the answer time leaves between min and max
	// before it.
	f := func(left, minReserve, maxReserve time.Duration) {
		t.Helper()
		deadline := time.Now().Add(left)
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		defer cancel()
		by, ok := AnswerBy(ctx)
		if !ok {
			t.Fatalf("%v left: no answer time", left)
		}
		if r := deadline.Sub(by); r < minReserve || r > maxReserve {
			t.Errorf("%v left: %v reserved, want %v to %v", left, r, minReserve, maxReserve)
		}
	}
	f(150*time.Millisecond, 73*time.Millisecond, 75*time.Millisecond)
	f(time.Second, 495*time.Millisecond, 500*time.Millisecond)
	f(15*time.Millisecond, MinAnswerReserve, MinAnswerReserve)
	// Past the deadline the answer time has passed too.
	f(-time.Millisecond, MinAnswerReserve, MinAnswerReserve)
}
