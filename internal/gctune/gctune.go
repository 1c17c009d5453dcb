// Package gctune keeps the garbage collector from running on every few megabytes of
// allocation while the live heap is small.
//
// With the default GOGC=100 a process whose live heap is 10 MiB collects every 10 MiB it
// allocates. The kernel and the agent allocate a few kilobytes per HTTP request and keep little
// of it, so under load they collected many times a second, and the collections (marking,
// assists, stack scans and the stack shrinking and regrowth that follow) took about a sixth of
// their CPU. A Tuner sets GOGC so that the heap may grow by a floor between collections, or by
// half the live heap once that is more: a process holding many streams, whose live heap is
// large and whose allocation rate is low while they wait, keeps less garbage than with the
// default GOGC of 100, at the price of more frequent collections of a heap that grows slowly.
//
// The runtime lets the heap grow by GOGC percent of the live heap plus the roots the last
// collection scanned (goroutine stacks and globals), not of the live heap alone, so the tuner
// divides the growth it wants by all three. With 10,000 held streams the stacks in use are
// about as large as the live heap; counting the live heap alone let the heap grow by nearly
// twice the growth meant (docs/performance.md, change 22).
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

// MaxPercent and MinPercent bound the GOGC the tuner sets. GOGC=0 would collect without
// pause; MinPercent is reached only when the roots are many times the growth.
const (
	MaxPercent = 5000
	MinPercent = 5
)

// minHeap is the runtime's smallest heap goal at GOGC=100: below it, the goal is
// minHeap*GOGC/100 whatever the live heap.
const minHeap = 4 << 20

// Percent is the GOGC that lets a heap of live bytes, whose collection also scans roots bytes
// of stacks and globals, grow by floor bytes before the next collection, or by half the live
// heap when that is more: between MinPercent and MaxPercent.
func Percent(live, roots, floor uint64) int {
	growth := max(floor, live/2)
	p := growth * 100 / max(live+roots, minHeap)
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

// samples are what the runtime's pacer counted at the last collection: the live heap, and the
// stacks and globals it scanned.
var samples = []metrics.Sample{
	{Name: "/gc/heap/live:bytes"},
	{Name: "/gc/scan/stack:bytes"},
	{Name: "/gc/scan/globals:bytes"},
}

// lastCollection reads the live heap and the roots of the last collection.
func lastCollection() (live, roots uint64) {
	s := make([]metrics.Sample, len(samples))
	copy(s, samples)
	metrics.Read(s)
	v := func(i int) uint64 {
		if s[i].Value.Kind() == metrics.KindUint64 {
			return s[i].Value.Uint64()
		}
		return 0
	}
	return v(0), v(1) + v(2)
}

// adjust sets GOGC for the live heap and roots of the last collection, when it moved by a
// tenth or more.
func (t *Tuner) adjust() {
	live, roots := lastCollection()
	p := Percent(live, roots, t.floor)
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
