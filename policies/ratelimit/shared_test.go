package ratelimit

import (
	"sync"
	"sync/atomic"
	"testing"
)

type refValue struct{ closed atomic.Bool }

// TestAcquireConcurrent acquires and releases one key from many goroutines: no caller ever
// gets a closed value, every value made is closed exactly once, and nothing is left behind.
func TestAcquireConcurrent(t *testing.T) {
	shared := &sync.Map{}
	var made, closed atomic.Int64
	create := func() (*refValue, func()) {
		made.Add(1)
		v := &refValue{}
		return v, func() {
			if v.closed.Swap(true) {
				t.Error("a value was closed twice")
			}
			closed.Add(1)
		}
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 2000 {
				v, release := acquire(shared, "k", create)
				if v.closed.Load() {
					t.Error("acquire returned a closed value")
				}
				release()
				release() // a second release of the same reference does nothing
			}
		})
	}
	wg.Wait()
	if made.Load() == 0 || made.Load() != closed.Load() {
		t.Fatalf("made %d values and closed %d, want the same, above 0", made.Load(), closed.Load())
	}
	if _, ok := shared.Load("k"); ok {
		t.Fatal("an entry is left after every reference was released")
	}
}

func TestAcquireKeepsValueWhileHeld(t *testing.T) {
	shared := &sync.Map{}
	n := 0
	create := func() (*refValue, func()) {
		n++
		v := &refValue{}
		return v, func() { v.closed.Store(true) }
	}
	a, releaseA := acquire(shared, "k", create)
	b, releaseB := acquire(shared, "k", create)
	if a != b || n != 1 {
		t.Fatalf("two holders got different values (%d made)", n)
	}
	releaseA()
	if a.closed.Load() {
		t.Fatal("value closed while a holder remains")
	}
	releaseB()
	if !a.closed.Load() {
		t.Fatal("value not closed after the last holder released it")
	}
	c, releaseC := acquire(shared, "k", create)
	defer releaseC()
	if c == a || n != 2 {
		t.Fatal("a new holder after the last release got the closed value")
	}
}
