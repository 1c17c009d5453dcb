// Package ops tests what running policy-engine in production relies on, over the real
// binaries: hot reload under traffic, validation, metrics that promtool accepts, readiness and
// the gRPC health service, graceful shutdown, supervisord restarting a killed agent, OTLP
// traces, and the deployment files (Envoy bootstrap, Prometheus rules, Grafana dashboard,
// Dockerfile).
package ops

import (
	"context"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// repoRoot is the repository's root, relative to this package.
const repoRoot = "../../"

const agentYAML = `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  policies:
    config:
      apiKeyAuth:
        keys:
          - key_sha256: "a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873"  # demo-key-123
            user_id: demo-user
  observability:
    metrics_address: "{{AGENT_METRICS}}"
`

// kernelYAML has one route with a request and a response chain; the response chain's header
// shows which config answered (%s). The timeouts are generous: these tests are about what
// reloads, health and shutdown do, on a machine that may be busy, not about latency.
const kernelYAML = `policy_kernel:
  version: "%[1]s"
  server:
    message_timeout_ms: 2000
  agents:
    - name: default-agent
      socket_path: "{{SOCK}}"
      timeout_ms: 1500
      health_check_interval_ms: 200
  route_policies:
    - route_name: /api/v1/users
      request_policy_chain:
        - policy: apiKeyAuth
          metadata:
            header_name: X-API-Key
            required: true
      response_policy_chain:
        - policy: addSecurityHeaders
          metadata:
            headers:
              X-Config-Version: "%[1]s"
  default_policy:
    request_policy_chain:
      - policy: allowAll
`

// envoyConfig is the ext_proc filter of deploy/envoy/envoy.yaml, with a message timeout that
// matches kernelYAML.
var envoyConfig = envoytest.FilterConfig{
	AllowModeOverride: true,
	RequestAttributes: []string{"xds.route_name", "source.address"},
	MessageTimeout:    2 * time.Second,
}

// do runs one request on /api/v1/users (route attribute set) with the demo key.
func do(t *testing.T, c *envoytest.Client, headers ...[2]string) *envoytest.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := c.Do(ctx, &envoytest.Request{
		Path:       "/api/v1/users",
		Headers:    append([][2]string{{"x-api-key", "demo-key-123"}}, headers...),
		Attributes: map[string]string{"xds.route_name": "/api/v1/users", "source.address": "127.0.0.1:5555"},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return r
}
