package agent

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/puzpuzpuz/xsync/v4"

	"github.com/policy-engine/policy-engine/internal/obs"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// agentMetrics are the agent's metrics of specification §7.1. Series are made on first use
// per policy and cached, so the hot path does no string formatting after warm-up.
type agentMetrics struct {
	set      *metrics.Set
	mu       sync.RWMutex
	byPolicy map[string]*policyMetrics
	failures sync.Map // "policy\x00reason" → *metrics.Counter
	// failClosed counts, by policy, failures of enforcing policies denied although the
	// entry's on_failure said continue or skip_remaining.
	failClosedMu sync.Mutex
	failClosedBy map[string]*metrics.Counter

	// Context sizes, by part of the context a chain runs on.
	reqHeaders, reqBody, respHeaders, respBody, state *metrics.PrometheusHistogram
	sampled                                           atomic.Uint64

	// Series by policy and route: policy_agent_shadow_decisions_total, and
	// policy_agent_entries_skipped_total (when.go) and the cache series (cache.go).
	shadows *routeSeries[*shadowCounters]
	skips   *routeSeries[*metrics.Counter]
	caches  *routeSeries[*cacheCounters]

	// chainKept, chainNamed and chainUnknown count the stream requests that carried a chain
	// with its id, named a kept chain by id, and named one the stream did not keep.
	chainKept, chainNamed, chainUnknown *metrics.Counter

	reloadSuccess, reloadFailure *metrics.Counter
	infoMu                       sync.Mutex
	infoVersion                  string
	lastReloadSuccess            *metrics.Gauge
}

type policyMetrics struct {
	ok, denied, errored *metrics.Counter
	duration            *metrics.PrometheusHistogram
}

// executionBuckets are the upper bounds of policy_agent_execution_duration_seconds: policies
// run within the kernel's agent timeout (150 ms by default), most in well under a millisecond.
var executionBuckets = []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1}

// sizeBuckets are the upper bounds of policy_agent_context_size_bytes, up to the default 1 MiB
// body limit.
var sizeBuckets = []float64{64, 256, 1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20}

