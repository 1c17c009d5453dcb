// Package e2e runs auditLog and responseBodyTransform in the real policy-agent and
// policy-kernel binaries, driven by a client that behaves like Envoy's ext_proc filter: the
// response body is buffered only because responseBodyTransform asks for it, the client sees
// it without internal_id (and without a stale content-length, which Envoy would reject), and the
// agent's audit file holds the record, redacted.
package e2e

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
	"github.com/policy-engine/policy-engine/policies/auditlog"
)

func TestMain(m *testing.M) { testenv.Main(m) }

const agentYAML = `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  policies:
    config:
      apiKeyAuth:
        keys:
          - key_sha256: "a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873"  # demo-key-123
            user_id: demo-user
      auditLog:
        sink: file
        path: "{{DIR}}/audit.log"
        max_size_mb: 1
        max_backups: 2
`

const kernelYAML = `policy_kernel:
  agents:
    - name: default-agent
      socket_path: "{{SOCK}}"
      timeout_ms: 150
      health_check_interval_ms: 200
  route_policies:
    - route_name: /api/v1/users
      request_policy_chain:
        - policy: auditLog
        - policy: apiKeyAuth
          metadata: {header_name: X-API-Key}
      response_policy_chain:
        - policy: responseBodyTransform
          metadata:
            remove_fields: ["internal_id", "items.internal_id"]
        - policy: auditLog
          metadata:
            log_response_body: true
  default_policy:
    request_policy_chain:
      - policy: allowAll
`

const upstreamBody = `{"id":7,"internal_id":"db-000123","name":"Ada","password":"SECRET-BODY","items":[{"internal_id":1,"sku":"A"}],"n":12345678901234567890}`

func TestTransformAndAudit(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: kernelYAML})
	c := e.Dial(t, envoytest.FilterConfig{
		AllowModeOverride: true,
		RequestAttributes: []string{"xds.route_name", "source.address"},
		MessageTimeout:    200 * time.Millisecond,
	})
	do := func(id, key string) *envoytest.Result {
		t.Helper()
		req := &envoytest.Request{
			Method: "GET", Path: "/api/v1/users/7?access_token=SECRET-QUERY", Authority: "api.example.com",
			Headers:    [][2]string{{"x-api-key", key}, {"x-request-id", id}, {"cookie", "session=SECRET-COOKIE"}},
			Attributes: map[string]string{"source.address": "192.0.2.10:40000"},
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		res, err := c.Do(ctx, req, func(*envoytest.Forwarded) *envoytest.Response {
			return &envoytest.Response{Status: 200, Body: []byte(upstreamBody), Headers: [][2]string{
				{"content-type", "application/json; charset=utf-8"},
				{"content-length", strconv.Itoa(len(upstreamBody))},
			}}
		})
		if err != nil {
			t.Fatal(err)
		}
		return res
	}

	// Denied by apiKeyAuth: no response phase, so no audit record.
	if r := do("req-denied", "wrong-key"); r.Status != 403 || r.Forwarded != nil {
		t.Fatalf("wrong key: %d %q", r.Status, r.Details)
	}
	r := do("req-ok", "demo-key-123")
	if r.Status != 200 || r.LocalReply {
		t.Fatalf("good key: %d %q %s", r.Status, r.Details, r.Body)
	}
	if want := `{"id":7,"name":"Ada","password":"SECRET-BODY","items":[{"sku":"A"}],"n":12345678901234567890}`; string(r.Body) != want {
		t.Fatalf("client body = %s, want %s", r.Body, want)
	}
	for _, h := range r.Headers {
		if h[0] == "content-length" && h[1] != strconv.Itoa(len(r.Body)) {
			t.Fatalf("content-length %s for a body of %d bytes", h[1], len(r.Body))
		}
	}

	// The record reaches the file without waiting for a flush on shutdown.
	path := filepath.Join(e.Dir, "audit.log")
	var data []byte
	testenv.WaitFor(t, 10*time.Second, "the audit record", func() bool {
		data, _ = os.ReadFile(path)
		return strings.Count(string(data), "\n") >= 2
	})
	for _, s := range []string{"SECRET-BODY", "SECRET-QUERY", "SECRET-COOKIE", "demo-key-123", "db-000123"} {
		if strings.Contains(string(data), s) {
			t.Errorf("%q in the audit log: %s", s, data)
		}
	}
	lines := strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d records, want 2 (the denial, then the allowed exchange): %s", len(lines), data)
	}
	decode := func(line string) auditlog.Record {
		var rec auditlog.Record
		d := json.NewDecoder(strings.NewReader(line))
		d.DisallowUnknownFields()
		if err := d.Decode(&rec); err != nil {
			t.Fatalf("record %s: %v", line, err)
		}
		return rec
	}
	if den := decode(lines[0]); den.RequestID != "req-denied" || den.Decision != "denied" || den.DecidedBy != "apiKeyAuth" || den.Status != 403 || den.Phase != "request" {
		t.Fatalf("denial record = %s", lines[0])
	}
	rec := decode(lines[1])
	lines[0] = lines[1]
	if rec.RequestID != "req-ok" || rec.Route != "/api/v1/users" || rec.Status != 200 || rec.UserID != "demo-user" ||
		rec.AuthMethod != "api_key" || rec.Decision != "allowed" || rec.DurationMS == nil ||
		rec.Path != "/api/v1/users/7?access_token=[REDACTED]" || rec.ClientIP != "192.0.2.10" ||
		rec.RequestHeaders["x-api-key"] != auditlog.Redacted || rec.RequestHeaders["cookie"] != auditlog.Redacted {
		t.Fatalf("record = %s", lines[0])
	}
	if want := `{"id":7,"name":"Ada","password":"[REDACTED]","items":[{"sku":"A"}],"n":12345678901234567890}`; rec.ResponseBody == nil || *rec.ResponseBody != want {
		t.Fatalf("logged body = %v, want %s", rec.ResponseBody, want)
	}

	// The denial is in the kernel's metrics too.
	_, metrics := e.Get(t, "/metrics")
	if !strings.Contains(metrics, `policy_kernel_requests_total{route="/api/v1/users",agent="default-agent",status="deny"} 1`) {
		t.Error("the denial is not counted")
	}

	// The agent stops cleanly and its audit writer leaves the file as it was.
	e.Agent.Stop(t)
	if after, _ := os.ReadFile(path); string(after) != string(data) {
		t.Fatalf("the audit log changed on shutdown: %s", after)
	}
}
