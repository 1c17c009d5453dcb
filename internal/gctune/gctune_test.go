package gctune

import (
	"os"
	"runtime"
	"runtime/debug"
	"testing"
	"time"
)

func TestPercent(t *testing.T) {
	const mib = 1 << 20
	for _, c := range []struct {
		live, floor uint64
		want        int
	}{
		// Below 4 MiB the runtime's smallest goal applies: 4 MiB * GOGC / 100.
		{0, 16 * mib, 400},
		{1 * mib, 16 * mib, 400},
		{1 * mib, 1 << 40, MaxPercent},
		{10 * mib, 64 * mib, 640},
		{32 * mib, 64 * mib, 200},
		{64 * mib, 64 * mib, 100},
		// Past the floor the heap grows by the floor, then by half the live heap.
		{96 * mib, 64 * mib, 66},
		{128 * mib, 64 * mib, 50},
		{500 * mib, 64 * mib, MinPercent},
	} {
		if got := Percent(c.live, c.floor); got != c.want {
			t.Errorf("Percent(%d MiB, %d MiB) = %d, want %d", c.live/mib, c.floor/mib, got, c.want)
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
	if got := tu.Current(); got != MinPercent {
		t.Errorf("64 MiB live with an 8 MiB floor: GOGC %d, want %d", got, MinPercent)
	}
	// The live heap shrinks: the tuner raises GOGC after the next collection.
	sink = nil
	runtime.GC()
	deadline := time.Now().Add(5 * time.Second)
	for tu.Current() == 100 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := tu.Current(); got <= 100 || gcPercent() != got {
		t.Errorf("after the heap shrank: GOGC %d (runtime %d), want above 100", got, gcPercent())
	}
}

// sink holds a live heap for the test.
var sink [][]byte
