package ops

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
	"github.com/policy-engine/policy-engine/internal/tracing/otlptest"
)

const (
	envoyTraceID = "4bf92f3577b34da6a3ce929d0e0e4736"
	envoySpanID  = "00f067aa0ba902b7"
)

// TestTracingOTLP runs both binaries with tracing on and an OTLP collector in the test: one
// request under Envoy's traceparent gives the kernel's stream span (a child of Envoy's span),
// an agent-call span for the request phase, and the agent's span per policy under it, all in
// Envoy's trace; the response chain (addSecurityHeaders) is static, answered by the kernel
// without a call. A reload to sampling_rate 0 stops the spans.
func TestTracingOTLP(t *testing.T) {
	col, err := otlptest.Start()
	if err != nil {
		t.Fatal(err)
	}
	defer col.Stop()
	tracingKernel := func(rate string) string {
		return fmt.Sprintf(kernelYAML, "t-"+rate) + "  observability:\n    tracing:\n      enabled: true\n      sampling_rate: " + rate + "\n      endpoint: " + col.Addr() + "\n"
	}
	agentCfg := agentYAML + "    tracing:\n      enabled: true\n      endpoint: " + col.Addr() + "\n"
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentCfg, KernelYAML: tracingKernel("1")})
	c := e.Dial(t, envoyConfig)
	r := do(t, c,
		[2]string{"traceparent", "00-" + envoyTraceID + "-" + envoySpanID + "-01"},
		[2]string{"x-request-id", "traced-1"})
	if r.Status != 200 {
		t.Fatalf("status %d", r.Status)
	}

	spans, ok := col.WaitFor(15*time.Second, func(s []otlptest.Span) bool { return len(s) >= 3 })
	if !ok {
		t.Fatalf("spans received: %+v\nkernel:\n%s\nagent:\n%s", spans, e.Kernel.Logs.String(), e.Agent.Logs.String())
	}
	var stream otlptest.Span
	var calls, policies []otlptest.Span
	for _, s := range spans {
		if s.TraceID != envoyTraceID {
			t.Errorf("span %q in trace %s, not Envoy's", s.Name, s.TraceID)
		}
		switch {
		case s.Name == "ext_proc stream":
			stream = s
		case s.Name == "agent call":
			calls = append(calls, s)
		case strings.HasPrefix(s.Name, "policy "):
			policies = append(policies, s)
		default:
			t.Errorf("unexpected span %q", s.Name)
		}
	}
	if stream.ParentSpanID != envoySpanID || stream.Service != "policy-kernel" || stream.Kind != tracepb.Span_SPAN_KIND_SERVER ||
		stream.Attributes["route"] != "/api/v1/users" || stream.Attributes["request_id"] != "traced-1" || stream.Attributes["outcome"] != "allow" {
		t.Fatalf("stream span %+v", stream)
	}
	if len(calls) != 1 || len(policies) != 1 {
		t.Fatalf("want 1 agent call and 1 policy, got %+v and %+v", calls, policies)
	}
	phaseOf := map[string]string{}
	for _, call := range calls {
		if call.ParentSpanID != stream.SpanID || call.Kind != tracepb.Span_SPAN_KIND_CLIENT || call.Attributes["agent"] != "default-agent" {
			t.Errorf("call span %+v", call)
		}
		phaseOf[call.SpanID] = call.Attributes["phase"]
	}
	for _, p := range policies {
		want := map[string]string{"policy apiKeyAuth": "REQUEST", "policy addSecurityHeaders": "RESPONSE"}[p.Name]
		if p.Service != "policy-agent" || phaseOf[p.ParentSpanID] != want || p.Attributes["status"] != "OK" || p.Attributes["request_id"] != "traced-1" {
			t.Errorf("policy span %+v (parent phase %q, want %q)", p, phaseOf[p.ParentSpanID], want)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	// Sampling rate 0: neither a root nor a sampled parent is traced, by either process.
	e.WriteConfig(t, e.KernelConfig, tracingKernel("0"))
	e.Reload(t, "config reloaded")
	n := len(col.Spans())
	do(t, c)
	do(t, c, [2]string{"traceparent", "00-" + envoyTraceID + "-" + envoySpanID + "-01"})
	// The previous tracer is flushed after a grace period; spans of the requests above would
	// be exported within the batch timeout (1 s) of the new one.
	time.Sleep(3 * time.Second)
	if got := col.Spans(); len(got) != n {
		t.Fatalf("sampling_rate 0 exported %d spans: %+v", len(got)-n, got[n:])
	}
}

// TestTracingOffByDefault shows that without a tracing section no trace context reaches the
// agent: the agent, with its tracing on, records nothing.
func TestTracingOffByDefault(t *testing.T) {
	col, err := otlptest.Start()
	if err != nil {
		t.Fatal(err)
	}
	defer col.Stop()
	agentCfg := agentYAML + "    tracing:\n      enabled: true\n      endpoint: " + col.Addr() + "\n"
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentCfg, KernelYAML: fmt.Sprintf(kernelYAML, "off")})
	c := e.Dial(t, envoyConfig)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.Do(ctx, &envoytest.Request{Path: "/api/v1/users", Headers: [][2]string{{"traceparent", "00-" + envoyTraceID + "-" + envoySpanID + "-01"}}}, nil); err != nil {
		t.Fatal(err)
	}
	e.Agent.Stop(t) // flushes whatever the agent recorded
	if s := col.Spans(); len(s) != 0 {
		t.Fatalf("spans with the kernel's tracing off: %+v", s)
	}
}
