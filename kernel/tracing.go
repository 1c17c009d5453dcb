package kernel

import (
	"context"

	otelattr "go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/tracing"
)

// SetTracer makes tr (nil: tracing off) the tracer of the streams that start from now on, and
// returns the one it replaces; streams already open keep theirs.
func (s *Server) SetTracer(tr *tracing.Tracer) *tracing.Tracer {
	return s.tracer.Swap(tr)
}

// traceStream starts the stream's span, a child of the W3C trace context in the request
// headers when Envoy forwards one. Whether the stream is traced is decided here, once: an
// unsampled stream keeps no span and sends no trace context to the agent.
func (s *Server) traceStream(ctx context.Context, st *stream) {
	tr := s.tracer.Load()
	if tr == nil {
		return
	}
	attrs := []otelattr.KeyValue{otelattr.String("request_id", st.requestID)}
	if st.route != nil {
		attrs = append(attrs, otelattr.String("route", st.route.Name), otelattr.String("agent", st.route.agent.cfg.Name))
	}
	spanCtx, span := tr.StartRemote(ctx, st.reqCtx.GetHeaders(), "ext_proc stream", trace.SpanKindServer, attrs...)
	if span != nil { // sampled
		st.streamTrace = &streamTrace{span: span, spanCtx: spanCtx, tracer: tr}
	}
}

// endStreamSpan ends the stream's span with its outcome.
func endStreamSpan(st *stream) {
	if st.streamTrace == nil {
		return
	}
	if st.result != "" {
		st.span.SetAttributes(otelattr.String("outcome", st.result))
	}
	if st.result == statusError || st.result == statusInvalidRoute {
		st.span.SetStatus(codes.Error, st.result)
	}
	st.span.End()
}

// traceCall starts the span of an agent call under the stream's span and puts its trace
// context into the request; it returns nil when the stream is not traced.
func (st *stream) traceCall(req *agentv1.PolicyRequest, agent string) trace.Span {
	if st.streamTrace == nil {
		return nil
	}
	ctx, span := st.tracer.Start(st.spanCtx, "agent call", trace.SpanKindClient,
		otelattr.String("agent", agent), otelattr.String("phase", req.GetPhase().String()),
		otelattr.Int("policies", len(req.GetPolicies())))
	req.TraceContext = tracing.Inject(ctx)
	return span
}

// endCallSpan records an agent call's outcome on its span and ends it.
func endCallSpan(span trace.Span, resp *agentv1.PolicyResponse, err error) {
	if span == nil {
		return
	}
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
	} else {
		span.SetAttributes(otelattr.String("status", resp.GetStatus().GetCode().String()))
		if p := resp.GetStatus().GetPolicyName(); p != "" {
			span.SetAttributes(otelattr.String("policy", p))
		}
	}
	span.End()
}