// Families describes the agent's metrics for /metrics (HELP and TYPE) and the operations guide.
var Families = []obs.Family{
	{Name: "policy_agent_executions_total", Type: "counter", Help: "Policy executions by policy and status: ok, denied, error."},
	{Name: "policy_agent_execution_duration_seconds", Type: "histogram", Help: "Time one policy took to execute, by policy."},
	{Name: "policy_agent_policy_failures_total", Type: "counter", Help: "Policy failures by policy and reason: error, timeout (the policy returned TIMEOUT, or returned after the chain's deadline), unknown_policy."},
	{Name: "policy_agent_fail_closed_total", Type: "counter", Help: "Failures of policies that enforce (authentication, authorization, rate limits), denied although the chain entry's on_failure said continue or skip_remaining, by policy."},
	{Name: "policy_agent_shadow_decisions_total", Type: "counter", Help: "What chain entries in shadow mode would have decided had they enforced, by policy, route and decision: allow, deny, error. Nothing they decide is enforced."},
	{Name: "policy_agent_entries_skipped_total", Type: "counter", Help: "Chain entries not run because their when condition was false, by policy and route (past 1000 routes, \"other\")."},
	{Name: "policy_agent_context_size_bytes", Type: "histogram", Help: "Size of the context a chain runs on, by type: request_headers, request_body, response_headers, response_body, state (headers: one chain in 8 after the first 64)."},
	{Name: "policy_agent_stream_chains_total", Type: "counter", Help: "ExecuteStream requests by how they named their chain: kept (its policies with a chain id, kept for the stream), named (a kept chain by its id alone), unknown (an id the stream did not keep: answered CHAIN_UNKNOWN, nothing ran)."},
	{Name: "policy_agent_config_reload_total", Type: "counter", Help: "Config reloads by status: success or failure (the previous config stays)."},
	{Name: "policy_agent_config_last_reload_success_timestamp_seconds", Type: "gauge", Help: "Unix time of the last config load or reload that succeeded."},
	{Name: "policy_agent_config_info", Type: "gauge", Help: "Always 1; the version label is the config in force (user version and content hash)."},
	{Name: "policy_agent_cache_requests_total", Type: "counter", Help: "Runs of chain entries with a cache, by policy, route and result: hit (the stored result was replayed), miss (the policy ran), uncached (the key could not be computed for the request, or the entry cannot be cached: the policy ran)."},
	{Name: "policy_agent_cache_evictions_total", Type: "counter", Help: "Cached results removed before use, by policy, route and reason: bound (the entry's max_entries or max_bytes, or the agent's resource_limits.max_cache_bytes), expired (TTL or the result's own expiry passed)."},
	{Name: "policy_agent_cache_bytes", Type: "gauge", Help: "Estimated bytes of the results all chain entries' caches keep (bounded by resource_limits.max_cache_bytes)."},
	{Name: "policy_agent_cache_entries", Type: "gauge", Help: "Results all chain entries' caches keep."},
	// Families of compiled-in policies, in the default set.
	{Name: "policy_agent_audit_log_records_total", Type: "counter", Help: "Audit records written to the sink's buffer."},
	{Name: "policy_agent_audit_log_dropped_total", Type: "counter", Help: "Audit records dropped, by reason: queue_full, closed."},
	{Name: "policy_agent_audit_log_write_errors_total", Type: "counter", Help: "Audit log writes, flushes and closes that failed (a full disk, say); their records are lost."},
	{Name: "policy_agent_audit_log_sink_failing_requests_total", Type: "counter", Help: "Exchanges that met a failing audit sink, by the on_sink_error action: deny (refused with 503) or continue (let through unrecorded)."},
	{Name: "policy_agent_ratelimit_backend_errors_total", Type: "counter", Help: "Rate-limit decisions whose Redis backend failed, by the on_backend_error action: local, allow, deny."},
	{Name: "policy_agent_ratelimit_local_overflow_total", Type: "counter", Help: "Rate-limit requests decided by a shared overflow bucket because the local key store was full."},
	{Name: "policy_agent_ratelimit_local_over_limit_total", Type: "counter", Help: "Rate-limit requests refused without a Redis call: the key was refused by Redis before and its bucket does not allow again yet (redis.over_limit_cache_entries)."},
	{Name: "policy_agent_ratelimit_local_buckets", Type: "gauge", Help: "Buckets in the local rate-limit key store."},
}

func newAgentMetrics() *agentMetrics {
	m := &agentMetrics{set: metrics.NewSet(), byPolicy: map[string]*policyMetrics{}, failClosedBy: map[string]*metrics.Counter{}}
	m.shadows = newRouteSeries(maxShadowRoutes, m.newShadowCounters)
	m.skips = newRouteSeries(maxSkipRoutes, m.newSkipCounter)
	m.caches = newRouteSeries(maxCacheRoutes, m.newCacheCounters)
	size := func(typ string) *metrics.PrometheusHistogram {
		return m.set.NewPrometheusHistogramExt(`policy_agent_context_size_bytes{type="`+typ+`"}`, sizeBuckets)
	}
	m.reqHeaders = size("request_headers")
	m.reqBody = size("request_body")
	m.respHeaders = size("response_headers")
	m.respBody = size("response_body")
	m.state = size("state")
	m.chainKept = m.set.NewCounter(`policy_agent_stream_chains_total{kind="kept"}`)
	m.chainNamed = m.set.NewCounter(`policy_agent_stream_chains_total{kind="named"}`)
	m.chainUnknown = m.set.NewCounter(`policy_agent_stream_chains_total{kind="unknown"}`)
	m.reloadSuccess = m.set.NewCounter(`policy_agent_config_reload_total{status="success"}`)
	m.reloadFailure = m.set.NewCounter(`policy_agent_config_reload_total{status="failure"}`)
	m.lastReloadSuccess = m.set.NewGauge(`policy_agent_config_last_reload_success_timestamp_seconds`, nil)
	return m
}

