package kernel

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/puzpuzpuz/xsync/v4"

	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/obs"
)

// Request outcomes, the status label of policy_kernel_requests_total.
const (
	statusAllow        = "allow"
	statusDeny         = "deny"
	statusError        = "error"
	statusFailOpen     = "fail_open"
	statusInvalidRoute = "invalid_route"
	// statusNoRoute counts requests that matched no route when there is no default_policy:
	// they go on without any policy, on the one series without route and agent.
	statusNoRoute = "no_route"
)

var allStatuses = []string{statusAllow, statusDeny, statusError, statusFailOpen, statusInvalidRoute}

// kernelMetrics is the kernel's long-lived metric set. Per-route series are created when a
// snapshot is built, so the hot path only increments; series of routes that a reload removed
// are unregistered.
type kernelMetrics struct {
	set *metrics.Set

	mu     sync.Mutex
	routes map[string]*routeMetrics // key: route + "\x00" + agent
	agents map[string]*agentMetrics

	reloadSuccess, reloadFailure *metrics.Counter
	lastReloadSuccess            *metrics.Gauge
	lastReloadSuccessTS          float64
	infoVersion                  string
	protocolErrors               *metrics.Counter
	defaults                     *defaultRoutes
	noRoute                      *metrics.Counter
	// The ext_proc port's limits and TLS.
	connRefused, streamsIdleClosed  *metrics.Counter
	tlsReloadSuccess, tlsReloadFail *metrics.Counter
	tlsHandshakeFail                *metrics.Counter
}

type routeMetrics struct {
	names     []string
	requests  map[string]*metrics.Counter
	responses map[string]*metrics.Counter
	duration  *metrics.PrometheusHistogram
	rejected  *metrics.Counter
	// bodyMissing counts, by phase (0 request, 1 response), bodies a chain needed and did not get.
	bodyMissing [2]*metrics.Counter
	// skipped counts, by phase, chains whose every entry the kernel found skipped by its when
	// condition: the agent was not called.
	skipped [2]*metrics.Counter
}

// durationBuckets are the upper bounds of policy_kernel_request_duration_seconds: fine below
// Envoy's 200 ms message timeout, where the kernel's answers fall.
var durationBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .2, .5, 1, 2.5, 5}

// agentCallBuckets are the upper bounds of policy_kernel_agent_call_duration_seconds: a call
// crosses to the agent and back in tens to hundreds of microseconds, so the buckets are fine
// there, and reach the largest timeout_ms an agent may have.
var agentCallBuckets = []float64{.00005, .0001, .00015, .0002, .0003, .0004, .0005, .00075, .001, .0015, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5}

