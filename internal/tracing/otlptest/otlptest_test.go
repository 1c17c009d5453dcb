package otlptest

import (
	"context"
	"testing"
	"time"

	collectorpb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	resourcepb "go.opentelemetry.io/proto/otlp/resource/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
)

func str(k, v string) *commonpb.KeyValue {
	return &commonpb.KeyValue{Key: k, Value: &commonpb.AnyValue{Value: &commonpb.AnyValue_StringValue{StringValue: v}}}
}

func TestCollector(t *testing.T) {
	c, err := Start()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Stop()
	conn, err := grpc.NewClient(c.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, ok := c.WaitFor(10*time.Millisecond, func(s []Span) bool { return len(s) > 0 }); ok {
		t.Fatal("spans before any export")
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		ctx := metadata.AppendToOutgoingContext(context.Background(), "x-token", "t")
		_, err := collectorpb.NewTraceServiceClient(conn).Export(ctx, &collectorpb.ExportTraceServiceRequest{
			ResourceSpans: []*tracepb.ResourceSpans{{
				Resource: &resourcepb.Resource{Attributes: []*commonpb.KeyValue{str("service.name", "svc")}},
				ScopeSpans: []*tracepb.ScopeSpans{{Spans: []*tracepb.Span{{
					Name: "s", TraceId: []byte{1, 2}, SpanId: []byte{3}, ParentSpanId: []byte{4},
					Kind:       tracepb.Span_SPAN_KIND_SERVER,
					Attributes: []*commonpb.KeyValue{str("a", "b"), {Key: "n", Value: &commonpb.AnyValue{Value: &commonpb.AnyValue_IntValue{IntValue: 7}}}},
					Status:     &tracepb.Status{Code: tracepb.Status_STATUS_CODE_ERROR},
				}}}},
			}},
		})
		if err != nil {
			t.Error(err)
		}
	}()
	spans, ok := c.WaitFor(5*time.Second, func(s []Span) bool { return len(s) == 1 })
	<-done
	if !ok {
		t.Fatal("span not received")
	}
	s := spans[0]
	if s.Service != "svc" || s.Name != "s" || s.TraceID != "0102" || s.SpanID != "03" || s.ParentSpanID != "04" ||
		s.Kind != tracepb.Span_SPAN_KIND_SERVER || s.Attributes["a"] != "b" || s.Attributes["n"] != "int_value:7" ||
		s.StatusCode != tracepb.Status_STATUS_CODE_ERROR {
		t.Fatalf("span %+v", s)
	}
	if len(c.Spans()) != 1 || c.Headers()[0].Get("x-token")[0] != "t" {
		t.Fatal("Spans or Headers")
	}
}
