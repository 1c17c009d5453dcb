// Package otlptest is an OTLP/gRPC trace collector for tests: it listens on 127.0.0.1, accepts
// the spans that exporters send, and keeps them with the service.name of their resource.
package otlptest

import (
	"context"
	"encoding/hex"
	"net"
	"sync"
	"time"

	collectorpb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// Span is one received span.
type Span struct {
	Service      string
	Name         string
	TraceID      string // hex
	SpanID       string // hex
	ParentSpanID string // hex; empty for a root span
	Kind         tracepb.Span_SpanKind
	Attributes   map[string]string
	StatusCode   tracepb.Status_StatusCode
}

// Collector is a running collector.
type Collector struct {
	collectorpb.UnimplementedTraceServiceServer

	srv *grpc.Server
	ln  net.Listener

	mu      sync.Mutex
	spans   []Span
	headers []metadata.MD
	changed chan struct{}
}

// Start starts a collector on 127.0.0.1 and a free port.
func Start() (*Collector, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	c := &Collector{srv: grpc.NewServer(), ln: ln, changed: make(chan struct{})}
	collectorpb.RegisterTraceServiceServer(c.srv, c)
	go func() { _ = c.srv.Serve(ln) }()
	return c, nil
}

// Addr is the collector's host:port.
func (c *Collector) Addr() string { return c.ln.Addr().String() }

// Stop stops the collector.
func (c *Collector) Stop() { c.srv.Stop() }

// Export implements the OTLP trace service.
func (c *Collector) Export(ctx context.Context, req *collectorpb.ExportTraceServiceRequest) (*collectorpb.ExportTraceServiceResponse, error) {
	var got []Span
	for _, rs := range req.GetResourceSpans() {
		service := ""
		for _, a := range rs.GetResource().GetAttributes() {
			if a.GetKey() == "service.name" {
				service = a.GetValue().GetStringValue()
			}
		}
		for _, ss := range rs.GetScopeSpans() {
			for _, s := range ss.GetSpans() {
				attrs := map[string]string{}
				for _, a := range s.GetAttributes() {
					v := a.GetValue()
					switch {
					case v.GetStringValue() != "":
						attrs[a.GetKey()] = v.GetStringValue()
					default:
						attrs[a.GetKey()] = v.String()
					}
				}
				got = append(got, Span{
					Service:      service,
					Name:         s.GetName(),
					TraceID:      hex.EncodeToString(s.GetTraceId()),
					SpanID:       hex.EncodeToString(s.GetSpanId()),
					ParentSpanID: hex.EncodeToString(s.GetParentSpanId()),
					Kind:         s.GetKind(),
					Attributes:   attrs,
					StatusCode:   s.GetStatus().GetCode(),
				})
			}
		}
	}
	md, _ := metadata.FromIncomingContext(ctx)
	c.mu.Lock()
	c.spans = append(c.spans, got...)
	c.headers = append(c.headers, md)
	close(c.changed)
	c.changed = make(chan struct{})
	c.mu.Unlock()
	return &collectorpb.ExportTraceServiceResponse{}, nil
}

// Spans returns the spans received so far.
func (c *Collector) Spans() []Span {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Span(nil), c.spans...)
}

// Headers returns the gRPC metadata of every export received so far.
func (c *Collector) Headers() []metadata.MD {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]metadata.MD(nil), c.headers...)
}

// WaitFor waits until ok holds for the spans received, or timeout passes; it returns the spans
// and whether ok held.
func (c *Collector) WaitFor(timeout time.Duration, ok func([]Span) bool) ([]Span, bool) {
	deadline := time.After(timeout)
	for {
		c.mu.Lock()
		spans := append([]Span(nil), c.spans...)
		ch := c.changed
		c.mu.Unlock()
		if ok(spans) {
			return spans, true
		}
		select {
		case <-ch:
		case <-deadline:
			return spans, false
		}
	}
}