// Families describes the kernel's metrics for /metrics (HELP and TYPE) and the operations guide.
var Families = []obs.Family{
	{Name: "policy_kernel_requests_total", Type: "counter", Help: "HTTP requests by route, agent and the request phase's outcome: allow, deny, error, fail_open, invalid_route; requests that matched no route while there is no default_policy are no_route, on one series with an empty route and agent."},
	{Name: "policy_kernel_response_phase_total", Type: "counter", Help: "Response-phase chain runs by route, agent and outcome: allow, deny, error, fail_open."},
	{Name: "policy_kernel_request_duration_seconds", Type: "histogram", Help: "Time the kernel took to answer an ext_proc message that ran a policy chain, agent call included, by route and agent."},
	{Name: "policy_kernel_agent_call_duration_seconds", Type: "histogram", Help: "Time of one call to the agent, from the kernel sending the chain to the answer (or the error) reaching the waiting request: the crossing both ways with its wake-ups, and the agent running the chain. Each attempt is one observation; chains the kernel answers itself make none."},
	{Name: "policy_kernel_agent_health", Type: "gauge", Help: "1 when the agent answered its last health check, else 0."},
	{Name: "policy_kernel_agent_timeouts_total", Type: "counter", Help: "Agent calls that ran out of time."},
	{Name: "policy_kernel_agent_unavailable_total", Type: "counter", Help: "Agent calls that failed for another reason than time (agent down, connection refused)."},
	{Name: "policy_kernel_config_reload_total", Type: "counter", Help: "Config reloads by status: success or failure (the previous config stays)."},
	{Name: "policy_kernel_config_last_reload_success_timestamp_seconds", Type: "gauge", Help: "Unix time of the last config load or reload that succeeded."},
	{Name: "policy_kernel_config_info", Type: "gauge", Help: "Always 1; the version label is the config in force (user version and content hash)."},
	{Name: "policy_kernel_protocol_errors_total", Type: "counter", Help: "ext_proc streams ended because Envoy's messages broke the protocol."},
	{Name: "policy_kernel_mutations_rejected_total", Type: "counter", Help: "Header mutations dropped because Envoy's mutation rules would reject them, by route and agent."},
	{Name: "policy_kernel_body_missing_total", Type: "counter", Help: "Bodies a chain reads that Envoy did not send (allow_mode_override off, a body mode of NONE, trailers without a body, or an exchange that ended first), by route, agent and phase; a request is refused when a message still arrives to answer."},
	{Name: "policy_kernel_chains_skipped_total", Type: "counter", Help: "Chains the kernel did not send to the agent because the when condition of every entry was false on the request, by route, agent and phase (counted as allowed in the phase's outcome too)."},
	{Name: "policy_kernel_streams_active", Type: "gauge", Help: "ext_proc streams open now."},
	{Name: "policy_kernel_default_route_requests_total", Type: "counter", Help: "Requests that matched no route by name or path and got default_policy (or, without one, went through unchanged), by the xds.route_name attribute (\"\" when absent); past 100 names, \"other\"."},
	{Name: "policy_kernel_invalid_routes", Type: "gauge", Help: "Routes of the config in force whose requests are refused: invalid (a policy its agent lacks or refuses) or not checked against their agent yet. The kernel is not ready while it is above 0."},
	{Name: "policy_kernel_connections_active", Type: "gauge", Help: "Connections open now on the ext_proc port."},
	{Name: "policy_kernel_connections_refused_total", Type: "counter", Help: "Connections to the ext_proc port closed at once because server.max_connections were open."},
	{Name: "policy_kernel_streams_idle_closed_total", Type: "counter", Help: "ext_proc streams ended because they received and sent no message for server.stream_idle_timeout_ms."},
	{Name: "policy_kernel_tls_handshake_failures_total", Type: "counter", Help: "Connections to the ext_proc port refused in the TLS handshake: no client certificate of client_ca_file, a plaintext client, or no handshake within 5 s."},
	{Name: "policy_kernel_tls_reload_total", Type: "counter", Help: "Reloads of the ext_proc port's certificate files after they changed, by status: success or failure (the previous certificates stay)."},
}

type agentMetrics struct {
	calls       *metrics.PrometheusHistogram
	timeouts    *metrics.Counter
	unavailable *metrics.Counter
	healthy     *metrics.Gauge
	healthVal   atomicFloat
}

func newKernelMetrics() *kernelMetrics {
	m := &kernelMetrics{set: metrics.NewSet(), routes: map[string]*routeMetrics{}, agents: map[string]*agentMetrics{}}
	m.reloadSuccess = m.set.NewCounter(`policy_kernel_config_reload_total{status="success"}`)
	m.reloadFailure = m.set.NewCounter(`policy_kernel_config_reload_total{status="failure"}`)
	m.lastReloadSuccess = m.set.NewGauge(`policy_kernel_config_last_reload_success_timestamp_seconds`, func() float64 {
		m.mu.Lock()
		defer m.mu.Unlock()
		return m.lastReloadSuccessTS
	})
	m.protocolErrors = m.set.NewCounter(`policy_kernel_protocol_errors_total`)
	m.defaults = newDefaultRoutes(m.set)
	m.noRoute = m.set.NewCounter(`policy_kernel_requests_total{route="",agent="",status="` + statusNoRoute + `"}`)
	m.connRefused = m.set.NewCounter(`policy_kernel_connections_refused_total`)
	m.streamsIdleClosed = m.set.NewCounter(`policy_kernel_streams_idle_closed_total`)
	return m
}

// markReloaded records the time of a successful reload.
func (m *kernelMetrics) markReloaded() {
	m.mu.Lock()
	m.lastReloadSuccessTS = float64(time.Now().UnixNano()) / 1e9
	m.mu.Unlock()
}

