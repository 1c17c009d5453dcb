package ratelimit

import (
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// manualClock is an injectable clock for the local store.
type manualClock struct{ ns atomic.Int64 }

func newManualClock() *manualClock {
	c := &manualClock{}
	c.ns.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	return c
}

func (c *manualClock) Now() int64              { return c.ns.Load() }
func (c *manualClock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

func TestLimitTake(t *testing.T) {
	type step struct {
		advance   time.Duration
		allowed   bool
		remaining int64
		retry     time.Duration // retryAfter when denied
		reset     time.Duration
	}
	f := func(name string, rps float64, burst int64, steps []step) {
		t.Helper()
		l := newLimit(rps, burst)
		clk := newManualClock()
		var b bucket
		for i, s := range steps {
			clk.Advance(s.advance)
			d, ok := l.take(&b, clk.Now())
			if !ok {
				t.Fatalf("%s: step %d: live bucket reported dead", name, i)
			}
			want := decision{allowed: s.allowed, limit: burst, remaining: s.remaining, retryAfter: s.retry, reset: s.reset}
			if d != want {
				t.Fatalf("%s: step %d: got %+v, want %+v", name, i, d, want)
			}
		}
	}
	// 10 per second, burst 3: a request costs 100ms, a full bucket refills in 300ms.
	f("burst then deny", 10, 3, []step{
		{allowed: true, remaining: 2, reset: 100 * time.Millisecond},
		{allowed: true, remaining: 1, reset: 200 * time.Millisecond},
		{allowed: true, remaining: 0, reset: 300 * time.Millisecond},
		{allowed: false, retry: 100 * time.Millisecond, reset: 300 * time.Millisecond},
		{advance: 40 * time.Millisecond, allowed: false, retry: 60 * time.Millisecond, reset: 260 * time.Millisecond},
	})
	f("refill one token", 10, 3, []step{
		{allowed: true, remaining: 2, reset: 100 * time.Millisecond},
		{allowed: true, remaining: 1, reset: 200 * time.Millisecond},
		{allowed: true, remaining: 0, reset: 300 * time.Millisecond},
		{advance: 100 * time.Millisecond, allowed: true, remaining: 0, reset: 300 * time.Millisecond},
		{allowed: false, retry: 100 * time.Millisecond, reset: 300 * time.Millisecond},
	})
	f("full after idle", 10, 3, []step{
		{allowed: true, remaining: 2, reset: 100 * time.Millisecond},
		{allowed: true, remaining: 1, reset: 200 * time.Millisecond},
		{advance: time.Hour, allowed: true, remaining: 2, reset: 100 * time.Millisecond},
	})
	f("burst 1", 2, 1, []step{
		{allowed: true, remaining: 0, reset: 500 * time.Millisecond},
		{advance: 499 * time.Millisecond, allowed: false, retry: time.Millisecond, reset: time.Millisecond},
		{advance: time.Millisecond, allowed: true, remaining: 0, reset: 500 * time.Millisecond},
	})
	f("fractional rate", 0.5, 1, []step{
		{allowed: true, remaining: 0, reset: 2 * time.Second},
		{advance: time.Second, allowed: false, retry: time.Second, reset: time.Second},
		{advance: time.Second, allowed: true, remaining: 0, reset: 2 * time.Second},
	})
}

// TestLimitSustainedRate checks the long-run rate: with requests arriving much faster than
// the limit, the number allowed over a window is burst plus rate × window.
func TestLimitSustainedRate(t *testing.T) {
	l := newLimit(100, 10)
	clk := newManualClock()
	var b bucket
	allowed := 0
	for range 10000 { // one request per millisecond for 10 s
		if d, _ := l.take(&b, clk.Now()); d.allowed {
			allowed++
		}
		clk.Advance(time.Millisecond)
	}
	if want := 10 + 100*10; allowed < want-1 || allowed > want {
		t.Fatalf("allowed %d requests in 10s at 100/s with burst 10, want about %d", allowed, want)
	}
}

func TestLocalStoreKeys(t *testing.T) {
	clk := newManualClock()
	s := newLocalStore(100, clk.Now)
	l := newLimit(1, 1)
	if !s.take(l, "route-a", "id", "1.2.3.4").allowed {
		t.Fatal("first request of a key denied")
	}
	if s.take(l, "route-a", "id", "1.2.3.4").allowed {
		t.Fatal("second request of the same key within its limit allowed")
	}
	// Another key, another scope and another limit identity each have their own bucket.
	for _, k := range [][3]string{{"route-a", "id", "5.6.7.8"}, {"route-b", "id", "1.2.3.4"}, {"route-a", "other", "1.2.3.4"}} {
		if !s.take(l, k[0], k[1], k[2]).allowed {
			t.Fatalf("bucket %q shares a bucket it should not", k)
		}
	}
	// The missing-key bucket is separate from every key value, the empty one included.
	if !s.takeMissing(l, "route-a", "id").allowed || s.takeMissing(l, "route-a", "id").allowed {
		t.Fatal("missing-key bucket does not limit")
	}
	if !s.take(l, "route-a", "id", "").allowed {
		t.Fatal("empty key value shares the missing-key bucket")
	}
	if got := s.size(); got != 5 {
		t.Fatalf("store holds %d buckets, want 5", got)
	}
}

// TestLocalStoreBounded fills the store with 200k random keys, more than its cap: the number
// of buckets and the heap stay bounded, the keys beyond the cap share the overflow bucket (so
// new keys cannot escape the limit), and a sweep after the refill time empties the store.
func TestLocalStoreBounded(t *testing.T) {
	const maxBuckets, keys = 20000, 200000
	clk := newManualClock()
	s := newLocalStore(maxBuckets, clk.Now)
	l := newLimit(1, 5)
	overflowBefore := localOverflow.Get()

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)

	rng := rand.New(rand.NewPCG(1, 2))
	allowed := 0
	for range keys {
		if s.take(l, "r", "id", fmt.Sprintf("k%016x", rng.Uint64())).allowed {
			allowed++
		}
	}
	if got := s.size(); got != maxBuckets {
		t.Fatalf("store holds %d buckets after %d random keys, want the cap %d", got, keys, maxBuckets)
	}
	if got := s.buckets.Size(); got != maxBuckets {
		t.Fatalf("map holds %d buckets, want %d", got, maxBuckets)
	}
	if got := localOverflow.Get() - overflowBefore; got != keys-maxBuckets {
		t.Fatalf("overflow counted %d requests, want %d", got, keys-maxBuckets)
	}
	// Every key under the cap gets its own bucket; the rest share one bucket of burst 5.
	if want := maxBuckets + 5; allowed != want {
		t.Fatalf("allowed %d requests, want %d (one per bucket plus the overflow burst)", allowed, want)
	}

	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	grown := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	// A bucket costs its map entry and an 8-byte struct: well under 200 bytes.
	if limit := int64(maxBuckets * 200); grown > limit {
		t.Fatalf("heap grew by %d bytes for %d buckets, want at most %d", grown, maxBuckets, limit)
	}
	t.Logf("heap grew by %d bytes for %d buckets (%d bytes each)", grown, maxBuckets, grown/maxBuckets)

	// Not yet refilled: the sweep keeps every bucket.
	s.sweep(clk.Now())
	if got := s.size(); got != maxBuckets {
		t.Fatalf("sweep before refill left %d buckets, want %d", got, maxBuckets)
	}
	clk.Advance(5 * time.Second)
	s.sweep(clk.Now())
	if got, gotMap, gotFixed := s.size(), s.buckets.Size(), s.fixed.Size(); got != 0 || gotMap != 0 || gotFixed != 0 {
		t.Fatalf("sweep after refill left %d counted, %d mapped and %d fixed buckets, want none", got, gotMap, gotFixed)
	}
	// With room again, a new key gets its own bucket.
	if !s.take(l, "r", "id", "new").allowed || s.size() != 1 {
		t.Fatal("a new key after the sweep got no bucket")
	}
}

func TestLocalStoreSweepKeepsBusyBuckets(t *testing.T) {
	clk := newManualClock()
	s := newLocalStore(10, clk.Now)
	l := newLimit(1, 2) // refills in 2s
	s.take(l, "r", "id", "busy")
	s.take(l, "r", "id", "idle")
	clk.Advance(1500 * time.Millisecond)
	s.take(l, "r", "id", "busy") // its bucket is full again only 1s after this
	clk.Advance(600 * time.Millisecond)
	s.sweep(clk.Now())
	if got := s.size(); got != 1 {
		t.Fatalf("sweep left %d buckets, want only the busy one", got)
	}
	if _, ok := s.buckets.Load(s.hash("r", "id", kindValue, "busy")); !ok {
		t.Fatal("sweep dropped the bucket that had not refilled")
	}
}

// TestLocalStoreConcurrent hammers one bucket from many goroutines at a fixed time: exactly
// burst requests get through, however the goroutines interleave.
func TestLocalStoreConcurrent(t *testing.T) {
	clk := newManualClock()
	s := newLocalStore(1000, clk.Now)
	l := newLimit(1, 100)
	var allowed atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 1000 {
				if s.take(l, "r", "id", "hot").allowed {
					allowed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if got := allowed.Load(); got != 100 {
		t.Fatalf("allowed %d of 8000 concurrent requests, want the burst of 100", got)
	}
}

// TestLocalStoreSweepRace sweeps while requests run: a request never spends a token on a
// bucket the sweep removed, so the total allowed is exact.
func TestLocalStoreSweepRace(t *testing.T) {
	clk := newManualClock()
	s := newLocalStore(1000, clk.Now)
	l := newLimit(1, 1)
	const rounds = 200
	var allowed atomic.Int64
	for range rounds {
		// Each round the bucket is full again, so the sweep may drop it at any moment; of
		// the concurrent requests exactly one must win.
		clk.Advance(2 * time.Second)
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				if s.take(l, "r", "id", "k").allowed {
					allowed.Add(1)
				}
			})
		}
		wg.Go(func() { s.sweep(clk.Now()) })
		wg.Wait()
	}
	if got := allowed.Load(); got != rounds {
		t.Fatalf("allowed %d requests over %d rounds of burst 1, want %d", got, rounds, rounds)
	}
}

