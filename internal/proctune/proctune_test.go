package proctune

import (
	"os"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

// recorder is a fake runtime: it records what the tuner sets.
type recorder struct{ sets []int }

func (r *recorder) set(n int) { r.sets = append(r.sets, n) }

func TestRules(t *testing.T) {
	r := &recorder{}
	if newTuner(1, time.Hour, nil, nil, r.set) != nil || len(r.sets) != 0 {
		t.Fatal("a process with one CPU got a tuner")
	}
	tu := newTuner(4, time.Hour, nil, nil, r.set)
	if tu.Procs() != 1 || len(r.sets) != 1 || r.sets[0] != 1 {
		t.Fatalf("start: procs %d, sets %v; want one processor set", tu.Procs(), r.sets)
	}
	step := func(used float64, want int) {
		t.Helper()
		tu.observe(used, false)
		if got := tu.Procs(); got != want {
			t.Fatalf("after using %.2f CPUs: %d processors, want %d (sets %v)", used, got, want, r.sets)
		}
	}
	// Light load stays on one processor; past Up of it, a second is added at once.
	step(0.5, 1)
	step(0.69, 1)
	step(0.75, 2)
	// A load of 2.5 CPUs on 2 processors asks for 4 at once (2.5/0.7 → 4), not one more a tick.
	step(2.5, 4)
	step(9, 4) // never past the ceiling
	// Down only after Settle intervals in a row under Down of one processor fewer.
	for range Settle - 1 {
		step(0.9, 4) // 0.9 < 0.35*3
	}
	step(1.2, 4) // not below: the count starts again
	for range Settle - 1 {
		step(0.9, 4)
	}
	step(0.9, 3)
	// Between Down and Up nothing changes, however long.
	for range 3 * Settle {
		step(0.8, 3) // 0.7 < 0.8 and 0.8 > 0.35*2
	}
	for i := 0; i < 2*Settle; i++ {
		tu.observe(0, false)
	}
	step(0, 1)
	// Goroutines waiting too long to run add a processor however little CPU the process got,
	// and keep it while they wait.
	stepBehind := func(want int) {
		t.Helper()
		tu.observe(0.1, true)
		if got := tu.Procs(); got != want {
			t.Fatalf("behind: %d processors, want %d", got, want)
		}
	}
	stepBehind(2)
	stepBehind(3)
	stepBehind(4)
	stepBehind(4) // never past the ceiling
	for range 3 * Settle {
		step(0.1, 4)
		stepBehind(4) // no run of quiet intervals is long enough to give one back
	}
	for i := 0; i < 3*Settle-1; i++ {
		tu.observe(0.1, false)
	}
	step(0.1, 1)
	want := []int{1, 2, 4, 3, 2, 1, 2, 3, 4, 3, 2, 1}
	if len(r.sets) != len(want) {
		t.Fatalf("sets %v, want %v", r.sets, want)
	}
	for i := range want {
		if r.sets[i] != want[i] {
			t.Fatalf("sets %v, want %v", r.sets, want)
		}
	}
}

func TestRunReadsCPUAndStops(t *testing.T) {
	var cpu atomic.Int64 // ns; advanced by the test as if the process used 1.5 CPUs
	sets := make(chan int, 16)
	tu := newTuner(2, 5*time.Millisecond, func() time.Duration { return time.Duration(cpu.Load()) }, func() (uint64, uint64) { return 0, 0 }, func(n int) { sets <- n })
	if n := <-sets; n != 1 {
		t.Fatalf("first set %d, want 1", n)
	}
	go tu.run()
	stopBurn := make(chan struct{})
	go func() {
		for start := time.Now(); ; {
			select {
			case <-stopBurn:
				return
			case <-time.After(time.Millisecond):
				cpu.Store(int64(1.5 * float64(time.Since(start))))
			}
		}
	}()
	select {
	case n := <-sets:
		if n != 2 {
			t.Fatalf("under load set %d, want 2", n)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the tuner did not add a processor under load")
	}
	close(stopBurn)
	select {
	case n := <-sets:
		if n != 1 {
			t.Fatalf("idle: set %d, want 1", n)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the tuner did not take the processor back when idle")
	}
	tu.Stop()
	tu.Stop()
	if n := <-sets; n != 0 {
		t.Fatalf("Stop set %d, want 0 (the runtime's default)", n)
	}
	tu.observe(5, true) // after Stop: nothing
	if len(sets) != 0 {
		t.Fatal("a stopped tuner changed GOMAXPROCS")
	}
	var nilTuner *Tuner
	nilTuner.Stop()
}

// The runtime's histogram of waits to run counts the goroutines that one hogging the only
// processor kept waiting.
func TestWaitsReadsTheRuntime(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	w := newWaits()
	late0, all0 := w.read()
	var stop atomic.Bool
	done := make(chan struct{})
	// The runtime samples one goroutine run in eight.
	const sleepers = 100
	for range sleepers {
		go func() {
			for !stop.Load() {
				time.Sleep(time.Millisecond)
			}
			done <- struct{}{}
		}()
	}
	// A loop without calls: only the runtime's preemption (about every 10 ms) lets the
	// sleepers run.
	end := time.Now().Add(time.Second)
	for n := 0; time.Now().Before(end); n++ {
		_ = n * n
	}
	stop.Store(true)
	for range sleepers {
		<-done
	}
	late, all := w.read()
	if all <= all0 || late < late0+LateMin || late > all {
		t.Fatalf("waits: late %d → %d, all %d → %d; want some runs, at least %d of them late", late0, late, all0, all, LateMin)
	}
}

// The real thing: this process's GOMAXPROCS follows its CPU use.
func TestStartFollowsTheProcess(t *testing.T) {
	def := runtime.GOMAXPROCS(0)
	if def < 2 {
		t.Skip("one CPU: nothing to tune")
	}
	t.Setenv("GOMAXPROCS", "2")
	if Start() != nil {
		t.Fatal("Start tuned a process whose GOMAXPROCS the environment sets")
	}
	if runtime.GOMAXPROCS(0) != def {
		t.Fatal("Start changed GOMAXPROCS although the environment sets it")
	}
	unsetenv(t, "GOMAXPROCS")

	if Ceiling() != def {
		t.Fatalf("Ceiling without a tuner = %d, want GOMAXPROCS %d", Ceiling(), def)
	}
	tu := Start()
	defer tu.Stop()
	if got := runtime.GOMAXPROCS(0); got != 1 || tu.Procs() != 1 {
		t.Fatalf("after Start GOMAXPROCS is %d (tuner %d), want 1", got, tu.Procs())
	}
	if Ceiling() != def {
		t.Fatalf("Ceiling on one processor = %d, want the default %d", Ceiling(), def)
	}
	// Busy on more than one CPU's worth of goroutines: the tuner adds processors.
	var stop atomic.Bool
	for range def {
		go func() {
			for n := 0; !stop.Load(); n++ {
				_ = n * n
			}
		}()
	}
	deadline := time.Now().Add(10 * time.Second)
	for runtime.GOMAXPROCS(0) < 2 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	stop.Store(true)
	if got := runtime.GOMAXPROCS(0); got < 2 {
		t.Fatalf("under load GOMAXPROCS stayed %d", got)
	}
	// Idle again: back to one.
	deadline = time.Now().Add(10 * time.Second)
	for runtime.GOMAXPROCS(0) != 1 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if got := runtime.GOMAXPROCS(0); got != 1 {
		t.Fatalf("idle, GOMAXPROCS stayed %d", got)
	}
	tu.Stop()
	if got := runtime.GOMAXPROCS(0); got != def {
		t.Fatalf("after Stop GOMAXPROCS is %d, want the default %d", got, def)
	}
}

// unsetenv removes a variable for the rest of the test (t.Setenv restores it afterwards).
func unsetenv(t *testing.T, key string) {
	t.Helper()
	if err := os.Unsetenv(key); err != nil {
		t.Fatal(err)
	}
}

// run turns the growth of the runtime's late waits into a processor, with no CPU used.
func TestRunAddsAProcessorWhenGoroutinesWait(t *testing.T) {
	var late atomic.Uint64
	sets := make(chan int, 16)
	tu := newTuner(2, 5*time.Millisecond, func() time.Duration { return 0 },
		func() (uint64, uint64) { l := late.Add(LateMin); return l, 10 * l }, func(n int) { sets <- n })
	<-sets
	go tu.run()
	defer tu.Stop()
	select {
	case n := <-sets:
		if n != 2 {
			t.Fatalf("set %d, want 2", n)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("late waits did not add a processor")
	}
}