// forRoute returns the series of a route and agent, creating them on first use.
func (m *kernelMetrics) forRoute(route, agent string) *routeMetrics {
	m.mu.Lock()
	defer m.mu.Unlock()
	key := route + "\x00" + agent
	if rm := m.routes[key]; rm != nil {
		return rm
	}
	labels := `route=` + obs.Label(route) + `,agent=` + obs.Label(agent)
	rm := &routeMetrics{requests: map[string]*metrics.Counter{}, responses: map[string]*metrics.Counter{}}
	for _, s := range allStatuses {
		name := `policy_kernel_requests_total{` + labels + `,status="` + s + `"}`
		rm.requests[s] = m.set.GetOrCreateCounter(name)
		rm.names = append(rm.names, name)
		if s == statusInvalidRoute {
			continue // an invalid route never reaches its response phase
		}
		name = `policy_kernel_response_phase_total{` + labels + `,status="` + s + `"}`
		rm.responses[s] = m.set.GetOrCreateCounter(name)
		rm.names = append(rm.names, name)
	}
	dname := `policy_kernel_request_duration_seconds{` + labels + `}`
	rm.duration = m.set.GetOrCreatePrometheusHistogramExt(dname, durationBuckets)
	rname := `policy_kernel_mutations_rejected_total{` + labels + `}`
	rm.rejected = m.set.GetOrCreateCounter(rname)
	rm.names = append(rm.names, dname, rname)
	for i, phase := range []string{"request", "response"} {
		name := `policy_kernel_body_missing_total{` + labels + `,phase="` + phase + `"}`
		rm.bodyMissing[i] = m.set.GetOrCreateCounter(name)
		rm.names = append(rm.names, name)
		name = `policy_kernel_chains_skipped_total{` + labels + `,phase="` + phase + `"}`
		rm.skipped[i] = m.set.GetOrCreateCounter(name)
		rm.names = append(rm.names, name)
	}
	m.routes[key] = rm
	return rm
}

// forAgent returns the series of an agent, creating them on first use.
func (m *kernelMetrics) forAgent(agent string) *agentMetrics {
	m.mu.Lock()
	defer m.mu.Unlock()
	if am := m.agents[agent]; am != nil {
		return am
	}
	l := obs.Label(agent)
	am := &agentMetrics{
		calls:       m.set.GetOrCreatePrometheusHistogramExt(`policy_kernel_agent_call_duration_seconds{agent=`+l+`}`, agentCallBuckets),
		timeouts:    m.set.GetOrCreateCounter(`policy_kernel_agent_timeouts_total{agent=` + l + `}`),
		unavailable: m.set.GetOrCreateCounter(`policy_kernel_agent_unavailable_total{agent=` + l + `}`),
	}
	am.healthy = m.set.GetOrCreateGauge(`policy_kernel_agent_health{agent=`+l+`}`, am.healthVal.Load)
	m.agents[agent] = am
	return am
}

// retain unregisters the series of every route and agent not in keep.
func (m *kernelMetrics) retain(routes map[string]bool, agents map[string]bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for key, rm := range m.routes {
		if !routes[key] {
			for _, n := range rm.names {
				m.set.UnregisterMetric(n)
			}
			delete(m.routes, key)
		}
	}
	for name := range m.agents {
		if !agents[name] {
			l := obs.Label(name)
			m.set.UnregisterMetric(`policy_kernel_agent_call_duration_seconds{agent=` + l + `}`)
			m.set.UnregisterMetric(`policy_kernel_agent_timeouts_total{agent=` + l + `}`)
			m.set.UnregisterMetric(`policy_kernel_agent_unavailable_total{agent=` + l + `}`)
			m.set.UnregisterMetric(`policy_kernel_agent_health{agent=` + l + `}`)
			delete(m.agents, name)
		}
	}
}

// setInfo replaces the policy_kernel_config_info series with one for version.
func (m *kernelMetrics) setInfo(version string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.infoVersion != "" {
		m.set.UnregisterMetric(`policy_kernel_config_info{version=` + obs.Label(m.infoVersion) + `}`)
	}
	m.infoVersion = version
	m.set.GetOrCreateGauge(`policy_kernel_config_info{version=`+obs.Label(version)+`}`, func() float64 { return 1 })
}