func TestCachedClock(t *testing.T) {
	defer goleak.VerifyNone(t)
	var jobs atomic.Int64
	var last atomic.Int64
	c := startCachedClock(time.Millisecond, 3, func(now int64) {
		jobs.Add(1)
		last.Store(now)
	})
	start := c.Now()
	if d := time.Duration(time.Now().UnixNano() - start); d < -time.Second || d > time.Second {
		t.Fatalf("cached clock starts %v away from the wall clock", d)
	}
	deadline := time.Now().Add(5 * time.Second)
	for jobs.Load() < 3 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if jobs.Load() < 3 {
		t.Fatalf("job ran %d times in 5s, want it every 3 ticks of 1ms", jobs.Load())
	}
	if now := c.Now(); now <= start || last.Load() > now {
		t.Fatalf("clock did not advance monotonically: start %d, job saw %d, now %d", start, last.Load(), now)
	}
	c.Stop()
}

func TestStartLocalStoreStops(t *testing.T) {
	defer goleak.VerifyNone(t)
	before := localBuckets.Load()
	s, stop := startLocalStore(10)
	s.take(newLimit(1, 1), "r", "id", "a")
	if got := localBuckets.Load() - before; got != 1 {
		t.Fatalf("bucket gauge rose by %d, want 1", got)
	}
	stop()
	if got := localBuckets.Load() - before; got != 0 {
		t.Fatalf("bucket gauge is %d above its start after the store stopped, want 0", got)
	}
}

// BenchmarkLocalTake measures one decision of the local store from all CPUs: a few hot keys
// (contention on one bucket) and many keys (lookups spread over the map). Compare two
// versions with benchstat:
//
//	go test -run '^$' -bench LocalTake -count 10 ./policies/ratelimit/ > old.txt
//	(change the code)
//	go test -run '^$' -bench LocalTake -count 10 ./policies/ratelimit/ > new.txt
//	benchstat old.txt new.txt
func BenchmarkLocalTake(b *testing.B) {
	for _, nkeys := range []int{1, 10000} {
		b.Run(fmt.Sprintf("keys=%d", nkeys), func(b *testing.B) {
			s, stop := startLocalStore(DefaultMaxLocalBuckets)
			defer stop()
			l := newLimit(1e6, 1e6)
			keys := make([]string, nkeys)
			for i := range keys {
				keys[i] = fmt.Sprintf("10.0.%d.%d", i/256, i%256)
			}
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				i := rand.IntN(nkeys)
				for pb.Next() {
					s.take(l, "route", "ident", keys[i])
					if i++; i == nkeys {
						i = 0
					}
				}
			})
		})
	}
}
