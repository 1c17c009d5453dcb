package tracing

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/rs/zerolog"

	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/tracing/otlptest"
)

func rate(f float64) *float64 { return &f }

func TestNewOff(t *testing.T) {
	tr, err := New(Config{}, Root, "svc", "v", nil)
	if tr != nil || err != nil {
		t.Fatalf("disabled: %v, %v", tr, err)
	}
	if err := tr.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := New(Config{Enabled: true}, Root, "svc", "v", nil); err == nil || !strings.Contains(err.Error(), "endpoint is required") {
		t.Fatalf("no endpoint: %v", err)
	}
	_, err = New(Config{Enabled: true, Endpoint: "127.0.0.1:1", Headers: map[string]string{"authorization": "${env:POLICY_ENGINE_TEST_UNSET_TOKEN}"}}, Root, "svc", "v", nil)
	if err == nil || !strings.Contains(err.Error(), "${env:POLICY_ENGINE_TEST_UNSET_TOKEN}") {
		t.Fatalf("unset secret: %v", err)
	}
	if (Config{}).Rate() != 1 || (Config{SamplingRate: rate(0.25)}).Rate() != 0.25 {
		t.Fatal("Rate")
	}
}

const parentSampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
const parentNotSampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"

func TestExport(t *testing.T) {
	col, err := otlptest.Start()
	if err != nil {
		t.Fatal(err)
	}
	defer col.Stop()
	t.Setenv("POLICY_ENGINE_TEST_TOKEN", "Bearer t0ken")
	var exportErrs []error
	root, err := New(Config{Enabled: true, Endpoint: col.Addr(), ServiceName: "kernel-test",
		Headers: map[string]string{"authorization": "${env:POLICY_ENGINE_TEST_TOKEN}"}}, Root, "policy-kernel", "1.2.3",
		func(err error) { exportErrs = append(exportErrs, err) })
	if err != nil {
		t.Fatal(err)
	}
	if root.Config().ServiceName != "kernel-test" {
		t.Fatal("Config")
	}
	follower, err := New(Config{Enabled: true, Endpoint: col.Addr()}, Follower, "policy-agent", "1.2.3", nil)
	if err != nil {
		t.Fatal(err)
	}

	// A stream under Envoy's sampled traceparent: its span is a child of it, and the agent's
	// span is a child of the call span whose context was injected.
	ctx, stream := root.StartRemote(context.Background(), map[string]string{"traceparent": parentSampled}, "ext_proc", trace.SpanKindServer, attribute.String("route", "/api"))
	if stream == nil {
		t.Fatal("sampled parent: no span")
	}
	cctx, call := root.Start(ctx, "agent call", trace.SpanKindClient)
	carrier := Inject(cctx)
	if !strings.HasPrefix(carrier["traceparent"], "00-0af7651916cd43dd8448eb211c80319c-") {
		t.Fatalf("injected %v", carrier)
	}
	actx, chain := follower.StartRemote(context.Background(), carrier, "policy apiKeyAuth", trace.SpanKindInternal)
	if chain == nil {
		t.Fatal("agent: sampled parent not followed")
	}
	_, child := follower.Start(actx, "inner", trace.SpanKindInternal)
	child.End()
	chain.End()
	call.End()
	stream.End()

	// Not sampled: a follower without parent, a root at rate 0.
	if _, s := follower.StartRemote(context.Background(), nil, "x", trace.SpanKindInternal); s != nil {
		t.Fatal("follower traced a root")
	}
	zero, err := New(Config{Enabled: true, Endpoint: col.Addr(), SamplingRate: rate(0)}, Root, "z", "v", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, s := zero.StartRemote(context.Background(), nil, "x", trace.SpanKindServer); s != nil {
		t.Fatal("rate 0 traced")
	}
	if _, s := root.StartRemote(context.Background(), nil, "root", trace.SpanKindServer); s == nil {
		t.Fatal("rate 1 root not traced")
	} else {
		s.End()
	}

	for _, tr := range []*Tracer{root, follower, zero} {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := tr.Shutdown(ctx); err != nil {
			t.Fatal(err)
		}
		cancel()
	}
	spans, ok := col.WaitFor(5*time.Second, func(s []otlptest.Span) bool { return len(s) >= 5 })
	if !ok {
		t.Fatalf("spans received: %+v (export errors %v)", spans, exportErrs)
	}
	by := map[string]otlptest.Span{}
	for _, s := range spans {
		by[s.Name] = s
	}
	if s := by["ext_proc"]; s.ParentSpanID != "b7ad6b7169203331" || s.Service != "kernel-test" || s.Attributes["route"] != "/api" {
		t.Fatalf("stream span %+v", s)
	}
	if by["agent call"].ParentSpanID != by["ext_proc"].SpanID {
		t.Fatal("call span is not the stream's child")
	}
	if s := by["policy apiKeyAuth"]; s.ParentSpanID != by["agent call"].SpanID || s.Service != "policy-agent" {
		t.Fatalf("agent span %+v", s)
	}
	if by["inner"].ParentSpanID != by["policy apiKeyAuth"].SpanID {
		t.Fatal("inner span parent")
	}
	if len(spans) != 5 {
		t.Fatalf("want 5 spans, got %d: %+v", len(spans), spans)
	}
	auth := false
	for _, md := range col.Headers() {
		for _, v := range md.Get("authorization") {
			auth = auth || v == "Bearer t0ken"
		}
	}
	if !auth {
		t.Fatalf("authorization header not sent: %v", col.Headers())
	}
	if len(exportErrs) > 0 {
		t.Fatalf("export errors: %v", errors.Join(exportErrs...))
	}
}

// TestRootSampling: by default the kernel's rate decides every stream, whatever the incoming
// traceparent says, and a trace id a client chose is sampled no more often than any other; with
// RespectParentSampling the incoming flag decides. The remote parent stays the span's parent
// either way.
func TestRootSampling(t *testing.T) {
	col, err := otlptest.Start()
	if err != nil {
		t.Fatal(err)
	}
	defer col.Stop()
	tracer := func(r float64, respect bool) *Tracer {
		t.Helper()
		tr, err := New(Config{Enabled: true, Endpoint: col.Addr(), SamplingRate: rate(r), RespectParentSampling: respect}, Root, "k", "v", nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(tr.Close)
		return tr
	}
	f := func(tr *Tracer, traceparent string, want bool) {
		t.Helper()
		carrier := map[string]string{}
		if traceparent != "" {
			carrier["traceparent"] = traceparent
		}
		_, s := tr.StartRemote(context.Background(), carrier, "x", trace.SpanKindServer)
		if (s != nil) != want {
			t.Fatalf("%s: traced %v, want %v", traceparent, s != nil, want)
		}
		if s == nil {
			return
		}
		if tp := traceparent; tp != "" && s.SpanContext().TraceID().String() != tp[3:35] {
			t.Fatalf("%s: trace id %s, not the parent's", tp, s.SpanContext().TraceID())
		}
		s.End()
	}
	// Low 64 bits zero: the ids a trace-id ratio sampler takes at any rate above 0.
	const lowZero = "00-0af7651916cd43dd0000000000000000-b7ad6b7169203331-01"
	def := tracer(0, false)
	f(def, parentSampled, false)
	f(def, "", false)
	tiny := tracer(1e-9, false)
	for range 100 {
		f(tiny, lowZero, false)
	}
	all := tracer(1, false)
	f(all, parentNotSampled, true)
	f(all, parentSampled, true)
	f(all, "", true)

	respect := tracer(0, true)
	f(respect, parentSampled, true)
	f(respect, parentNotSampled, false)
	f(respect, "", false)
	f(tracer(1, true), parentNotSampled, false)

	half := newDrawSampler(0.5)
	if half.Description() != "Draw{0.5}" || newDrawSampler(1).Description() != "Draw{1}" || newDrawSampler(0).Description() != "Draw{0}" {
		t.Fatal("Description")
	}
}

func TestTLSOption(t *testing.T) {
	f := false
	tr, err := New(Config{Enabled: true, Endpoint: "127.0.0.1:1", Insecure: &f}, Root, "s", "v", nil)
	if err != nil || tr == nil {
		t.Fatalf("TLS exporter: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = tr.Shutdown(ctx)
}

func TestRemote(t *testing.T) {
	if _, ok := Remote(context.Background(), nil); ok {
		t.Fatal("no carrier")
	}
	if _, ok := Remote(context.Background(), map[string]string{"traceparent": parentNotSampled}); ok {
		t.Fatal("unsampled parent")
	}
	ctx, ok := Remote(context.Background(), map[string]string{"traceparent": parentSampled, "tracestate": "k=v"})
	if !ok || trace.SpanContextFromContext(ctx).TraceState().Get("k") != "v" {
		t.Fatal("sampled parent with its trace state")
	}
	if _, ok := Remote(context.Background(), map[string]string{"traceparent": "garbage"}); ok {
		t.Fatal("a malformed traceparent")
	}
	c := mapCarrier{"traceparent": "x", "tracestate": "y"}
	if k := c.Keys(); len(k) != 2 {
		t.Fatalf("Keys %v", k)
	}
}

// FuzzRemote feeds any traceparent and tracestate to the extraction the agent does for every
// chain: no panic, and a context is sampled only if it is valid.
func FuzzRemote(f *testing.F) {
	f.Add(parentSampled, "k=v")
	f.Add(parentNotSampled, "")
	f.Add("00-00000000000000000000000000000000-0000000000000000-01", "a=b,c=d")
	f.Add("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "=")
	f.Fuzz(func(t *testing.T, tp, ts string) {
		ctx, ok := Remote(context.Background(), map[string]string{"traceparent": tp, "tracestate": ts})
		if ok && !trace.SpanContextFromContext(ctx).IsValid() {
			t.Fatalf("sampled but invalid: %q", tp)
		}
	})
}

func TestNewLoggedAndClose(t *testing.T) {
	var logs strings.Builder
	log := logging.New(&logs, "test", zerolog.WarnLevel)
	if tr, err := NewLogged(Config{}, Root, "svc", "v", log); tr != nil || err != nil {
		t.Fatalf("tracing off: %v, %v", tr, err)
	}
	var off *Tracer
	off.Close() // nothing to flush
	col, err := otlptest.Start()
	if err != nil {
		t.Fatal(err)
	}
	defer col.Stop()
	tr, err := NewLogged(Config{Enabled: true, Endpoint: col.Addr()}, Root, "svc", "v", log)
	if err != nil || tr == nil {
		t.Fatalf("NewLogged: %v, %v", tr, err)
	}
	_, span := tr.Start(context.Background(), "op", trace.SpanKindInternal)
	span.End()
	tr.Close() // flushes the span
	if spans, ok := col.WaitFor(5*time.Second, func(s []otlptest.Span) bool { return len(s) == 1 }); !ok || spans[0].Name != "op" {
		t.Errorf("span not exported on Close: %v", spans)
	}
}
