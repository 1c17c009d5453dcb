// Package tracing is the OpenTelemetry tracing of both processes (specification §7.3): spans
// exported over OTLP/gRPC, W3C trace context in and out.
//
// The kernel starts a span per ext_proc stream, a child of the traceparent Envoy forwards in
// the request headers when there is one, and a span per agent call whose context travels to the
// agent in PolicyRequest.trace_context; the agent starts a span per policy under it.
//
// Tracing costs nothing when it is off: the processes hold a nil *Tracer and test for it. When
// it is on, whether a stream is traced is decided once, when its span starts; an unsampled
// stream does no further span work and sends no trace context to the agent, so the agent, which
// only records spans under a sampled parent, does none either.
//
// The traceparent a request carries comes from the client unless Envoy replaces it, so by
// default its sampled flag is not obeyed and its trace id does not decide either (a ratio
// sampler keyed on the trace id takes every id whose low bits are zero, whatever the rate):
// the kernel draws at random at its own sampling_rate, and keeps the incoming trace id and span
// as the parent so that its spans still join the caller's trace. respect_parent_sampling hands
// the decision to the incoming flag, for deployments where Envoy sets it.
package tracing

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/credentials"

	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/obs"
	"github.com/policy-engine/policy-engine/internal/secrets"
)

// Config is the tracing section of both config files.
type Config struct {
	Enabled bool `yaml:"enabled"`
	// SamplingRate is the share of streams traced, from 0 to 1; nil means 1. The agent
	// follows the kernel's decision and has no rate of its own.
	SamplingRate *float64 `yaml:"sampling_rate"`
	// Endpoint is the OTLP/gRPC collector, host:port.
	Endpoint string `yaml:"endpoint"`
	// Insecure sends spans in plain text; nil means true (a collector next to the process).
	Insecure *bool `yaml:"insecure"`
	// Headers are gRPC metadata sent with every export; values may be secret references.
	Headers map[string]string `yaml:"headers"`
	// ServiceName is the service.name resource attribute.
	ServiceName string `yaml:"service_name"`
	// RespectParentSampling obeys the sampled flag of an incoming traceparent (kernel only):
	// a sampled parent is traced whatever the rate, one marked not sampled is not. Off, the
	// kernel samples every stream at SamplingRate by a random draw.
	RespectParentSampling bool `yaml:"respect_parent_sampling"`
}

// Rate returns the sampling rate in force.
func (c Config) Rate() float64 {
	if c.SamplingRate == nil {
		return 1
	}
	return *c.SamplingRate
}

// Tracer creates the spans of one process.
type Tracer struct {
	cfg      Config
	provider *sdktrace.TracerProvider
	tracer   trace.Tracer
}

// Role says how a process samples.
type Role int

const (
	// Root processes (the kernel) decide: a stream is sampled at the configured rate by a
	// random draw, or, with RespectParentSampling, as its remote parent says.
	Root Role = iota
	// Follower processes (the agent) record spans only under a sampled remote parent.
	Follower
)

// propagator reads and writes W3C traceparent and tracestate.
var propagator = propagation.TraceContext{}

// New returns a tracer that exports to cfg.Endpoint, or nil when tracing is off. Secret
// references in the headers are resolved here. onError receives export failures (which the
// OpenTelemetry SDK would otherwise print as plain text).
func New(cfg Config, role Role, service, version string, onError func(error)) (*Tracer, error) {
	if !cfg.Enabled {
		return nil, nil
	}
	if cfg.Endpoint == "" {
		return nil, errors.New("tracing: endpoint is required when tracing is enabled")
	}
	headers, err := secrets.OS.ResolveMap(cfg.Headers)
	if err != nil {
		return nil, fmt.Errorf("tracing headers: %w", err)
	}
	opts := []otlptracegrpc.Option{otlptracegrpc.WithEndpoint(cfg.Endpoint), otlptracegrpc.WithTimeout(5 * time.Second)}
	if cfg.Insecure == nil || *cfg.Insecure {
		opts = append(opts, otlptracegrpc.WithInsecure())
	} else {
		opts = append(opts, otlptracegrpc.WithTLSCredentials(credentials.NewClientTLSFromCert(nil, "")))
	}
	if len(headers) > 0 {
		opts = append(opts, otlptracegrpc.WithHeaders(headers))
	}
	// The client connects lazily: a collector that is down delays nothing but its spans.
	exp, err := otlptracegrpc.New(context.Background(), opts...)
	if err != nil {
		return nil, fmt.Errorf("tracing: OTLP exporter for %q: %w", cfg.Endpoint, err)
	}
	if cfg.ServiceName != "" {
		service = cfg.ServiceName
	}
	var sampler sdktrace.Sampler
	switch role {
	case Follower:
		sampler = sdktrace.ParentBased(sdktrace.NeverSample(),
			sdktrace.WithRemoteParentNotSampled(sdktrace.NeverSample()))
	default:
		sampler = rootSampler(cfg)
	}
	if onError != nil {
		otel.SetErrorHandler(otel.ErrorHandlerFunc(onError))
	}
	tp := sdktrace.NewTracerProvider(
		sdktrace.WithSampler(sampler),
		sdktrace.WithBatcher(exp, sdktrace.WithBatchTimeout(time.Second)),
		sdktrace.WithResource(resource.NewSchemaless(
			attribute.String("service.name", service),
			attribute.String("service.version", version),
		)),
	)
	return &Tracer{cfg: cfg, provider: tp, tracer: tp.Tracer("github.com/policy-engine/policy-engine")}, nil
}

