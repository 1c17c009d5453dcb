package ratelimit

import (
	"sync/atomic"
	"time"

	"github.com/puzpuzpuz/xsync/v4"
)

// The local over-limit cache: once Redis refuses a key, the agent remembers the key until the
// bucket would allow again and refuses it without asking Redis (as envoyproxy/ratelimit's
// LOCAL_CACHE_SIZE_IN_BYTES does, but on by default and exact). The bucket is GCRA: a refused
// request changes nothing in Redis, and the TAT only grows, so from the refusal until
// retry-after (counted from before the call: Redis decided at a later time) every request of
// the key would be refused by Redis too. Remembering the key never refuses a request that
// Redis would allow; it only spares the round trips of a client that keeps coming while over
// its limit, which is the traffic that costs most. Refusals decided locally are counted by
// policy_agent_ratelimit_local_over_limit_total.

// DefaultOverLimitCacheEntries is the default of redis.over_limit_cache_entries.
const DefaultOverLimitCacheEntries = 10000

// maxOverLimitCacheEntries bounds the setting (about 150 bytes an entry).
const maxOverLimitCacheEntries = 10_000_000

// overLimitCache holds keys refused by Redis until they would be allowed again.
type overLimitCache struct {
	keys *xsync.Map[string, overLimit]
	n    atomic.Int64
	max  int64
	now  func() time.Time
}

// overLimit is a refused key's times, in Unix nanoseconds: until the bucket allows again,
// and until it is full again (for RateLimit-Reset).
type overLimit struct{ until, reset int64 }

func newOverLimitCache(max int) *overLimitCache {
	if max <= 0 {
		return nil
	}
	return &overLimitCache{keys: xsync.NewMap[string, overLimit](), max: int64(max), now: time.Now}
}

// refused returns the decision for a key refused earlier whose refusal still holds.
func (c *overLimitCache) refused(key string, l limit, now int64) (decision, bool) {
	if c == nil {
		return decision{}, false
	}
	o, ok := c.keys.Load(key)
	if !ok {
		return decision{}, false
	}
	if o.until <= now {
		if _, loaded := c.keys.LoadAndDelete(key); loaded {
			c.n.Add(-1)
		}
		return decision{}, false
	}
	localOverLimit.Inc()
	return decision{allowed: false, limit: l.burst, retryAfter: time.Duration(o.until - now), reset: time.Duration(max(o.reset-now, o.until-now))}, true
}

// remember records a key Redis refused; start is when the call began.
func (c *overLimitCache) remember(key string, d decision, start int64) {
	if c == nil || d.allowed || d.retryAfter <= 0 {
		return
	}
	if c.n.Load() >= c.max {
		c.purge(start)
		if c.n.Load() >= c.max {
			return // full of keys still refused: this one is asked again
		}
	}
	o := overLimit{until: start + int64(d.retryAfter), reset: start + int64(d.reset)}
	if _, loaded := c.keys.LoadAndStore(key, o); !loaded {
		c.n.Add(1)
	}
}

// purge removes the keys whose refusal has ended.
func (c *overLimitCache) purge(now int64) {
	c.keys.Range(func(k string, o overLimit) bool {
		if o.until <= now {
			if _, loaded := c.keys.LoadAndDelete(k); loaded {
				c.n.Add(-1)
			}
		}
		return true
	})
}
