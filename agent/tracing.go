package agent

import (
	"context"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/tracing"
)

// SetTracer makes tr (nil: tracing off) the tracer of the chains that start from now on, and
// returns the one it replaces.
func (e *Executor) SetTracer(tr *tracing.Tracer) *tracing.Tracer {
	return e.tracer.Swap(tr)
}

// chainTrace makes the policy spans of one chain, children of the kernel's agent-call span.
type chainTrace struct {
	tr  *tracing.Tracer
	ctx context.Context
	req *agentv1.PolicyRequest
}

// traceChain returns the chain's tracing, or nil when tracing is off or the kernel did not
// sample the call: then no span work is done for the chain.
func (e *Executor) traceChain(ctx context.Context, req *agentv1.PolicyRequest) *chainTrace {
	tr := e.tracer.Load()
	if tr == nil {
		return nil
	}
	pctx, sampled := tracing.Remote(ctx, req.GetTraceContext())
	if !sampled {
		return nil
	}
	return &chainTrace{tr: tr, ctx: pctx, req: req}
}

// policy starts the span of one policy; nil when the chain is not traced.
func (c *chainTrace) policy(name string) trace.Span {
	if c == nil {
		return nil
	}
	_, span := c.tr.Start(c.ctx, "policy "+name, trace.SpanKindInternal,
		attribute.String("policy", name),
		attribute.String("phase", c.req.GetPhase().String()),
		attribute.String("route", c.req.GetRouteName()),
		attribute.String("request_id", c.req.GetRequestId()),
	)
	return span
}

// endPolicySpan records a policy's outcome on its span and ends it.
func endPolicySpan(span trace.Span, status agentv1.StatusCode, err error) {
	if span == nil {
		return
	}
	span.SetAttributes(attribute.String("status", status.String()))
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}