// rootSampler is the kernel's sampler. Spans under a local parent (the agent calls under their
// stream) follow it.
func rootSampler(cfg Config) sdktrace.Sampler {
	draw := newDrawSampler(cfg.Rate())
	if cfg.RespectParentSampling {
		return sdktrace.ParentBased(draw,
			sdktrace.WithRemoteParentSampled(sdktrace.AlwaysSample()),
			sdktrace.WithRemoteParentNotSampled(sdktrace.NeverSample()))
	}
	return sdktrace.ParentBased(draw,
		sdktrace.WithRemoteParentSampled(draw),
		sdktrace.WithRemoteParentNotSampled(draw))
}

// drawSampler samples a span at a rate by a random draw, so that no trace id, which a client may
// choose, is sampled more often than another. The draw reads the runtime's per-thread random
// source: no lock, no allocation.
type drawSampler struct {
	all, none bool
	bound     uint64 // sampled when a uniform uint64 is below it
}

func newDrawSampler(rate float64) drawSampler {
	switch {
	case rate >= 1:
		return drawSampler{all: true}
	case rate <= 0:
		return drawSampler{none: true}
	}
	return drawSampler{bound: uint64(rate * (1 << 64))}
}

func (s drawSampler) ShouldSample(p sdktrace.SamplingParameters) sdktrace.SamplingResult {
	d := sdktrace.Drop
	if s.all || (!s.none && rand.Uint64() < s.bound) {
		d = sdktrace.RecordAndSample
	}
	return sdktrace.SamplingResult{Decision: d, Tracestate: trace.SpanContextFromContext(p.ParentContext).TraceState()}
}

func (s drawSampler) Description() string {
	switch {
	case s.all:
		return "Draw{1}"
	case s.none:
		return "Draw{0}"
	}
	return fmt.Sprintf("Draw{%g}", float64(s.bound)/(1<<64))
}

// Config returns the config the tracer was made from.
func (t *Tracer) Config() Config { return t.cfg }

// NewLogged is New with export errors written to log as warnings, at most one every ten
// seconds.
func NewLogged(cfg Config, role Role, service, version string, log *logging.Logger) (*Tracer, error) {
	th := logging.NewThrottle(10 * time.Second)
	return New(cfg, role, service, version, func(err error) {
		if th.Allow() {
			log.Warn().Err(err).Msg("trace export failed")
		}
	})
}

// Close exports the spans still buffered, waiting at most two seconds, and stops the
// exporter: for a tracer that is no longer used. It does nothing on a nil Tracer.
func (t *Tracer) Close() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = t.Shutdown(ctx)
}

// Shutdown exports the spans still buffered and stops the exporter.
func (t *Tracer) Shutdown(ctx context.Context) error {
	if t == nil {
		return nil
	}
	return t.provider.Shutdown(ctx)
}

// mapCarrier adapts a map of header-like values to the propagator.
type mapCarrier map[string]string

func (c mapCarrier) Get(k string) string { return c[k] }
func (c mapCarrier) Set(k, v string)     { c[k] = v }
func (c mapCarrier) Keys() []string {
	out := make([]string, 0, len(c))
	for k := range c {
		out = append(out, k)
	}
	return out
}

// StartRemote starts a span whose parent is the W3C trace context in carrier (request headers,
// or PolicyRequest.trace_context), a root span when there is none. It returns nil when the
// span is not sampled: the caller does no more span work for it.
func (t *Tracer) StartRemote(ctx context.Context, carrier map[string]string, name string, kind trace.SpanKind, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	if len(carrier) > 0 {
		ctx = propagator.Extract(ctx, mapCarrier(carrier))
	}
	ctx, span := t.tracer.Start(ctx, name, trace.WithSpanKind(kind), trace.WithAttributes(attrs...))
	if !span.SpanContext().IsSampled() {
		span.End()
		return ctx, nil
	}
	return ctx, span
}

// Remote returns ctx with the remote span of carrier's W3C trace context as parent, and
// whether that parent was sampled.
func Remote(ctx context.Context, carrier map[string]string) (context.Context, bool) {
	if len(carrier) == 0 {
		return ctx, false
	}
	ctx = propagator.Extract(ctx, mapCarrier(carrier))
	return ctx, trace.SpanContextFromContext(ctx).IsSampled()
}

// Start starts a child span of the span in ctx.
func (t *Tracer) Start(ctx context.Context, name string, kind trace.SpanKind, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	return t.tracer.Start(ctx, name, trace.WithSpanKind(kind), trace.WithAttributes(attrs...))
}

// Inject returns the W3C trace context of the span in ctx, for PolicyRequest.trace_context.
func Inject(ctx context.Context) map[string]string {
	c := mapCarrier{}
	propagator.Inject(ctx, c)
	return c
}

// Redacted is the config for a config dump (/config): header values redacted unless they are
// secret references, which stay unresolved.
func (c Config) Redacted() map[string]any {
	headers := map[string]any{}
	for name, v := range c.Headers {
		headers[name] = obs.RedactValue(true, v)
	}
	return map[string]any{"enabled": c.Enabled, "endpoint": obs.RedactValue(false, c.Endpoint), "sampling_rate": c.Rate(),
		"insecure": c.Insecure == nil || *c.Insecure, "headers": headers, "service_name": c.ServiceName}
}