// precreate makes the series of every compiled-in policy, so that they are exported (at 0)
// before the policy first runs or fails, and rate() over them works from the start.
func (m *agentMetrics) precreate(names []string) {
	for _, name := range names {
		m.forPolicy(name)
		for _, reason := range []string{"error", "timeout"} {
			key := name + "\x00" + reason
			if _, ok := m.failures.Load(key); !ok {
				m.failures.Store(key, m.set.GetOrCreateCounter(`policy_agent_policy_failures_total{policy=`+obs.Label(name)+`,reason=`+obs.Label(reason)+`}`))
			}
		}
	}
}

// Set returns the metrics set, for the /metrics handler.
func (m *agentMetrics) Set() *metrics.Set { return m.set }

// loaded records a config that was loaded: its version and the time.
func (m *agentMetrics) loaded(version string) {
	m.lastReloadSuccess.Set(float64(time.Now().UnixNano()) / 1e9)
	m.infoMu.Lock()
	defer m.infoMu.Unlock()
	if m.infoVersion == version {
		return
	}
	if m.infoVersion != "" {
		m.set.UnregisterMetric(`policy_agent_config_info{version=` + obs.Label(m.infoVersion) + `}`)
	}
	m.infoVersion = version
	m.set.GetOrCreateGauge(`policy_agent_config_info{version=`+obs.Label(version)+`}`, func() float64 { return 1 })
}

// Header sizes are recorded for the first headerExact chains and then for one chain in
// headerSampling: adding up a header map's sizes on every chain was 5% of the agent's CPU
// under load, and a sample describes the distribution as well.
const (
	headerExact    = 64
	headerSampling = 8
)

// observeContext records the sizes of what a chain runs on: bodies and state on every chain,
// headers on a sample.
func (m *agentMetrics) observeContext(req *agentv1.PolicyRequest) {
	n := m.sampled.Add(1)
	headers := n <= headerExact || n%headerSampling == 0
	if req.GetPhase() == agentv1.PolicyPhase_RESPONSE {
		r := req.GetResponse()
		if headers {
			m.respHeaders.Update(float64(mapSize(r.GetHeaders())))
		}
		if b := r.GetBody(); len(b) > 0 {
			m.respBody.Update(float64(len(b)))
		}
	} else {
		rc := req.GetContext()
		if headers {
			m.reqHeaders.Update(float64(mapSize(rc.GetHeaders())))
		}
		if b := rc.GetBody(); len(b) > 0 {
			m.reqBody.Update(float64(len(b)))
		}
	}
	if st := req.GetState(); len(st) > 0 {
		m.state.Update(float64(mapSize(st)))
	}
}

// mapSize is the bytes of a map's keys and values.
func mapSize(m map[string]string) int {
	n := 0
	for k, v := range m {
		n += len(k) + len(v)
	}
	return n
}

