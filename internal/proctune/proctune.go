// Package proctune lets a process run on one processor (GOMAXPROCS=1) while it is lightly
// loaded and gives it back the processors the runtime chose once it needs them. The agent uses
// it; the kernel keeps the runtime's choice (docs/performance.md, round 4).
//
// The agent spends a few microseconds of its own per call and most of the rest waking up: when
// a goroutine hands work to another and a processor is idle, the runtime wakes a second thread
// to look for work, which usually finds none and sleeps again. On two cores shared with Envoy
// and the kernel this cost about a fifth of its CPU per request at a few thousand requests per
// second. With a single processor the hand-offs stay on one thread and that cost goes; with more
// load than a core can take (RSA signatures to verify, say), more processors are needed, and a
// Tuner adds them. The kernel is not tuned: it is on every request's path, and on one processor
// at 2,500 requests/s its latency rose by more than the CPU it saved was worth.
//
// Every Interval the Tuner reads the process's CPU time (user and system, getrusage) and how
// long its goroutines waited to run (the runtime's /sched/latencies:seconds). It adds a
// processor when the process used more than Up of the processors it has, or when more than
// LateShare of the goroutines that ran had waited Late or longer: a process that the machine's
// other work keeps from its CPU uses little of it and still falls behind. It takes one away when,
// for Settle intervals in a row, it used less than Down of the processors it would keep and
// nothing waited that long. Between the two it leaves them, so that a steady load does not make
// it switch back and forth. A change is a short stop of the world, as the runtime documents for
// GOMAXPROCS.
//
// An operator who sets GOMAXPROCS in the environment keeps it: Start then does nothing. The
// ceiling is the runtime's default when the process starts (the CPUs it may use, or its cgroup's
// CPU limit); once the Tuner has set GOMAXPROCS the runtime no longer follows a change of that
// limit, and Stop gives the choice back to the runtime.
package proctune

import (
	"os"
	"runtime"
	"runtime/metrics"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Defaults of the Tuner's settings.
const (
	Interval = 100 * time.Millisecond
	Up       = 0.7
	Down     = 0.35
	Settle   = 10
	// Late is a wait to run that counts as falling behind; LateShare is the share of the
	// interval's goroutine runs that may have waited that long, and LateMin the fewest that count.
	Late      = time.Millisecond
	LateShare = 0.01
	LateMin   = 10
)

// Tuner adjusts GOMAXPROCS to the process's CPU use until stopped.
type Tuner struct {
	max      int
	interval time.Duration
	cpu      func() time.Duration // CPU time used so far
	waits    func() (late, all uint64)
	set      func(int) // sets GOMAXPROCS; 0 gives it back to the runtime

	mu    sync.Mutex
	procs int
	low   int // consecutive intervals below Down
	stop  chan struct{}
	done  chan struct{}
	once  sync.Once
}

// Start tunes GOMAXPROCS between 1 and the runtime's default, unless GOMAXPROCS is set in the
// environment or the default is already 1 (then it returns nil). It starts at one processor.
func Start() *Tuner {
	if _, set := os.LookupEnv("GOMAXPROCS"); set {
		return nil
	}
	t := newTuner(runtime.GOMAXPROCS(0), Interval, processCPU, newWaits().read, setProcs)
	if t == nil {
		return nil
	}
	ceiling.Store(int32(t.max))
	go t.run()
	return t
}

// newTuner makes a Tuner that has set one processor, or returns nil when max is 1.
func newTuner(max int, interval time.Duration, cpu func() time.Duration, waits func() (late, all uint64), set func(int)) *Tuner {
	if max <= 1 {
		return nil
	}
	t := &Tuner{max: max, interval: interval, cpu: cpu, waits: waits, set: set, procs: 1, stop: make(chan struct{}), done: make(chan struct{})}
	set(1)
	return t
}

func (t *Tuner) run() {
	defer close(t.done)
	tick := time.NewTicker(t.interval)
	defer tick.Stop()
	last, lastCPU := time.Now(), t.cpu()
	lastLate, lastAll := t.waits()
	for {
		select {
		case <-t.stop:
			return
		case now := <-tick.C:
			c := t.cpu()
			late, all := t.waits()
			if wall := now.Sub(last); wall > 0 {
				n := all - lastAll
				behind := late-lastLate >= LateMin && float64(late-lastLate) > LateShare*float64(n)
				t.observe(float64(c-lastCPU)/float64(wall), behind)
			}
			last, lastCPU, lastLate, lastAll = now, c, late, all
		}
	}
}

// observe takes the CPUs used over the last interval, and whether goroutines waited too long to
// run, and changes GOMAXPROCS if it should.
func (t *Tuner) observe(used float64, behind bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.procs == 0 { // stopped
		return
	}
	switch {
	case (used > Up*float64(t.procs) || behind) && t.procs < t.max:
		// Busy: add as many processors as the use asks for at once, not one per interval.
		t.procs = min(t.max, max(t.procs+1, int(used/Up)+1))
		t.low = 0
		t.set(t.procs)
	case behind:
		t.low = 0
	case t.procs > 1 && used < Down*float64(t.procs-1):
		t.low++
		if t.low >= Settle {
			t.procs--
			t.low = 0
			t.set(t.procs)
		}
	default:
		t.low = 0
	}
}

// ceiling is the most processors a running Tuner may give the process; 0 when none runs.
var ceiling atomic.Int32

// Ceiling is the most processors the process may get: the ceiling of the running Tuner, or the
// current GOMAXPROCS when none runs. Size what scales with the processors (worker pools) by it
// rather than by GOMAXPROCS, which a Tuner keeps at one while the process is idle.
func Ceiling() int {
	if c := ceiling.Load(); c > 0 {
		return int(c)
	}
	return runtime.GOMAXPROCS(0)
}

// Procs is the GOMAXPROCS the tuner last set.
func (t *Tuner) Procs() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.procs
}

// Stop ends the tuning and gives GOMAXPROCS back to the runtime's default. It is safe on a nil
// Tuner and more than once.
func (t *Tuner) Stop() {
	if t == nil {
		return
	}
	t.once.Do(func() {
		close(t.stop)
		<-t.done
		ceiling.CompareAndSwap(int32(t.max), 0)
		t.mu.Lock()
		defer t.mu.Unlock()
		t.procs = 0
		t.set(0)
	})
}

// setProcs sets GOMAXPROCS to n, or back to the runtime's default (which it then keeps up to
// date) for 0.
func setProcs(n int) {
	if n == 0 {
		runtime.SetDefaultGOMAXPROCS()
		return
	}
	runtime.GOMAXPROCS(n)
}

// waits reads the runtime's histogram of how long goroutines waited to run.
type waits struct {
	s []metrics.Sample
}

func newWaits() *waits {
	return &waits{s: []metrics.Sample{{Name: "/sched/latencies:seconds"}}}
}

// read returns how many goroutine runs so far had waited Late or longer, and how many there
// were.
func (w *waits) read() (late, all uint64) {
	metrics.Read(w.s)
	if w.s[0].Value.Kind() != metrics.KindFloat64Histogram {
		return 0, 0
	}
	h := w.s[0].Value.Float64Histogram()
	for i, c := range h.Counts {
		all += c
		// Bucket i holds [Buckets[i], Buckets[i+1]).
		if h.Buckets[i] >= Late.Seconds() {
			late += c
		}
	}
	return late, all
}

// processCPU is the CPU time the process has used, user and system.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
