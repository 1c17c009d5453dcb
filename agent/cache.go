package agent

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/puzpuzpuz/xsync/v4"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/cond"
	"github.com/policy-engine/policy-engine/internal/obs"
)

// A chain entry with a cache (Policy.cache; docs/policies/caching.md) reuses its policy's
// result for requests with the same key until the TTL passes, or the result's own expiry
// (policy.Result.Expires) if earlier. Each entry's results live in an entryCache named by the
// scope the kernel gives the entry, a fingerprint of the route and its whole chain, so that a
// result never crosses routes or configs. The caches belong to the config snapshot: an agent
// config reload starts with none. A cache unused for its TTL holds only expired results and is
// dropped whole by the sweep, so the scopes of a replaced kernel config do not keep memory.
//
// A key is the SHA-256 of its parts' values (cond.Expr.AppendKey): the agent keeps no API key
// or token in clear, and never logs a key. A lookup holds the entry cache's lock for a map
// read and a list move; no lock is held while a policy runs. Identical misses that arrive
// together each run the policy (no collapsing): the first result stored wins, later ones
// replace it; they are all equally valid.

// Defaults of an entry's cache bounds (CacheSpec max_entries and max_bytes 0).
const (
	DefaultCacheMaxEntries = 10000
	DefaultCacheMaxBytes   = 8 << 20
	// maxCacheTTL bounds a TTL the agent accepts, whatever the kernel sent (the kernel
	// refuses more at load).
	maxCacheTTL = time.Hour
	// cacheSweepEvery is how often idle caches are dropped and expired results reclaimed.
	cacheSweepEvery = time.Second
	// cacheSweepExpired bounds the expired results one sweep reclaims per cache, oldest
	// first; the rest are refused at lookup and reclaimed by later sweeps or evictions.
	cacheSweepExpired = 4096
	// cacheItemOverhead estimates the bytes of an item besides its result's contents.
	cacheItemOverhead = 160
	// maxCacheRoutes bounds the route label of the cache metrics, as maxShadowRoutes.
	maxCacheRoutes = 1000
	// maxCacheScopes bounds the entry caches of one config: the kernel sends one scope per
	// cached entry of its config, far fewer; past it, entries of new scopes run uncached.
	maxCacheScopes = 10000
)

// cacheFeature is what the agent advertises in agent_metadata "features" for Policy.cache.
const cacheFeature = "cache"

// resultCaches are the entry caches of one config snapshot.
type resultCaches struct {
	byScope  *xsync.Map[string, *entryCache]
	bytes    atomic.Int64 // of every entry cache together
	maxBytes int64
	metrics  *agentMetrics
	// sweeping says a sweep is scheduled; retired that the snapshot was replaced.
	sweeping atomic.Bool
	retired  atomic.Bool
	buildMu  sync.Mutex
}

func newResultCaches(maxBytes int64, m *agentMetrics) *resultCaches {
	if maxBytes <= 0 {
		maxBytes = DefaultMaxCacheBytes
	}
	return &resultCaches{byScope: xsync.NewMap[string, *entryCache](), maxBytes: maxBytes, metrics: m}
}

// entryCache is one chain entry's results, by key, in least-recently-used order.
type entryCache struct {
	caches     *resultCaches
	scope      string
	keys       []*cond.Expr
	keyErr     error // the key does not compile: every request runs the policy, uncached
	ttl        time.Duration
	maxEntries int
	maxBytes   int64
	counters   *cacheCounters
	lastUsed   atomic.Int64 // unix nanoseconds

	mu    sync.Mutex
	items map[[sha256.Size]byte]*cacheItem
	lru   cacheItem // sentinel: lru.next is the most recently used
	bytes int64
}

type cacheItem struct {
	key        [sha256.Size]byte
	prev, next *cacheItem
	result     policy.Result
	expires    int64 // unix nanoseconds
	size       int64
}

// keyPool holds the buffers keys are built in.
var keyPool = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

