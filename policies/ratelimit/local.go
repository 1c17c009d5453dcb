package ratelimit

import (
	"hash/maphash"
	"math"
	"sync/atomic"
	"time"

	"github.com/puzpuzpuz/xsync/v4"
)

const (
	// clockResolution is how often the cached clock advances. A bucket gains
	// requests_per_second × clockResolution tokens per tick, so its burst must hold at least
	// that many, or part of every refill would be lost (Build checks it).
	clockResolution = 10 * time.Millisecond
	// sweepTicks is how many clock ticks pass between two sweeps of idle buckets: one second.
	sweepTicks = int(time.Second / clockResolution)
	// deadTAT marks a bucket that a sweep has removed from the map; a request that still
	// holds it looks the key up again.
	deadTAT = math.MinInt64
)

// limit is a token bucket as GCRA (the generic cell rate algorithm) sees it: a request costs
// interval, and a bucket holds burst requests, so it refills completely in tau.
type limit struct {
	interval int64 // nanoseconds per request: 1e9 / requests_per_second
	burst    int64
	tau      int64 // burst × interval
}

// newLimit makes a limit; Build has checked that rps is at most 1e9, so a request costs at
// least a nanosecond, and that burst × interval fits.
func newLimit(rps float64, burst int64) limit {
	iv := int64(math.Round(1e9 / rps))
	return limit{interval: iv, burst: burst, tau: iv * burst}
}

// decision is the outcome of taking one request from a bucket.
type decision struct {
	allowed   bool
	limit     int64
	remaining int64
	// retryAfter is how long until the next request would be allowed; zero when allowed.
	retryAfter time.Duration
	// reset is how long until the bucket is full again.
	reset time.Duration
}

// bucket is one key's state: its theoretical arrival time (TAT), the time at which the
// bucket will be full again. A bucket whose TAT has passed is full, so it behaves exactly like
// a new one and may be dropped.
type bucket struct {
	tat atomic.Int64
}

// take takes one request from b at now (nanoseconds). ok is false when b has been removed by a
// sweep, and the caller must look its key up again. A denial writes nothing, so a flood of
// denied requests does not contend on the bucket.
func (l limit) take(b *bucket, now int64) (d decision, ok bool) {
	for {
		old := b.tat.Load()
		if old == deadTAT {
			return decision{}, false
		}
		tat := max(old, now)
		next := tat + l.interval
		if wait := next - l.tau - now; wait > 0 {
			return decision{limit: l.burst, retryAfter: time.Duration(wait), reset: time.Duration(tat - now)}, true
		}
		if b.tat.CompareAndSwap(old, next) {
			return decision{
				allowed:   true,
				limit:     l.burst,
				remaining: (l.tau - (next - now)) / l.interval,
				reset:     time.Duration(next - now),
			}, true
		}
	}
}

// localStore holds the buckets of one agent. Lookups are lock-free; creating or sweeping a
// bucket locks one stripe of the map. It is bounded: buckets that have refilled are swept
// once a second, and no more than max buckets exist at once. A key that finds the store full
// is counted against its policy's overflow bucket, so random keys cannot buy an attacker
// fresh buckets nor the agent unbounded memory.
type localStore struct {
	seed    maphash.Seed
	buckets *xsync.Map[uint64, *bucket]
	// fixed holds the overflow and missing-key buckets, one per scope and limit: their
	// number is bounded by the config, so they do not count against max.
	fixed *xsync.Map[uint64, *bucket]
	n     atomic.Int64
	max   int64
	now   func() int64
	clock *cachedClock
}

func newLocalStore(maxBuckets int64, now func() int64) *localStore {
	return &localStore{
		seed:    maphash.MakeSeed(),
		buckets: xsync.NewMap[uint64, *bucket](),
		fixed:   xsync.NewMap[uint64, *bucket](),
		max:     maxBuckets,
		now:     now,
	}
}

// startLocalStore returns a store driven by a cached clock, whose goroutine also sweeps idle
// buckets; close stops it.
func startLocalStore(maxBuckets int64) (*localStore, func()) {
	s := newLocalStore(maxBuckets, nil)
	s.clock = startCachedClock(clockResolution, sweepTicks, s.sweep)
	s.now = s.clock.Now
	return s, func() {
		s.clock.Stop()
		localBuckets.Add(-s.n.Load())
	}
}

