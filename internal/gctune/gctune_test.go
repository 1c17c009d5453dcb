package gctune

import (
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"testing"
	"time"
)

func TestPercent(t *testing.T) {
	const mib = 1 << 20
	for _, c := range []struct {
		live, roots, floor uint64
		want               int
	}{
		// Below 4 MiB the runtime's smallest goal applies: 4 MiB * GOGC / 100.
		{0, 0, 16 * mib, 400},
		{1 * mib, 1 * mib, 16 * mib, 400},
		{1 * mib, 0, 1 << 40, MaxPercent},
		{10 * mib, 0, 64 * mib, 640},
		{32 * mib, 0, 64 * mib, 200},
		{64 * mib, 0, 64 * mib, 100},
		// Past the floor the heap grows by the floor, then by half the live heap.
		{96 * mib, 0, 64 * mib, 66},
		{128 * mib, 0, 64 * mib, 50},
		{500 * mib, 0, 64 * mib, 50},
		// The roots count with the live heap: 10,000 held streams' stacks.
		{26 * mib, 31 * mib, 16 * mib, 28},
		{128 * mib, 128 * mib, 64 * mib, 25},
		{1 * mib, 1000 * mib, 16 * mib, MinPercent},
	} {
		if got := Percent(c.live, c.roots, c.floor); got != c.want {
			t.Errorf("Percent(%d MiB, %d MiB, %d MiB) = %d, want %d", c.live/mib, c.roots/mib, c.floor/mib, got, c.want)
		}
	}
}

// gcPercent reads the runtime's GOGC without changing it.
func gcPercent() int {
	p := debug.SetGCPercent(100)
	debug.SetGCPercent(p)
	return p
}

func unsetGOGC(t *testing.T) {
	t.Helper()
	t.Setenv("GOGC", "")
	if err := os.Unsetenv("GOGC"); err != nil {
		t.Fatal(err)
	}
}

func TestOperatorsGOGCWins(t *testing.T) {
	t.Setenv("GOGC", "150")
	before := gcPercent()
	tu := Start(1 << 30)
	if tu != nil {
		t.Fatal("Start tuned although GOGC is set")
	}
	tu.Stop() // nil-safe
	if got := gcPercent(); got != before {
		t.Errorf("GOGC changed from %d to %d", before, got)
	}
}

func TestTunerFollowsTheLiveHeap(t *testing.T) {
	unsetGOGC(t)
	before := gcPercent()
	// A floor far above the live heap: the heap may grow a lot between collections.
	tu := Start(1 << 40)
	if got := tu.Current(); got != MaxPercent || gcPercent() != MaxPercent {
		t.Fatalf("small live heap: GOGC %d (runtime %d), want %d", got, gcPercent(), MaxPercent)
	}
	tu.Stop()
	tu.Stop() // a second Stop changes nothing
	if got := gcPercent(); got != before {
		t.Fatalf("after Stop: GOGC %d, want the %d it had", got, before)
	}

	// A live heap above twice the floor: it may grow by half of itself.
	for range 64 {
		sink = append(sink, make([]byte, 1<<20))
	}
	runtime.GC()
	tu = Start(8 << 20)
	defer tu.Stop()
	if got := tu.Current(); got < 40 || got > 50 {
		t.Errorf("64 MiB live with an 8 MiB floor: GOGC %d, want about 50 (less for the roots)", got)
	}
	// The live heap shrinks: the tuner raises GOGC after the next collection.
	sink = nil
	runtime.GC()
	deadline := time.Now().Add(5 * time.Second)
	for tu.Current() <= 100 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := tu.Current(); got <= 100 || gcPercent() != got {
		t.Errorf("after the heap shrank: GOGC %d (runtime %d), want above 100", got, gcPercent())
	}
}

// TestGrowthCountsTheStacks holds goroutines whose stacks are much larger than the live heap,
// as held streams do, and checks the heap goal the tuner's GOGC gives the runtime: the live
// heap plus the floor, not the floor scaled by the stacks.
func TestGrowthCountsTheStacks(t *testing.T) {
	unsetGOGC(t)
	const floor = 8 << 20
	release := make(chan struct{})
	var started sync.WaitGroup
	for range 2000 {
		started.Add(1)
		go deepWait(16, &started, release)
	}
	defer close(release)
	started.Wait()
	runtime.GC()
	tu := Start(floor)
	defer tu.Stop()

	s := []metrics.Sample{{Name: "/gc/heap/goal:bytes"}, {Name: "/gc/heap/live:bytes"}, {Name: "/gc/scan/stack:bytes"}}
	metrics.Read(s)
	goal, live, stacks := s[0].Value.Uint64(), s[1].Value.Uint64(), s[2].Value.Uint64()
	if stacks < 16<<20 {
		t.Fatalf("the goroutines' stacks in use are %d bytes, want 16 MiB or more for the test to mean anything", stacks)
	}
	growth := float64(goal) - float64(live)
	want := float64(max(floor, live/2))
	if growth < 0.8*want || growth > 1.25*want {
		t.Errorf("heap goal %d with %d live and %d of stacks (GOGC %d): the heap may grow by %.0f, want about %.0f",
			goal, live, stacks, tu.Current(), growth, want)
	}
}

// deepWait uses about depth KiB of its stack, then waits for release.
func deepWait(depth int, started *sync.WaitGroup, release chan struct{}) {
	var pad [1024]byte
	pad[depth%len(pad)] = byte(depth)
	if depth > 0 {
		deepWait(depth-1, started, release)
		return
	}
	started.Done()
	<-release
	runtime.KeepAlive(&pad)
}

// sink holds a live heap for the test.
var sink [][]byte
