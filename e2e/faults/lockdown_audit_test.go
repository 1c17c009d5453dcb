package faults

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

// lockdownAuditAgentYAML writes the audit log to /dev/full, a file every write to which fails
// with ENOSPC: a full disk. %s is the on_sink_error line, or nothing for the default.
const lockdownAuditAgentYAML = `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  policies:
    config:
      auditLog:
        sink: file
        path: /dev/full
%s  observability:
    metrics_address: "{{AGENT_METRICS}}"
`

const lockdownAuditKernelYAML = `policy_kernel:
  agents:
    - name: a
      socket_path: "{{SOCK}}"
      timeout_ms: 150
      health_check_interval_ms: 200
  route_policies:
    - route_name: /audited
      request_policy_chain: [{policy: auditLog}, {policy: allowAll}]
      response_policy_chain: [{policy: auditLog}]
`

// TestLockdownAuditSinkFull: with the audit disk full, requests on an audited route are refused
// by default (on_sink_error: deny, 503 audit_log_unavailable) once a write has failed, and
// counted; with on_sink_error: continue they pass, unrecorded, and are counted. The first
// request finds the sink healthy: the failure is known only once its record was written.
func TestLockdownAuditSinkFull(t *testing.T) {
	for _, tc := range []struct{ name, setting, want, action string }{
		{"default", "", "503 audit_log_unavailable", "deny"},
		{"deny", "        on_sink_error: deny\n", "503 audit_log_unavailable", "deny"},
		{"continue", "        on_sink_error: continue\n", "upstream", "continue"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := testenv.StartEnv(t, testenv.Options{AgentYAML: fmt.Sprintf(lockdownAuditAgentYAML, tc.setting), KernelYAML: lockdownAuditKernelYAML})
			c := e.Dial(t, envoyConfig)
			if s := play(c, "/audited", request("/audited")); s.outcome() != "upstream" {
				t.Fatalf("first request: %s", s.outcome())
			}
			testenv.WaitFor(t, 10*time.Second, "the failed audit write", func() bool {
				return agentMetric(t, e, "policy_agent_audit_log_write_errors_total") > 0
			})
			series := `policy_agent_audit_log_sink_failing_requests_total{action="` + tc.action + `"}`
			before := agentMetric(t, e, series)
			for i := range 3 {
				if s := play(c, "/audited", request("/audited")); s.outcome() != tc.want {
					t.Fatalf("request %d with the audit disk full: %s, want %s", i, s.outcome(), tc.want)
				}
			}
			if n := agentMetric(t, e, series) - before; n != 3 {
				t.Fatalf("%s grew by %v, want 3", series, n)
			}
			if code, body := e.GetAgent(t, "/health/ready"); code == 200 || !strings.Contains(body, "audit log sink") {
				t.Fatalf("agent ready with a failing audit sink: %d %s", code, body)
			}
		})
	}
}