func (m *agentMetrics) forPolicy(name string) *policyMetrics {
	m.mu.RLock()
	pm := m.byPolicy[name]
	m.mu.RUnlock()
	if pm != nil {
		return pm
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if pm = m.byPolicy[name]; pm != nil {
		return pm
	}
	q := obs.Label(name)
	pm = &policyMetrics{
		ok:       m.set.GetOrCreateCounter(`policy_agent_executions_total{policy=` + q + `,status="ok"}`),
		denied:   m.set.GetOrCreateCounter(`policy_agent_executions_total{policy=` + q + `,status="denied"}`),
		errored:  m.set.GetOrCreateCounter(`policy_agent_executions_total{policy=` + q + `,status="error"}`),
		duration: m.set.GetOrCreatePrometheusHistogramExt(`policy_agent_execution_duration_seconds{policy=`+q+`}`, executionBuckets),
	}
	m.byPolicy[name] = pm
	return pm
}

// observe records one policy run: a timeout (the policy returned TIMEOUT or returned after
// the deadline) or a failure is an error execution, counted with its reason.
func (m *agentMetrics) observe(name string, took time.Duration, status agentv1.StatusCode, err error, timedOut bool) {
	pm := m.forPolicy(name)
	pm.duration.Update(took.Seconds())
	switch {
	case timedOut:
		pm.errored.Inc()
		m.failure(name, "timeout")
	case err != nil || status == agentv1.StatusCode_POLICY_ERROR:
		pm.errored.Inc()
		m.failure(name, "error")
	case status == agentv1.StatusCode_POLICY_DENIED:
		pm.denied.Inc()
	default:
		pm.ok.Inc()
	}
}

func (m *agentMetrics) failure(name, reason string) {
	key := name + "\x00" + reason
	if c, ok := m.failures.Load(key); ok {
		c.(*metrics.Counter).Inc()
		return
	}
	c := m.set.GetOrCreateCounter(`policy_agent_policy_failures_total{policy=` + obs.Label(name) + `,reason=` + obs.Label(reason) + `}`)
	m.failures.Store(key, c)
	c.Inc()
}

// failClosed counts a failure of an enforcing policy denied against its entry's on_failure.
func (m *agentMetrics) failClosed(name string) { m.failClosedCounter(name).Inc() }

// failClosedCounter returns the policy's policy_agent_fail_closed_total series, made on first
// use; the executor makes those of the enforcing policies when it loads a config, so that they
// are exported at 0.
func (m *agentMetrics) failClosedCounter(name string) *metrics.Counter {
	m.failClosedMu.Lock()
	defer m.failClosedMu.Unlock()
	c := m.failClosedBy[name]
	if c == nil {
		c = m.set.GetOrCreateCounter(`policy_agent_fail_closed_total{policy=` + obs.Label(name) + `}`)
		m.failClosedBy[name] = c
	}
	return c
}

// maxShadowRoutes bounds the route label of policy_agent_shadow_decisions_total. The kernel
// sends the route names of its config (and "default"), so a deployment stays far below it;
// past it, a new route is counted as "other".
const maxShadowRoutes = 1000

type shadowKey struct{ policy, route string }

// shadowCounters are a (policy, route) pair's series, one per decision.
type shadowCounters struct{ allow, deny, errored *metrics.Counter }

// shadow counts one decision of a shadow entry. The three series of a pair are made together
// on its first decision, so that rate() over any of them works from then on.
func (m *agentMetrics) shadow(policyName, route, decision string) {
	c := m.shadows.get(policyName, route)
	switch decision {
	case shadowDeny:
		c.deny.Inc()
	case shadowError:
		c.errored.Inc()
	default:
		c.allow.Inc()
	}
}

func (m *agentMetrics) newShadowCounters(policyName, route string) *shadowCounters {
	prefix := `policy_agent_shadow_decisions_total{policy=` + obs.Label(policyName) + `,route=` + obs.Label(route) + `,decision=`
	return &shadowCounters{
		allow:   m.set.GetOrCreateCounter(prefix + `"allow"}`),
		deny:    m.set.GetOrCreateCounter(prefix + `"deny"}`),
		errored: m.set.GetOrCreateCounter(prefix + `"error"}`),
	}
}

// routeSeries holds a family's series by policy and route, made on first use. The route label
// is bounded: past max routes a new route is counted as "other", and its series are not stored
// under its own name, so that the map stays bounded too.
type routeSeries[T any] struct {
	by     *xsync.Map[shadowKey, T]
	make   func(policyName, route string) T
	max    int
	mu     sync.Mutex
	routes map[string]bool
}

func newRouteSeries[T any](max int, make func(policyName, route string) T) *routeSeries[T] {
	return &routeSeries[T]{by: xsync.NewMap[shadowKey, T](), make: make, max: max, routes: map[string]bool{}}
}

// get returns the series of a (policy, route) pair: one map lookup once they exist.
func (s *routeSeries[T]) get(policyName, route string) T {
	if c, ok := s.by.Load(shadowKey{policyName, route}); ok {
		return c
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	key := shadowKey{policyName, route}
	if c, ok := s.by.Load(key); ok {
		return c
	}
	if !s.routes[route] {
		if len(s.routes) >= s.max {
			key.route = "other"
			if c, ok := s.by.Load(key); ok {
				return c
			}
		} else {
			s.routes[route] = true
		}
	}
	c := s.make(policyName, key.route)
	s.by.Store(key, c)
	return c
}
