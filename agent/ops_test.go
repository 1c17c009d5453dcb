package agent

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/secrets"
	"github.com/policy-engine/policy-engine/internal/tracing"
	"github.com/policy-engine/policy-engine/internal/tracing/otlptest"
	"github.com/policy-engine/policy-engine/internal/yamlconf"
)

// TestPolicySpans runs chains with tracing on: a sampled trace context from the kernel gives a
// span per policy under the kernel's span; no context, or an unsampled one, gives none.
func TestPolicySpans(t *testing.T) {
	col, err := otlptest.Start()
	if err != nil {
		t.Fatal(err)
	}
	defer col.Stop()
	e, logs := newTestExecutor(t, testCore())
	tr, err := tracing.NewLogged(tracing.Config{Enabled: true, Endpoint: col.Addr()}, tracing.Follower, "policy-agent", Version, e.log)
	if err != nil {
		t.Fatal(err)
	}
	if prev := e.SetTracer(tr); prev != nil {
		t.Fatal("a tracer was set")
	}
	sampled := map[string]string{"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
	r := req(p("t.setHeader", "key", "x", "value", "1"), p("t.fail"))
	r.TraceContext = sampled
	r.RequestId = "traced"
	if resp := e.Execute(context.Background(), r); resp.GetStatus().GetCode() != agentv1.StatusCode_POLICY_ERROR {
		t.Fatalf("%v", resp)
	}
	unsampled := req(p("t.setHeader", "key", "x", "value", "1"))
	unsampled.TraceContext = map[string]string{"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}
	e.Execute(context.Background(), unsampled)
	e.Execute(context.Background(), req(p("t.setHeader", "key", "x", "value", "1")))
	e.SetTracer(nil).Close()
	spans, ok := col.WaitFor(5*time.Second, func(s []otlptest.Span) bool { return len(s) >= 2 })
	if !ok || len(spans) != 2 {
		t.Fatalf("spans %+v\n%s", spans, logs)
	}
	for _, s := range spans {
		if s.ParentSpanID != "b7ad6b7169203331" || s.Service != "policy-agent" || s.Attributes["request_id"] != "traced" || s.Attributes["phase"] != "REQUEST" {
			t.Errorf("span %+v", s)
		}
	}
	if spans[0].Name != "policy t.setHeader" || spans[0].Attributes["status"] != "OK" || spans[0].StatusCode.String() != "STATUS_CODE_UNSET" {
		t.Errorf("first span %+v", spans[0])
	}
	if spans[1].Name != "policy t.fail" || spans[1].StatusCode.String() != "STATUS_CODE_ERROR" {
		t.Errorf("second span %+v", spans[1])
	}
	if off, err := tracing.NewLogged(tracing.Config{}, tracing.Follower, "policy-agent", Version, e.log); off != nil || err != nil {
		t.Fatal("tracing off")
	}
}

func TestContextSizeMetrics(t *testing.T) {
	m := newAgentMetrics()
	// The first chains' header sizes are all recorded.
	for range headerExact {
		m.observeContext(&agentv1.PolicyRequest{Phase: agentv1.PolicyPhase_REQUEST})
	}
	// Then each request is observed headerSampling times in a row: its headers once, its
	// body and state every time.
	for _, req := range []*agentv1.PolicyRequest{
		{Phase: agentv1.PolicyPhase_REQUEST, Context: &agentv1.RequestContext{Headers: map[string]string{"ab": "cd"}, Body: []byte("12345")}, State: map[string]string{"k": "v"}},
		{Phase: agentv1.PolicyPhase_RESPONSE, Response: &agentv1.ResponseContext{Headers: map[string]string{"x": "yz"}, Body: []byte("1")}},
		{Phase: agentv1.PolicyPhase_REQUEST},
	} {
		for range headerSampling {
			m.observeContext(req)
		}
	}
	var buf bytes.Buffer
	m.set.WritePrometheus(&buf)
	for _, want := range []string{
		`policy_agent_context_size_bytes_sum{type="request_headers"} 4`,
		`policy_agent_context_size_bytes_count{type="request_headers"} 66`,
		`policy_agent_context_size_bytes_sum{type="request_body"} 40`,
		`policy_agent_context_size_bytes_count{type="request_body"} 8`,
		`policy_agent_context_size_bytes_sum{type="state"} 16`,
		`policy_agent_context_size_bytes_sum{type="response_headers"} 3`,
		`policy_agent_context_size_bytes_count{type="response_headers"} 1`,
		`policy_agent_context_size_bytes_sum{type="response_body"} 8`,
	} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("metrics lack %s:\n%s", want, buf.String())
		}
	}
}

func TestPrecreateAndConfigInfo(t *testing.T) {
	m := newAgentMetrics()
	m.precreate([]string{"p1"})
	m.precreate([]string{"p1"})
	m.loaded("v1")
	m.loaded("v1")
	m.loaded("v2")
	var buf bytes.Buffer
	m.set.WritePrometheus(&buf)
	out := buf.String()
	for _, want := range []string{
		`policy_agent_executions_total{policy="p1",status="ok"} 0`,
		`policy_agent_policy_failures_total{policy="p1",reason="error"} 0`,
		`policy_agent_policy_failures_total{policy="p1",reason="timeout"} 0`,
		`policy_agent_config_info{version="v2"} 1`,
		`policy_agent_config_reload_total{status="failure"} 0`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("metrics lack %s:\n%s", want, out)
		}
	}
	if strings.Contains(out, `version="v1"`) {
		t.Error("the old version's config_info is still exported")
	}
	if g := m.lastReloadSuccess.Get(); g < float64(time.Now().Add(-time.Minute).Unix()) {
		t.Errorf("last reload timestamp %v", g)
	}
}

func TestResolveSecrets(t *testing.T) {
	l := secrets.Lookup{
		Env:  func(k string) (string, bool) { return map[string]string{"K": "s3cret"}[k], k == "K" },
		File: func(string) ([]byte, error) { return nil, context.Canceled },
	}
	c := &CoreConfig{Policies: PoliciesConfig{Config: map[string]yamlconf.Raw{
		"a": yamlconf.Raw(`{"key":"${env:K}"}`),
		"b": yamlconf.Raw(`{"key":"${file:/x}"}`),
		"c": yamlconf.Raw(`{"key":"${env:NOPE}"}`),
	}}}
	err := resolveSecrets("agent.yaml", c, l)
	if err == nil || err.Error() != "agent.yaml: agent_core.policies.config.b: key: secret ${file:/x}: context canceled\nagent.yaml: agent_core.policies.config.c: key: secret ${env:NOPE}: environment variable not set" {
		t.Fatalf("resolveSecrets: %v", err)
	}
	if string(c.Policies.Config["a"]) != `{"key":"s3cret"}` {
		t.Fatalf("resolved: %s", c.Policies.Config["a"])
	}
	if strings.Contains(err.Error(), "s3cret") {
		t.Fatal("a secret in an error")
	}
}
