package agent

import (
	"sync"
	"time"

	"github.com/VictoriaMetrics/metrics"

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
}

type policyMetrics struct {
	ok, denied, errored *metrics.Counter
	duration            *metrics.Histogram
}

func newAgentMetrics() *agentMetrics {
	return &agentMetrics{set: metrics.NewSet(), byPolicy: map[string]*policyMetrics{}}
}

// Set returns the metrics set, for the /metrics handler.
func (m *agentMetrics) Set() *metrics.Set { return m.set }

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
		duration: m.set.GetOrCreateHistogram(`policy_agent_execution_duration_seconds{policy=` + q + `}`),
	}
	m.byPolicy[name] = pm
	return pm
}

func (m *agentMetrics) observe(name string, start time.Time, status agentv1.StatusCode, err error) {
	pm := m.forPolicy(name)
	pm.duration.UpdateDuration(start)
	switch {
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
