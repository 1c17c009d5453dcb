// Package gctune keeps the garbage collector from running on every few megabytes of
// allocation while the live heap is small.
//
// With the default GOGC=100 a process whose live heap is 10 MiB collects every 10 MiB it
// allocates. The kernel and the agent allocate a few kilobytes per HTTP request and keep little
// of it, so under load they collected many times a second, and the collections (marking,
// assists, stack scans and the stack shrinking and regrowth that follow) took about a sixth of
// their CPU. A Tuner raises GOGC so that the heap may grow by at least a floor between
// collections, and lowers it as the live heap grows past the floor, down to 50 (a growth of
// half the live heap) past twice the floor: a process holding many streams, whose live heap is
// large and whose allocation rate is low while they wait, keeps less garbage than with the
// default GOGC of 100, at the price of more frequent collections of a heap that grows slowly.
//
// An operator who sets GOGC in the environment keeps it: Start then does nothing. GOMEMLIMIT,
// when set, still bounds the heap as the runtime documents.
package gctune

import (
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"sync/atomic"
)

// MaxPercent and MinPercent bound the GOGC the tuner sets.
const (
	MaxPercent = 5000
	MinPercent = 50
)

// minHeap is the runtime's smallest heap goal at GOGC=100: below it, the goal is
// minHeap*GOGC/100 whatever the live heap.
const minHeap = 4 << 20

// Percent is the GOGC that lets a heap of live bytes grow by floor bytes before the next
// collection, or by half the live heap when that is more: between MinPercent and MaxPercent.
func Percent(live, floor uint64) int {
	p := floor * 100 / max(live, minHeap)
	return int(min(max(p, MinPercent), MaxPercent))
}

// Tuner adjusts GOGC to the live heap after every collection until stopped.
type Tuner struct {
	floor    uint64
	previous int
	stopped  atomic.Bool

	mu      sync.Mutex
	percent int
	once    sync.Once
}

// Start tunes GOGC with the given floor, unless GOGC is set in the environment (then it
// returns nil). Stop the returned Tuner to restore the GOGC the process had.
func Start(floor uint64) *Tuner {
	if _, set := os.LookupEnv("GOGC"); set {
		return nil
	}
	t := &Tuner{floor: floor}
	t.previous = debug.SetGCPercent(100)
	t.percent = 100
	t.adjust()
	t.arm()
	return t
}

// sentinel is garbage as soon as it is made: its finalizer runs after the next collection.
type sentinel struct{ t *Tuner }

// arm schedules an adjustment after the next collection, which schedules the next one.
func (t *Tuner) arm() {
	runtime.SetFinalizer(&sentinel{t: t}, func(s *sentinel) {
		if s.t.stopped.Load() {
			return
		}
		s.t.adjust()
		s.t.arm()
	})
}

var liveSample = []metrics.Sample{{Name: "/gc/heap/live:bytes"}}

// adjust sets GOGC for the live heap of the last collection, when it moved by a tenth or more.
func (t *Tuner) adjust() {
	s := make([]metrics.Sample, 1)
	copy(s, liveSample)
	metrics.Read(s)
	var live uint64
	if s[0].Value.Kind() == metrics.KindUint64 {
		live = s[0].Value.Uint64()
	}
	p := Percent(live, t.floor)
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped.Load() {
		return
	}
	if d := p - t.percent; d*10 > t.percent || -d*10 > t.percent {
		debug.SetGCPercent(p)
		t.percent = p
	}
}

// Current is the GOGC the tuner last set.
func (t *Tuner) Current() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.percent
}

// Stop ends the tuning and restores the GOGC the process had before Start. It is safe on a nil
// Tuner and more than once.
func (t *Tuner) Stop() {
	if t == nil {
		return
	}
	t.once.Do(func() {
		t.stopped.Store(true)
		t.mu.Lock()
		defer t.mu.Unlock()
		debug.SetGCPercent(t.previous)
		t.percent = t.previous
	})
}