// forEntry returns the entry cache of spec's scope, made on first use; nil past
// maxCacheScopes.
func (rc *resultCaches) forEntry(spec *agentv1.CacheSpec, route, policyName string) *entryCache {
	if c, ok := rc.byScope.Load(spec.GetScope()); ok {
		return c
	}
	rc.buildMu.Lock()
	defer rc.buildMu.Unlock()
	if c, ok := rc.byScope.Load(spec.GetScope()); ok {
		return c
	}
	if rc.byScope.Size() >= maxCacheScopes {
		return nil
	}
	c := &entryCache{caches: rc, scope: spec.GetScope(), ttl: time.Duration(spec.GetTtlMs()) * time.Millisecond,
		maxEntries: int(spec.GetMaxEntries()), maxBytes: spec.GetMaxBytes(), items: map[[sha256.Size]byte]*cacheItem{}}
	c.lru.next, c.lru.prev = &c.lru, &c.lru
	if c.maxEntries <= 0 {
		c.maxEntries = DefaultCacheMaxEntries
	}
	if c.maxBytes <= 0 {
		c.maxBytes = DefaultCacheMaxBytes
	}
	c.keyErr = checkCacheSpec(spec)
	if c.keyErr == nil {
		for _, src := range spec.GetKey() {
			x, err := cond.CompileKey(src)
			if err != nil {
				c.keyErr = err
				break
			}
			c.keys = append(c.keys, x)
		}
	}
	c.counters = rc.metrics.caches.get(policyName, route)
	c.lastUsed.Store(time.Now().UnixNano())
	rc.byScope.Store(c.scope, c)
	return c
}

// checkCacheSpec checks what the kernel checked at load, for an agent that must not trust it.
func checkCacheSpec(spec *agentv1.CacheSpec) error {
	switch ttl := time.Duration(spec.GetTtlMs()) * time.Millisecond; {
	case spec.GetScope() == "":
		return errors.New("cache without a scope")
	case len(spec.GetKey()) == 0:
		return errors.New("cache without a key")
	case ttl <= 0 || ttl > maxCacheTTL:
		return fmt.Errorf("cache ttl must be from 1ms to %v, got %v", maxCacheTTL, ttl)
	}
	return nil
}

// checkCacheEntry is ValidateChains' check of an entry's cache: the policy must be cacheable
// and the key must compile.
func checkCacheEntry(m policy.Module, spec *agentv1.CacheSpec) string {
	if !m.Cacheable {
		why := m.NotCacheable
		if why == "" {
			why = "it does not declare its results reusable"
		}
		return fmt.Sprintf("policy %s cannot be cached: %s", m.Name, why)
	}
	if spec.GetScope() == "" {
		spec = &agentv1.CacheSpec{Key: spec.GetKey(), TtlMs: spec.GetTtlMs(), Scope: "-"}
	}
	if err := checkCacheSpec(spec); err != nil {
		return err.Error()
	}
	for _, src := range spec.GetKey() {
		if _, err := cond.CompileKey(src); err != nil {
			return fmt.Sprintf("invalid cache key: %v", err)
		}
	}
	return ""
}

// runCached runs a chain entry that may have a cache: the entry's policy through run, or its
// stored result for the request's key. A result is stored when the policy returned OK or
// POLICY_DENIED with valid instructions before the chain's deadline, and its expiry is in the
// future; errors, timeouts and late answers never are.
func (e *Executor) runCached(cc *chainCtx, s *execSnapshot, req *agentv1.PolicyRequest, entry *agentv1.Policy, f *factoryEntry, p policy.Policy, pc *policy.Context, name string) (policy.Result, error) {
	spec := entry.GetCache()
	if spec == nil || s.caches == nil {
		return e.run(cc, p, pc, name)
	}
	c := s.caches.forEntry(spec, req.GetRouteName(), name)
	if c == nil {
		return e.run(cc, p, pc, name)
	}
	if c.keyErr != nil || !f.module.Cacheable {
		c.counters.uncached.Inc()
		return e.run(cc, p, pc, name)
	}
	bp := keyPool.Get().(*[]byte)
	defer keyPool.Put(bp)
	buf, err := c.appendKey((*bp)[:0], pc)
	*bp = buf[:0]
	if err != nil {
		// A key that cannot be computed for this request (a header the expression indexes
		// is absent, say): the policy runs, uncached.
		c.counters.uncached.Inc()
		return e.run(cc, p, pc, name)
	}
	key := sha256.Sum256(buf)
	now := time.Now()
	if r, ok := c.get(key, now); ok {
		c.counters.hit.Inc()
		return r, nil
	}
	c.counters.miss.Inc()
	r, err := e.run(cc, p, pc, name)
	if err != nil || (r.Status != agentv1.StatusCode_OK && r.Status != agentv1.StatusCode_POLICY_DENIED) {
		return r, err
	}
	end := time.Now()
	if cc.stoppedAt(end) || applyInstructions(nil, r.Instructions, 0) != nil {
		return r, err
	}
	exp := end.Add(c.ttl)
	if !r.Expires.IsZero() && r.Expires.Before(exp) {
		exp = r.Expires
	}
	if exp.After(end) {
		c.put(key, r, exp.UnixNano(), end)
	}
	return r, err
}