// registerStreams exports the number of open ext_proc streams.
func (m *kernelMetrics) registerStreams(s *Server) {
	m.set.GetOrCreateGauge(`policy_kernel_streams_active`, func() float64 { return float64(s.streams.Load()) })
}

// maxDefaultRouteNames bounds the route_name label of policy_kernel_default_route_requests_total.
const maxDefaultRouteNames = 100

// defaultRoutes counts the requests served by the default policy, by the route name Envoy sent:
// a route of Envoy's that the kernel does not know, or no route name at all, is a config
// mismatch that sends requests to the default policy instead of a route's chain. Each name is
// logged once; names are Envoy's, not the client's, and past maxDefaultRouteNames they are
// counted as "other". It outlives snapshots, so a reload neither resets nor repeats the logs.
type defaultRoutes struct {
	set   *metrics.Set
	names *xsync.Map[string, *metrics.Counter]
	full  atomic.Bool
	other *metrics.Counter
	log   atomic.Pointer[logging.Logger]
	// otherLog throttles the log of names past the bound.
	otherLog *logging.Throttle

	mu    sync.Mutex // serialises adding a name
	count int
}

func newDefaultRoutes(set *metrics.Set) *defaultRoutes {
	return &defaultRoutes{
		set:      set,
		names:    xsync.NewMap[string, *metrics.Counter](),
		other:    set.NewCounter(`policy_kernel_default_route_requests_total{route_name="other"}`),
		otherLog: logging.NewThrottle(time.Minute),
	}
}

// observe counts one request with the given route name served by the default policy; known
// names cost one lock-free map lookup.
func (d *defaultRoutes) observe(name string, hasDefault bool) {
	if c, ok := d.names.Load(name); ok {
		c.Inc()
		return
	}
	d.add(name, hasDefault).Inc()
}

func (d *defaultRoutes) add(name string, hasDefault bool) *metrics.Counter {
	if !d.full.Load() {
		d.mu.Lock()
		defer d.mu.Unlock()
		if c, ok := d.names.Load(name); ok {
			return c
		}
		if d.count < maxDefaultRouteNames {
			d.count++
			c := d.set.GetOrCreateCounter(`policy_kernel_default_route_requests_total{route_name=` + obs.Label(name) + `}`)
			d.names.Store(name, c)
			d.logFirst(name, hasDefault, "request matched no route by name or path (logged once per route name)")
			return c
		}
		d.full.Store(true)
	}
	if d.otherLog.Allow() {
		d.logFirst(name, hasDefault, "request matched no route by name or path; route name counted as \"other\" (logged at most once a minute)")
	}
	return d.other
}

func (d *defaultRoutes) logFirst(name string, hasDefault bool, msg string) {
	action := "default_policy"
	if !hasDefault {
		action = "none: passed unchanged"
	}
	d.log.Load().Warn().Str("route_name", name).Bool("route_name_sent", name != "").Str("chain", action).Msg(msg)
}

// registerInvalidRoutes exports how many routes of the config in force cannot serve.
func (m *kernelMetrics) registerInvalidRoutes(s *Server) {
	m.set.GetOrCreateGauge(`policy_kernel_invalid_routes`, func() float64 { return float64(s.Snapshot().refusedRoutes()) })
}

// registerConnections exports the number of connections open on the ext_proc port.
func (m *kernelMetrics) registerConnections(l *limitListener) {
	m.set.GetOrCreateGauge(`policy_kernel_connections_active`, func() float64 { return float64(l.active.Load()) })
}

// registerTLS creates the certificate reload counters; only a kernel serving TLS has them.
func (m *kernelMetrics) registerTLS() {
	m.tlsReloadSuccess = m.set.GetOrCreateCounter(`policy_kernel_tls_reload_total{status="success"}`)
	m.tlsReloadFail = m.set.GetOrCreateCounter(`policy_kernel_tls_reload_total{status="failure"}`)
	m.tlsHandshakeFail = m.set.GetOrCreateCounter(`policy_kernel_tls_handshake_failures_total`)
}