// Key kinds mixed into a bucket's hash so that no key value can name the overflow or the
// missing-key bucket.
const (
	kindValue byte = iota
	kindMissing
	kindOverflow
)

// hash names a bucket: the scope, the limit's identity, the kind and the key value.
func (s *localStore) hash(scope, ident string, kind byte, value string) uint64 {
	var h maphash.Hash
	h.SetSeed(s.seed)
	h.WriteString(scope)
	h.WriteByte(0)
	h.WriteString(ident)
	h.WriteByte(kind)
	h.WriteString(value)
	return h.Sum64()
}

// take takes one request from the bucket of a key value.
func (s *localStore) take(l limit, scope, ident, value string) decision {
	now := s.now()
	key := s.hash(scope, ident, kindValue, value)
	for {
		b, ok := s.buckets.Load(key)
		if !ok {
			if b = s.create(key); b == nil {
				localOverflow.Inc()
				return s.takeFixed(l, s.hash(scope, ident, kindOverflow, ""), now)
			}
		}
		if d, ok := l.take(b, now); ok {
			return d
		}
	}
}

// takeMissing takes one request from the bucket shared by the requests of a scope and limit
// that carry no key value.
func (s *localStore) takeMissing(l limit, scope, ident string) decision {
	return s.takeFixed(l, s.hash(scope, ident, kindMissing, ""), s.now())
}

func (s *localStore) takeFixed(l limit, key uint64, now int64) decision {
	for {
		b, _ := s.fixed.LoadOrCompute(key, func() (*bucket, bool) { return &bucket{}, false })
		if d, ok := l.take(b, now); ok {
			return d
		}
	}
}

// create adds a bucket for key unless the store is full, in which case it returns nil.
func (s *localStore) create(key uint64) *bucket {
	b, _ := s.buckets.LoadOrCompute(key, func() (*bucket, bool) {
		if s.n.Add(1) > s.max {
			s.n.Add(-1)
			return nil, true
		}
		localBuckets.Add(1)
		return &bucket{}, false
	})
	return b
}

// sweep drops every bucket that is full at now: such a bucket decides exactly as a new one
// would. A request that took the bucket just before sees it marked dead and starts again.
func (s *localStore) sweep(now int64) {
	idle := func(_ uint64, b *bucket) (bool, bool) {
		t := b.tat.Load()
		return t != deadTAT && t <= now && b.tat.CompareAndSwap(t, deadTAT), false
	}
	if n := s.buckets.DeleteMatching(idle); n > 0 {
		s.n.Add(int64(-n))
		localBuckets.Add(int64(-n))
	}
	s.fixed.DeleteMatching(idle)
}

// size returns the number of buckets that count against max.
func (s *localStore) size() int64 { return s.n.Load() }

// cachedClock is a coarse clock read with one atomic load: a goroutine advances it every
// resolution, from the monotonic clock, so that wall-clock steps do not disturb buckets. The
// same goroutine runs a periodic job, the sweep of idle buckets.
type cachedClock struct {
	now  atomic.Int64
	stop chan struct{}
	done chan struct{}
}

func startCachedClock(resolution time.Duration, everyTicks int, job func(now int64)) *cachedClock {
	base := time.Now()
	wall := base.UnixNano()
	c := &cachedClock{stop: make(chan struct{}), done: make(chan struct{})}
	c.now.Store(wall)
	go func() {
		defer close(c.done)
		t := time.NewTicker(resolution)
		defer t.Stop()
		ticks := 0
		for {
			select {
			case <-c.stop:
				return
			case <-t.C:
				now := wall + int64(time.Since(base))
				c.now.Store(now)
				if ticks++; ticks >= everyTicks {
					ticks = 0
					job(now)
				}
			}
		}
	}()
	return c
}

// Now returns the cached time in nanoseconds since the Unix epoch.
func (c *cachedClock) Now() int64 { return c.now.Load() }

// Stop stops the clock's goroutine and waits for it to end.
func (c *cachedClock) Stop() {
	close(c.stop)
	<-c.done
}