// appendKey appends the request's key: its parts' values, each prefixed by its length.
func (c *entryCache) appendKey(dst []byte, pc *policy.Context) ([]byte, error) {
	in := requestInput(pc)
	var err error
	for _, k := range c.keys {
		if dst, err = k.AppendKey(dst, &in); err != nil {
			return dst, err
		}
	}
	return dst, nil
}

// get returns the result stored for key unless it expired (an expired one is removed).
func (c *entryCache) get(key [sha256.Size]byte, now time.Time) (policy.Result, bool) {
	n := now.UnixNano()
	if c.lastUsed.Load() < n-int64(10*time.Millisecond) {
		c.lastUsed.Store(n)
	}
	c.mu.Lock()
	it, ok := c.items[key]
	if !ok {
		c.mu.Unlock()
		return policy.Result{}, false
	}
	if it.expires <= n {
		c.remove(it)
		c.mu.Unlock()
		c.counters.expired.Inc()
		return policy.Result{}, false
	}
	c.unlink(it)
	c.pushFront(it)
	r := it.result
	c.mu.Unlock()
	return r, true
}

// put stores a result, evicting the least recently used ones past the bounds.
func (c *entryCache) put(key [sha256.Size]byte, r policy.Result, expires int64, now time.Time) {
	size := resultSize(r)
	if size > c.maxBytes {
		return
	}
	rc := c.caches
	if rc.bytes.Load()+size > rc.maxBytes {
		rc.reclaim(c, size)
	}
	c.mu.Lock()
	if old, ok := c.items[key]; ok {
		c.remove(old)
	}
	for len(c.items) >= c.maxEntries || c.bytes+size > c.maxBytes {
		c.remove(c.lru.prev)
		c.counters.evicted.Inc()
	}
	// The agent's bound over every entry, when the staler entries gave up what they could
	// (reclaim): this entry gives up its own oldest results; when that is not enough, the
	// result is not kept.
	for rc.bytes.Load()+size > rc.maxBytes && len(c.items) > 0 {
		c.remove(c.lru.prev)
		c.counters.evicted.Inc()
	}
	if rc.bytes.Load()+size > rc.maxBytes {
		c.mu.Unlock()
		c.counters.evicted.Inc()
		return
	}
	it := &cacheItem{key: key, result: r, expires: expires, size: size}
	c.items[key] = it
	c.pushFront(it)
	c.bytes += size
	rc.bytes.Add(size)
	c.mu.Unlock()
	c.lastUsed.Store(now.UnixNano())
	rc.scheduleSweep()
}

// reclaim makes room for need bytes under the agent's bound by evicting the oldest results
// of the entry caches used less recently than c (the scopes of a replaced kernel config
// first: they are no longer used at all), stalest first. It holds one cache's lock at a time,
// never c's.
func (rc *resultCaches) reclaim(c *entryCache, need int64) {
	for range 8 {
		if rc.bytes.Load()+need <= rc.maxBytes {
			return
		}
		var stalest *entryCache
		rc.byScope.Range(func(_ string, o *entryCache) bool {
			if o != c && o.lastUsed.Load() < c.lastUsed.Load() && (stalest == nil || o.lastUsed.Load() < stalest.lastUsed.Load()) {
				o.mu.Lock()
				n := len(o.items)
				o.mu.Unlock()
				if n > 0 {
					stalest = o
				}
			}
			return true
		})
		if stalest == nil {
			return
		}
		stalest.mu.Lock()
		for rc.bytes.Load()+need > rc.maxBytes && stalest.lru.prev != &stalest.lru {
			stalest.remove(stalest.lru.prev)
			stalest.counters.evicted.Inc()
		}
		stalest.mu.Unlock()
	}
}

