package ratelimit

import (
	"sync/atomic"

	"github.com/VictoriaMetrics/metrics"
)

// The policy's metrics live in the default set, which the agent's /metrics writes. They are
// made once, so the hot path only increments.
var (
	backendErrors = [...]*metrics.Counter{
		errorLocal: metrics.GetOrCreateCounter(`policy_agent_ratelimit_backend_errors_total{policy="rateLimit",action="local"}`),
		errorAllow: metrics.GetOrCreateCounter(`policy_agent_ratelimit_backend_errors_total{policy="rateLimit",action="allow"}`),
		errorDeny:  metrics.GetOrCreateCounter(`policy_agent_ratelimit_backend_errors_total{policy="rateLimit",action="deny"}`),
	}
	localOverflow = metrics.GetOrCreateCounter(`policy_agent_ratelimit_local_overflow_total{policy="rateLimit"}`)
	// localOverLimit counts requests refused by the local over-limit cache, without Redis.
	localOverLimit = metrics.GetOrCreateCounter(`policy_agent_ratelimit_local_over_limit_total{policy="rateLimit"}`)

	// localBuckets counts the buckets of every local store, for the gauge.
	localBuckets atomic.Int64
	_            = metrics.GetOrCreateGauge(`policy_agent_ratelimit_local_buckets{policy="rateLimit"}`, func() float64 {
		return float64(localBuckets.Load())
	})
)