func (c *entryCache) pushFront(it *cacheItem) {
	it.prev, it.next = &c.lru, c.lru.next
	c.lru.next.prev = it
	c.lru.next = it
}

func (c *entryCache) unlink(it *cacheItem) {
	it.prev.next, it.next.prev = it.next, it.prev
	it.prev, it.next = nil, nil
}

// remove drops an item; c.mu is held.
func (c *entryCache) remove(it *cacheItem) {
	c.unlink(it)
	delete(c.items, it.key)
	c.bytes -= it.size
	c.caches.bytes.Add(-it.size)
}

// resultSize estimates the bytes a stored result keeps.
func resultSize(r policy.Result) int64 {
	n := cacheItemOverhead + len(r.Message)
	for _, in := range r.Instructions {
		n += 48 + in.SizeVT()
	}
	for k, v := range r.Metadata {
		n += 32 + len(k) + len(v)
	}
	return int64(n)
}

// scheduleSweep makes sure a sweep runs within cacheSweepEvery while anything is cached.
func (rc *resultCaches) scheduleSweep() {
	if rc.sweeping.Load() || !rc.sweeping.CompareAndSwap(false, true) {
		return
	}
	time.AfterFunc(cacheSweepEvery, rc.sweep)
}

// sweep drops the caches unused for their TTL (every result they hold has expired: the scope
// of a chain the kernel no longer sends, or a route without traffic), reclaims the oldest
// expired results of the others, and schedules itself again while anything is cached. A
// retired snapshot's caches are dropped whole.
func (rc *resultCaches) sweep() {
	now := time.Now().UnixNano()
	left := false
	rc.byScope.Range(func(scope string, c *entryCache) bool {
		c.mu.Lock()
		if rc.retired.Load() || c.lastUsed.Load()+int64(c.ttl) < now {
			for c.lru.prev != &c.lru {
				c.remove(c.lru.prev)
			}
			c.mu.Unlock()
			rc.byScope.Delete(scope)
			return true
		}
		n := 0
		for it := c.lru.prev; it != &c.lru && n < cacheSweepExpired; n++ {
			prev := it.prev
			if it.expires <= now {
				c.remove(it)
				c.counters.expired.Inc()
			}
			it = prev
		}
		left = left || len(c.items) > 0
		c.mu.Unlock()
		return true
	})
	rc.sweeping.Store(false)
	if left || rc.byScope.Size() > 0 {
		rc.scheduleSweep()
	}
}

// retire drops every cached result of a replaced snapshot.
func (rc *resultCaches) retire() {
	rc.retired.Store(true)
	rc.sweep()
}

// cacheCounters are a (policy, route) pair's cache series.
type cacheCounters struct{ hit, miss, uncached, evicted, expired *metrics.Counter }

func (m *agentMetrics) newCacheCounters(policyName, route string) *cacheCounters {
	labels := `policy=` + obs.Label(policyName) + `,route=` + obs.Label(route)
	req := `policy_agent_cache_requests_total{` + labels + `,result=`
	return &cacheCounters{
		hit:      m.set.GetOrCreateCounter(req + `"hit"}`),
		miss:     m.set.GetOrCreateCounter(req + `"miss"}`),
		uncached: m.set.GetOrCreateCounter(req + `"uncached"}`),
		evicted:  m.set.GetOrCreateCounter(`policy_agent_cache_evictions_total{` + labels + `,reason="bound"}`),
		expired:  m.set.GetOrCreateCounter(`policy_agent_cache_evictions_total{` + labels + `,reason="expired"}`),
	}
}

// cacheGauges registers the gauges of the current snapshot's caches.
func (e *Executor) cacheGauges() {
	e.metrics.set.NewGauge("policy_agent_cache_bytes", func() float64 {
		if s := e.snap.Load(); s != nil && s.caches != nil {
			return float64(s.caches.bytes.Load())
		}
		return 0
	})
	e.metrics.set.NewGauge("policy_agent_cache_entries", func() float64 {
		n := 0
		if s := e.snap.Load(); s != nil && s.caches != nil {
			s.caches.byScope.Range(func(_ string, c *entryCache) bool {
				c.mu.Lock()
				n += len(c.items)
				c.mu.Unlock()
				return true
			})
		}
		return float64(n)
	})
}
