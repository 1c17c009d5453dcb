package kernel

import (
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
	"unsafe"

	"github.com/VictoriaMetrics/metrics"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"go.opentelemetry.io/otel/trace"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/tracing"
)

// attributesKey is the map key under which Envoy sends the attributes of the ext_proc filter.
const attributesKey = "envoy.filters.http.ext_proc"

// Server is the ext_proc server.
type Server struct {
	extprocv3.UnimplementedExternalProcessorServer

	snap    atomic.Pointer[Snapshot]
	log     *logging.Logger
	metrics *kernelMetrics
	streams atomic.Int64
	// draining makes new streams fail fast once the drain delay has passed.
	draining atomic.Bool
	// tracer is nil while tracing is off.
	tracer atomic.Pointer[tracing.Tracer]

	// One throttle per kind of failure, so that a failure a client can cause at will (a
	// policy error, a broken stream) cannot keep the others out of the log.
	protocolLog, agentLog, replyLog, policyLog, invalidLog, bodyLog *logging.Throttle
	// wake asks the health loop to check the agents now: a request met a route that is not
	// checked against its agent yet.
	wake chan time.Time
	// skipHook is told of each chain the kernel skipped by its when conditions (policyctl
	// explain); nil: nothing is told.
	skipHook func(route string, phase agentv1.PolicyPhase)
}

// NewServer returns a server with no snapshot; Store gives it one.
func NewServer(log *logging.Logger, m *kernelMetrics) *Server {
	m.defaults.log.Store(log)
	return &Server{
		log:         log,
		metrics:     m,
		protocolLog: logging.NewThrottle(5 * time.Second),
		agentLog:    logging.NewThrottle(5 * time.Second),
		replyLog:    logging.NewThrottle(5 * time.Second),
		policyLog:   logging.NewThrottle(5 * time.Second),
		invalidLog:  logging.NewThrottle(5 * time.Second),
		bodyLog:     logging.NewThrottle(5 * time.Second),
		wake:        make(chan time.Time, 1),
	}
}

// Store swaps in a new snapshot. Streams already open keep the one they started with.
func (s *Server) Store(snap *Snapshot) {
	// A snapshot rebuilt from the same config (an agent came back, or learned another policy
	// set) keeps the time that config was loaded.
	if snap != nil {
		snap.ConfigLoaded = snap.Loaded
		if prev := s.snap.Load(); prev != nil && prev.Version == snap.Version && !prev.ConfigLoaded.IsZero() {
			snap.ConfigLoaded = prev.ConfigLoaded
		}
	}
	s.snap.Store(snap)
}

// Snapshot returns the current snapshot.
func (s *Server) Snapshot() *Snapshot { return s.snap.Load() }

// stream is the per-stream state: one HTTP request's exchange.
type stream struct {
	snap      *Snapshot
	route     *Route
	seen      uint8 // bit set of the message kinds received
	reqCtx    *agentv1.RequestContext
	requestID string
	state     map[string]string
	// awaitReqBody and awaitRespBody say that a chain waits for the body of its phase.
	awaitReqBody, awaitRespBody bool
	// cfgReqBody and cfgRespBody are the body modes of Envoy's filter config, from the
	// protocol_config of the first message.
	cfgReqBody, cfgRespBody filterv3.ProcessingMode_BodySendMode
	// *streamBody is what the stream keeps for the bodies its chains read: nil until a chain
	// waits for a body or a body arrives (st.bodies()), then kept with the pooled stream. A
	// stream that only carries headers, as most do while they wait for their upstream, has
	// none unless its pooled stream had one.
	*streamBody
	// *streamTrace is the stream's span and what it records: nil unless the stream is
	// traced (tracing on and the stream sampled).
	*streamTrace
	ps extprocv3.ExternalProcessor_ProcessServer
	// part is the part of the chain that runChain sends: partAll, partEarly or partLate.
	part        uint8
	respStatus  int32
	respHeaders map[string]string
	// phase is the phase whose chain runs, for counting its outcome.
	phase agentv1.PolicyPhase

	// respBuf outlives a pooled stream's reset, so that its map is reused.
	respBuf map[string]string

	// explain collects the agent's entry traces of a request played through /debug/explain;
	// nil for Envoy's streams, which pay one nil check per agent call for it.
	explain *explainTrace
}

// streamBody is a stream's state for the bodies its chains read.
type streamBody struct {
	// reqStreamed and respStreamed say that the awaited body comes in STREAMED chunks: they are
	// gathered in bodyBuf and their replies held (held counts them) until the last one, so that
	// Envoy forwards none before the chain has judged the whole body.
	reqStreamed, respStreamed bool
	// judged says, by phase (0 request, 1 response), that a chain has run on that whole body.
	judged  [2]bool
	bodyBuf []byte
	held    int
	// pending are the held replies released by the last message's answer, sent before it.
	pending []*extprocv3.ProcessingResponse
	// guard refuses the exchange when held chunks wait too long; nil until a chunk is held.
	guard    *holdGuard
	respBody []byte
}

// bodies returns the stream's body state, made on first use.
func (st *stream) bodies() *streamBody {
	if st.streamBody == nil {
		st.streamBody = new(streamBody)
	}
	return st.streamBody
}

// responseBody is the response body the chain reads, if any.
func (st *stream) responseBody() []byte {
	if st.streamBody == nil {
		return nil
	}
	return st.respBody
}

// streamTrace is a traced stream's span.
type streamTrace struct {
	span    trace.Span
	spanCtx context.Context
	tracer  *tracing.Tracer
	// result is the outcome of the last phase, for the span.
	result string
}

// setResult records the outcome of the phase for the stream's span, if it is traced.
func (st *stream) setResult(status string) {
	if st.streamTrace != nil {
		st.result = status
	}
}

// agentCall is the agent request of a phase being run, pooled (agentCalls) and held only
// during the call.
type agentCall struct {
	req  agentv1.PolicyRequest
	resp agentv1.ResponseContext
}

var agentCalls = sync.Pool{New: func() any { return new(agentCall) }}

// maxPooledHeaders caps the header maps a pooled stream keeps: a map grown by an unusual
// request is dropped rather than kept alive in the pool.
const maxPooledHeaders = 64

// maxPooledBody caps the streamed-body buffer a pooled stream keeps.
const maxPooledBody = 64 << 10

const (
	seenRequestHeaders uint8 = 1 << iota
	seenResponseHeaders
)

var streamPool = sync.Pool{New: func() any { return new(stream) }}

func getStream(snap *Snapshot) *stream {
	st := streamPool.Get().(*stream)
	st.snap = snap
	return st
}

// putStream clears every reference before pooling, so a pooled stream keeps nothing alive but
// its own emptied maps.
func putStream(st *stream) {
	st.reset()
	streamPool.Put(st)
}

func (st *stream) reset() {
	if st.reqCtx != nil {
		putRequestContext(st.reqCtx)
	}
	rh, body := st.respBuf, st.streamBody
	*st = stream{}
	if body != nil {
		buf := body.bodyBuf
		*body = streamBody{}
		if cap(buf) <= maxPooledBody {
			body.bodyBuf = buf[:0]
		}
		st.streamBody = body
	}
	if rh != nil && len(rh) <= maxPooledHeaders {
		clear(rh)
		st.respBuf = rh
	}
}

// requestContexts are emptied request contexts with their header maps. They are pooled apart
// from streams, so that a stream waiting for its upstream's response does not hold one when
// its response chain does not read the request.
var requestContexts = sync.Pool{New: func() any {
	return &agentv1.RequestContext{Headers: make(map[string]string, 16)}
}}

// getRequestContext returns an emptied request context.
func getRequestContext() *agentv1.RequestContext {
	return requestContexts.Get().(*agentv1.RequestContext)
}

// putRequestContext empties rc and pools it; a map grown by an unusual request is dropped.
func putRequestContext(rc *agentv1.RequestContext) {
	if len(rc.Headers) > maxPooledHeaders {
		return
	}
	h := rc.Headers
	clear(h)
	*rc = agentv1.RequestContext{Headers: h}
	requestContexts.Put(rc)
}

// requestDone lets go of the request context once the request phase is over, unless the
// response chain reads it: a stream held open while the upstream answers then keeps neither
// the header map nor the received message its values point into; nor the state, when no
// response chain will be sent it.
func (st *stream) requestDone() {
	r := st.route
	if r != nil && (r.response.empty() || r.response.static != nil) {
		// No response chain, or one whose answer does not depend on the state: the state set
		// in the request phase is not sent again.
		st.state = nil
	}
	if st.reqCtx == nil || r == nil || !(r.response.empty() || r.response.noRequest || r.response.static != nil) {
		return
	}
	st.requestID = strings.Clone(st.requestID)
	putRequestContext(st.reqCtx)
	st.reqCtx = nil
}

// responseHeaders returns the stream's emptied response header map, made on first use.
func (st *stream) responseHeaders(n int) map[string]string {
	if st.respBuf == nil {
		st.respBuf = make(map[string]string, max(n, 8))
	}
	return st.respBuf
}

// Process serves one ext_proc stream: one HTTP request's exchange.
func (s *Server) Process(ps extprocv3.ExternalProcessor_ProcessServer) error {
	return s.process(ps, nil)
}

// process serves one stream; x, when not nil, collects the agent's entry traces of an
// explained request (the admin listener's /debug/explain).
func (s *Server) process(ps extprocv3.ExternalProcessor_ProcessServer, x *explainTrace) error {
	snap := s.snap.Load()
	if snap == nil || s.draining.Load() {
		return status.Error(codes.Unavailable, "policy-kernel is not serving")
	}
	s.streams.Add(1)
	defer s.streams.Add(-1)
	ctx := ps.Context()
	st := getStream(snap)
	st.explain = x
	defer putStream(st)
	defer endStreamSpan(st)
	defer s.streamEnded(st)
	st.ps = ps
	for {
		req, err := ps.Recv()
		if err != nil {
			// Envoy ends every stream by cancelling it; that and a half-close are the
			// normal ends of a stream.
			if errors.Is(err, io.EOF) || status.Code(err) == codes.Canceled || errors.Is(err, context.Canceled) {
				return nil
			}
			return err
		}
		if st.streamBody != nil && st.guard != nil && !st.guard.disarm() {
			continue // the kernel has refused the exchange; Envoy ends the stream
		}
		resp, err := s.handle(ctx, st, req)
		if err != nil {
			s.metrics.protocolErrors.Inc()
			if s.protocolLog.Allow() {
				s.log.Warn().Str("error", err.Error()).Str("request_id", st.requestID).Msg("ext_proc protocol error")
			}
			return err
		}
		if resp == nil {
			continue // a streamed chunk whose reply is held until the chain has decided
		}
		if st.streamBody != nil {
			for i, r := range st.pending {
				st.pending[i] = nil
				if err := ps.Send(r); err != nil {
					return nil
				}
			}
			st.pending = st.pending[:0]
		}
		if err := ps.Send(resp); err != nil {
			return nil // the stream is gone; Envoy has given up on it
		}
	}
}

// streamEnded counts a body that a chain still waited for when the stream ended: the exchange
// went on without the chain (Envoy sent no body, or the client went away first).
func (s *Server) streamEnded(st *stream) {
	what := "the stream ended"
	if st.streamBody != nil && st.guard != nil && st.guard.close() {
		what = "the message timeout passed with chunks held"
	}
	if st.awaitReqBody {
		s.bodyMissing(st, agentv1.PolicyPhase_REQUEST, what)
	}
	if st.awaitRespBody {
		s.bodyMissing(st, agentv1.PolicyPhase_RESPONSE, what)
	}
}

// holdGuard refuses an exchange whose streamed chunks are held and whose body's end does not
// come in time: Envoy would answer 504 when its message timeout passes (or let the body through
// with failure_mode_allow), and it holds the trailers of a streamed body until every chunk is
// answered, so the end of such a body never comes. It lives apart from the pooled stream,
// which its timer must never touch; the stream's goroutine disarms it before it handles a
// message, so that only one of them ever sends.
type holdGuard struct {
	mu       sync.Mutex
	ps       extprocv3.ExternalProcessor_ProcessServer
	timer    *time.Timer
	deadline time.Time
	armed    bool
	fired    bool
	closed   bool
	phase    agentv1.PolicyPhase
	refusal  *extprocv3.ProcessingResponse
	// refused counts the refusal as the phase's outcome.
	refused *metrics.Counter
}

// arm (re)starts the guard for a held chunk of a phase: it refuses the exchange a little before
// Envoy's message timeout, counted from the chunk as Envoy's timer is, unless a message comes
// first.
func (st *stream) arm(phase agentv1.PolicyPhase) {
	budget := time.Duration(st.snap.Config.Server.MessageTimeoutMS) * time.Millisecond * 9 / 10
	st.bodies()
	g := st.guard
	if g == nil {
		g = &holdGuard{ps: st.ps}
		st.guard = g
	}
	g.mu.Lock()
	if g.refusal == nil || g.phase != phase {
		g.phase = phase
		g.refusal = immediateReply(denial(st.snap.Config.Server.StatusOnError, "request_body_incomplete", "the end of the request body did not come within the message timeout"))
		g.refused = st.route.metrics.requests[statusError]
		if phase == agentv1.PolicyPhase_RESPONSE {
			g.refusal = immediateReply(denial(500, "response_body_incomplete", "the end of the response body did not come within the message timeout"))
			g.refused = st.route.metrics.responses[statusError]
		}
	}
	g.armed, g.deadline = true, time.Now().Add(budget)
	if g.timer == nil {
		g.timer = time.AfterFunc(budget, g.fire)
	} else {
		g.timer.Reset(budget)
	}
	g.mu.Unlock()
}

// disarm stops the guard before a message is handled; false means it has already refused.
func (g *holdGuard) disarm() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.armed = false
	return !g.fired
}

// close stops the guard for good and reports whether it refused.
func (g *holdGuard) close() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.closed = true
	if g.timer != nil {
		g.timer.Stop()
	}
	return g.fired
}

func (g *holdGuard) fire() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.armed || g.fired || g.closed {
		return
	}
	if d := time.Until(g.deadline); d > 0 {
		g.timer.Reset(d) // re-armed after this run was scheduled
		return
	}
	g.fired = true
	g.refused.Inc()
	_ = g.ps.Send(g.refusal)
}

// bodyMissing counts and logs (throttled) a body that a chain needed and did not get.
func (s *Server) bodyMissing(st *stream, phase agentv1.PolicyPhase, what string) {
	i := 0
	if phase == agentv1.PolicyPhase_RESPONSE {
		i = 1
		st.awaitRespBody = false
	} else {
		st.awaitReqBody = false
	}
	st.route.metrics.bodyMissing[i].Inc()
	if s.bodyLog.Allow() {
		s.log.Error().Str("route", st.route.Name).Str("request_id", st.requestID).Str("phase", strings.ToLower(phase.String())).
			Str("body_mode", filterv3.ProcessingMode_BodySendMode_name[int32(st.cfgBody(phase))]).
			Msg(what + " before the body that the chain reads: Envoy must allow mode overrides or buffer the body (see the README)")
	}
}

// cfgBody returns the body mode of Envoy's filter config for a phase.
func (st *stream) cfgBody(phase agentv1.PolicyPhase) filterv3.ProcessingMode_BodySendMode {
	if phase == agentv1.PolicyPhase_RESPONSE {
		return st.cfgRespBody
	}
	return st.cfgReqBody
}

func (s *Server) handle(ctx context.Context, st *stream, req *extprocv3.ProcessingRequest) (*extprocv3.ProcessingResponse, error) {
	switch v := req.GetRequest().(type) {
	case *extprocv3.ProcessingRequest_RequestHeaders:
		resp, err := s.onRequestHeaders(ctx, st, req, v.RequestHeaders)
		if !st.awaitReqBody {
			st.requestDone()
		}
		return resp, err
	case *extprocv3.ProcessingRequest_RequestBody:
		resp, err := s.onRequestBody(ctx, st, v.RequestBody)
		if !st.awaitReqBody {
			st.requestDone()
		}
		return resp, err
	case *extprocv3.ProcessingRequest_RequestTrailers:
		if st.awaitReqBody {
			resp := s.onTrailersAwaitingBody(ctx, st, agentv1.PolicyPhase_REQUEST)
			st.requestDone()
			return resp, nil
		}
		return trailersReply(agentv1.PolicyPhase_REQUEST), nil
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		if st.awaitReqBody {
			// The request went upstream while its chain waited for the body: it was never
			// judged, and its response must not reach the client.
			return s.bodyNotReceived(st, agentv1.PolicyPhase_REQUEST), nil
		}
		return s.onResponseHeaders(ctx, st, v.ResponseHeaders)
	case *extprocv3.ProcessingRequest_ResponseBody:
		return s.onResponseBody(ctx, st, v.ResponseBody)
	case *extprocv3.ProcessingRequest_ResponseTrailers:
		if st.awaitRespBody {
			return s.onTrailersAwaitingBody(ctx, st, agentv1.PolicyPhase_RESPONSE), nil
		}
		return trailersReply(agentv1.PolicyPhase_RESPONSE), nil
	default:
		return nil, status.Errorf(codes.InvalidArgument, "processing request holds no known message (%T)", v)
	}
}

// requestHeadersReplyAlloc and responseHeadersReplyAlloc hold a reply and its parts, so that
// the reply to a headers message is one allocation instead of three.
type requestHeadersReplyAlloc struct {
	resp  extprocv3.ProcessingResponse
	oneof extprocv3.ProcessingResponse_RequestHeaders
	h     extprocv3.HeadersResponse
}

type responseHeadersReplyAlloc struct {
	resp  extprocv3.ProcessingResponse
	oneof extprocv3.ProcessingResponse_ResponseHeaders
	h     extprocv3.HeadersResponse
}

func requestHeadersReply(c *extprocv3.CommonResponse, mode *filterv3.ProcessingMode) *extprocv3.ProcessingResponse {
	a := &requestHeadersReplyAlloc{}
	a.h.Response = c
	a.oneof.RequestHeaders = &a.h
	a.resp.Response = &a.oneof
	a.resp.ModeOverride = mode
	return &a.resp
}

func responseHeadersReply(c *extprocv3.CommonResponse) *extprocv3.ProcessingResponse {
	a := &responseHeadersReplyAlloc{}
	a.h.Response = c
	a.oneof.ResponseHeaders = &a.h
	a.resp.Response = &a.oneof
	return &a.resp
}

func requestBodyReply(c *extprocv3.CommonResponse) *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{Response: c}}}
}

func responseBodyReply(c *extprocv3.CommonResponse) *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{ResponseBody: &extprocv3.BodyResponse{Response: c}}}
}

func trailersReply(phase agentv1.PolicyPhase) *extprocv3.ProcessingResponse {
	if phase == agentv1.PolicyPhase_RESPONSE {
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseTrailers{ResponseTrailers: &extprocv3.TrailersResponse{}}}
	}
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestTrailers{RequestTrailers: &extprocv3.TrailersResponse{}}}
}

func immediateReply(ir *extprocv3.ImmediateResponse) *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{ImmediateResponse: ir}}
}

// attributes returns the ext_proc filter's attributes of a message.
func attribute(req *extprocv3.ProcessingRequest, name string) string {
	a := req.GetAttributes()[attributesKey]
	if a == nil {
		return ""
	}
	return a.GetFields()[name].GetStringValue()
}

func (s *Server) onRequestHeaders(ctx context.Context, st *stream, req *extprocv3.ProcessingRequest, h *extprocv3.HttpHeaders) (*extprocv3.ProcessingResponse, error) {
	if st.seen&seenRequestHeaders != 0 {
		return nil, status.Error(codes.InvalidArgument, "request_headers received twice on one stream")
	}
	st.seen |= seenRequestHeaders
	if pc := req.GetProtocolConfig(); pc != nil {
		st.cfgReqBody, st.cfgRespBody = pc.GetRequestBodyMode(), pc.GetResponseBodyMode()
	}
	start := time.Now()
	rc := getRequestContext()
	fillRequestContext(rc, h)
	rc.ClientIp = clientIP(attribute(req, "source.address"))
	st.reqCtx = rc
	st.requestID = rc.Headers["x-request-id"]
	routeName := attribute(req, "xds.route_name")
	route := st.snap.route(routeName, rc.Path)
	st.route = route
	s.logRoute(st, routeName, route)
	s.traceStream(ctx, st)
	if route == nil {
		s.metrics.noRoute.Inc()
		return requestHeadersReply(nil, skipResponseMode), nil
	}
	if route.invalid != "" {
		return s.refuseRoute(st, route), nil
	}
	if unsupportedBodyMode(st.cfgReqBody, route.request.body) || unsupportedBodyMode(st.cfgRespBody, route.response.body) {
		// The kernel cannot hold a FULL_DUPLEX_STREAMED body, and Envoy ignores overrides then.
		route.metrics.requests[statusError].Inc()
		st.setResult(statusError)
		if s.bodyLog.Allow() {
			s.log.Error().Str("route", route.Name).Str("request_id", st.requestID).Msg("request denied: the route's chain reads a body that Envoy's filter config sends FULL_DUPLEX_STREAMED")
		}
		return immediateReply(denial(st.snap.Config.Server.StatusOnError, "unsupported_body_mode", "the route's policies read a body that Envoy cannot hold for them")), nil
	}
	mode := route.modeFor(st.cfgReqBody, st.cfgRespBody)
	if route.request.empty() {
		route.metrics.requests[statusAllow].Inc()
		return requestHeadersReply(nil, mode), nil
	}
	if route.request.kernelConds {
		st.phase = agentv1.PolicyPhase_REQUEST
		if s.skipByConditions(st, &route.request) {
			// No entry runs: the body the chain would read is not asked for either.
			st.outcome(statusAllow)
			return requestHeadersReply(nil, route.skipMode(st.cfgReqBody, st.cfgRespBody)), nil
		}
	}
	if route.request.body && !h.GetEndOfStream() {
		st.bodies()
		st.awaitReqBody = true
		if st.cfgReqBody != filterv3.ProcessingMode_STREAMED || len(route.request.early) == 0 {
			st.reqStreamed = st.cfgReqBody == filterv3.ProcessingMode_STREAMED
			return requestHeadersReply(nil, mode), nil
		}
		// Streamed: the headers go upstream on this reply, before the body, so the entries
		// before the first one that reads the body run now, while their header changes can
		// still be made.
		st.reqStreamed = true
		st.part = partEarly
		resp := s.runChain(ctx, st, agentv1.PolicyPhase_REQUEST, start, false)
		st.part = partLate
		if resp.immediate != nil {
			st.awaitReqBody = false
			return immediateReply(resp.immediate), nil
		}
		st.seeEarly(resp.common.GetHeaderMutation(), agentv1.PolicyPhase_REQUEST)
		return requestHeadersReply(resp.common, mode), nil
	}
	resp := s.runChain(ctx, st, agentv1.PolicyPhase_REQUEST, start, false)
	if resp.immediate != nil {
		return immediateReply(resp.immediate), nil
	}
	return requestHeadersReply(resp.common, mode), nil
}

// refuseRoute answers a request on a route that cannot serve: invalid, or not checked against
// its agent yet, whatever the agent's fail_open says, since the kernel does not know that the
// agent has the route's policies nor which bodies they read.
func (s *Server) refuseRoute(st *stream, route *Route) *extprocv3.ProcessingResponse {
	route.metrics.requests[statusInvalidRoute].Inc()
	st.setResult(statusInvalidRoute)
	msg := "the route's policy chain is invalid"
	if route.refuseCode == codeNotValidated {
		msg = "the route's policy chain is not checked against its policy agent yet"
		select {
		case s.wake <- time.Now():
		default:
		}
	}
	if s.invalidLog.Allow() {
		s.log.Error().Str("route", route.Name).Str("request_id", st.requestID).Str("error", route.invalid).Msg("request on an invalid route denied")
	}
	return immediateReply(denial(st.snap.Config.Server.StatusOnError, route.refuseCode, msg))
}

func (s *Server) onRequestBody(ctx context.Context, st *stream, b *extprocv3.HttpBody) (*extprocv3.ProcessingResponse, error) {
	if st.seen&seenRequestHeaders == 0 {
		return nil, status.Error(codes.InvalidArgument, "request_body received before request_headers")
	}
	st.bodies()
	if !st.awaitReqBody {
		if st.judged[0] {
			return s.bodyStreamed(st, agentv1.PolicyPhase_REQUEST), nil
		}
		return requestBodyReply(nil), nil
	}
	if st.reqStreamed {
		return s.onStreamedBody(ctx, st, agentv1.PolicyPhase_REQUEST, b), nil
	}
	start := time.Now()
	st.awaitReqBody = false
	if len(b.GetBody()) > st.snap.Config.Server.MaxBodySizeBytes {
		return immediateReply(denial(413, "payload_too_large", "the request body exceeds the size limit")), nil
	}
	st.reqCtx.Body = b.GetBody()
	st.judged[0] = true
	resp := s.runChain(ctx, st, agentv1.PolicyPhase_REQUEST, start, true)
	st.reqCtx.Body = nil // the response phase does not need it
	if resp.immediate != nil {
		return immediateReply(resp.immediate), nil
	}
	return requestBodyReply(resp.common), nil
}

func (s *Server) onResponseHeaders(ctx context.Context, st *stream, h *extprocv3.HttpHeaders) (*extprocv3.ProcessingResponse, error) {
	if st.seen&seenResponseHeaders != 0 {
		return nil, status.Error(codes.InvalidArgument, "response_headers received twice on one stream")
	}
	st.seen |= seenResponseHeaders
	st.part = partAll
	route := st.route
	if route == nil || route.invalid != "" || route.response.empty() {
		return responseHeadersReply(nil), nil
	}
	start := time.Now()
	if route.response.static != nil && route.agent.healthy.Load() {
		// The chain's answer does not depend on the response: its headers are not read.
		resp := s.runChain(ctx, st, agentv1.PolicyPhase_RESPONSE, start, false)
		if resp.immediate != nil {
			return immediateReply(resp.immediate), nil
		}
		return responseHeadersReply(resp.common), nil
	}
	st.respHeaders = st.responseHeaders(len(h.GetHeaders().GetHeaders()))
	var rep map[string][]string
	for _, hv := range h.GetHeaders().GetHeaders() {
		v := headerValue(hv.GetRawValue(), hv.GetValue())
		if hv.GetKey() == ":status" {
			n, _ := strconv.Atoi(v)
			st.respStatus = int32(n)
			continue
		}
		addHeader(st.respHeaders, &rep, hv.GetKey(), v)
	}
	joinRepeated(st.respHeaders, rep)
	if route.response.kernelConds {
		st.phase = agentv1.PolicyPhase_RESPONSE
		if s.skipByConditions(st, &route.response) {
			// The response body the chain would read is not awaited: one that Envoy sends
			// anyway (a mode override it did not honour) gets an empty reply.
			st.outcome(statusAllow)
			return responseHeadersReply(nil), nil
		}
	}
	if route.response.body && !h.GetEndOfStream() {
		st.bodies()
		st.awaitRespBody = true
		st.respStreamed = st.cfgRespBody == filterv3.ProcessingMode_STREAMED
		if st.cfgRespBody == filterv3.ProcessingMode_BUFFERED {
			// Envoy holds the headers until the whole body's reply: the chain runs on it.
			return responseHeadersReply(nil), nil
		}
		// Envoy may send no body (a mode override it did not honour) or send the headers on
		// before it (STREAMED): the entries that do not read the body run now, the others on
		// the body.
		if len(route.response.early) == 0 {
			st.part = partLate
			return responseHeadersReply(nil), nil
		}
		st.part = partEarly
		resp := s.runChain(ctx, st, agentv1.PolicyPhase_RESPONSE, start, false)
		st.part = partLate
		if resp.immediate != nil {
			st.awaitRespBody = false
			return immediateReply(resp.immediate), nil
		}
		st.seeEarly(resp.common.GetHeaderMutation(), agentv1.PolicyPhase_RESPONSE)
		return responseHeadersReply(resp.common), nil
	}
	resp := s.runChain(ctx, st, agentv1.PolicyPhase_RESPONSE, start, false)
	if resp.immediate != nil {
		return immediateReply(resp.immediate), nil
	}
	return responseHeadersReply(resp.common), nil
}

func (s *Server) onResponseBody(ctx context.Context, st *stream, b *extprocv3.HttpBody) (*extprocv3.ProcessingResponse, error) {
	st.bodies()
	if !st.awaitRespBody {
		if st.judged[1] {
			return s.bodyStreamed(st, agentv1.PolicyPhase_RESPONSE), nil
		}
		return responseBodyReply(nil), nil
	}
	if st.respStreamed {
		return s.onStreamedBody(ctx, st, agentv1.PolicyPhase_RESPONSE, b), nil
	}
	start := time.Now()
	st.awaitRespBody = false
	if len(b.GetBody()) > st.snap.Config.Server.MaxBodySizeBytes {
		return immediateReply(denial(500, "response_too_large", "the response body exceeds the size limit")), nil
	}
	st.respBody = b.GetBody()
	st.judged[1] = true
	resp := s.runChain(ctx, st, agentv1.PolicyPhase_RESPONSE, start, true)
	if resp.immediate != nil {
		return immediateReply(resp.immediate), nil
	}
	return responseBodyReply(resp.common), nil
}

// seeEarly applies the header changes of a chain's early part to the headers that its late
// part will be sent, as the agent does between the entries of one run, so that splitting a
// chain changes nothing its entries see. The values are copied: they point into the agent's
// reply, which the stream must not keep alive until the body comes.
func (st *stream) seeEarly(hm *extprocv3.HeaderMutation, phase agentv1.PolicyPhase) {
	h := st.respHeaders
	if phase == agentv1.PolicyPhase_REQUEST {
		h = st.reqCtx.Headers
	}
	for _, k := range hm.GetRemoveHeaders() {
		delete(h, k)
	}
	for _, o := range hm.GetSetHeaders() {
		k, v := o.GetHeader().GetKey(), string(o.GetHeader().GetRawValue())
		switch {
		case k == ":path" && phase == agentv1.PolicyPhase_REQUEST:
			st.reqCtx.Path = v
			continue
		case k == ":status" && phase == agentv1.PolicyPhase_RESPONSE:
			n, _ := strconv.Atoi(v)
			st.respStatus = int32(n)
			continue
		}
		if old, ok := h[k]; ok && o.GetAppend().GetValue() {
			v = old + ", " + v
		}
		h[strings.Clone(k)] = v
	}
}

// bodyStreamed refuses a second body message after a chain has judged a body that Envoy's
// protocol_config did not say was streamed: Envoy sends a buffered body in one message, so the
// chain judged the first chunk of a streamed one, and the rest must not follow it unjudged.
func (s *Server) bodyStreamed(st *stream, phase agentv1.PolicyPhase) *extprocv3.ProcessingResponse {
	st.phase = phase
	st.outcome(statusError)
	if s.bodyLog.Allow() {
		s.log.Error().Str("route", st.route.Name).Str("request_id", st.requestID).Str("phase", strings.ToLower(phase.String())).
			Msg("denied: a body came in chunks although Envoy's protocol_config did not say it was streamed")
	}
	code := st.snap.Config.Server.StatusOnError
	if phase == agentv1.PolicyPhase_RESPONSE {
		code = 500
	}
	return immediateReply(denial(code, "body_not_judged_whole", "the body came in chunks that the policies could not judge together"))
}

// unsupportedBodyMode reports whether Envoy's body mode leaves a chain that reads the body
// unable to judge it: FULL_DUPLEX_STREAMED, which the kernel does not speak and which Envoy does
// not let a mode override change.
func unsupportedBodyMode(m filterv3.ProcessingMode_BodySendMode, readsBody bool) bool {
	return readsBody && m == filterv3.ProcessingMode_FULL_DUPLEX_STREAMED
}

// bodyNotReceived refuses an exchange whose chain waited for a body that Envoy did not send:
// the request with status_on_error, the response with 500.
func (s *Server) bodyNotReceived(st *stream, phase agentv1.PolicyPhase) *extprocv3.ProcessingResponse {
	s.bodyMissing(st, phase, "a "+strings.ToLower(phase.String())+" message other than the body arrived")
	st.bodies()
	st.phase = phase
	st.outcome(statusError)
	st.held = 0
	if phase == agentv1.PolicyPhase_RESPONSE {
		return immediateReply(denial(500, "response_body_not_received", "the response body that the route's policies read was not received"))
	}
	return immediateReply(denial(st.snap.Config.Server.StatusOnError, "request_body_not_received", "the request body that the route's policies read was not received"))
}

// onTrailersAwaitingBody answers trailers that arrive while a chain waits for the body. When
// Envoy surely buffers or streams that body, the trailers mean the body is complete (streamed)
// or empty (buffered: Envoy sends a buffered body before the trailers), and the chain runs on
// it while the message is still held. Otherwise Envoy may have sent the body on without
// showing it (a mode override it did not honour): refused.
func (s *Server) onTrailersAwaitingBody(ctx context.Context, st *stream, phase agentv1.PolicyPhase) *extprocv3.ProcessingResponse {
	st.bodies()
	streamed := st.reqStreamed
	if phase == agentv1.PolicyPhase_RESPONSE {
		streamed = st.respStreamed
	}
	if st.held > 0 || !streamed && st.cfgBody(phase) != filterv3.ProcessingMode_BUFFERED {
		return s.bodyNotReceived(st, phase)
	}
	start := time.Now()
	resp := s.runOnBody(ctx, st, phase, start, st.bodyBuf, false)
	st.bodyBuf = st.bodyBuf[:0]
	if resp.immediate != nil {
		return immediateReply(resp.immediate)
	}
	if r := s.headersSent(st, resp.common); r != nil {
		return r
	}
	return trailersReply(phase)
}

// runOnBody runs the chain (or its late part) of a phase on a whole body.
func (s *Server) runOnBody(ctx context.Context, st *stream, phase agentv1.PolicyPhase, start time.Time, body []byte, inBody bool) chainResult {
	if phase == agentv1.PolicyPhase_RESPONSE {
		st.awaitRespBody = false
		st.respBody = body
		return s.runChain(ctx, st, phase, start, inBody)
	}
	st.awaitReqBody = false
	st.reqCtx.Body = body
	resp := s.runChain(ctx, st, phase, start, inBody)
	st.reqCtx.Body = nil
	return resp
}

// headersSent refuses a chain's answer that changes headers Envoy has already sent on (a
// streamed body) or that a trailers reply cannot change: forwarding the message without the
// change would forward one the chain did not approve. Removing content-length is no change
// there, as Envoy already removed it for a streamed body.
func (s *Server) headersSent(st *stream, c *extprocv3.CommonResponse) *extprocv3.ProcessingResponse {
	hm := c.GetHeaderMutation()
	if len(hm.GetSetHeaders()) == 0 && (len(hm.GetRemoveHeaders()) == 0 || len(hm.GetRemoveHeaders()) == 1 && hm.GetRemoveHeaders()[0] == "content-length") {
		return nil
	}
	st.outcome(statusError)
	if s.bodyLog.Allow() {
		s.log.Error().Str("route", st.route.Name).Str("request_id", st.requestID).Str("phase", strings.ToLower(st.phase.String())).
			Msg("denied: a policy that reads the body changed headers that Envoy no longer holds; have Envoy buffer the body")
	}
	code := st.snap.Config.Server.StatusOnError
	if st.phase == agentv1.PolicyPhase_RESPONSE {
		code = 500
	}
	return immediateReply(denial(code, "headers_already_sent", "a policy changed headers after Envoy had sent them on"))
}

// onStreamedBody gathers a STREAMED body. Envoy forwards a chunk once it has the chunk's reply,
// so every reply is held until the last chunk: then the chain runs on the whole body, and the
// held replies go out in order, the first carrying the new body when the chain changed it and
// the others clearing their chunks. A body over max_body_size_bytes is refused at once.
func (s *Server) onStreamedBody(ctx context.Context, st *stream, phase agentv1.PolicyPhase, b *extprocv3.HttpBody) *extprocv3.ProcessingResponse {
	if len(st.bodyBuf)+len(b.GetBody()) > st.snap.Config.Server.MaxBodySizeBytes {
		st.held = 0
		st.bodyBuf = st.bodyBuf[:0]
		st.phase = phase
		st.outcome(statusDeny)
		if phase == agentv1.PolicyPhase_RESPONSE {
			st.awaitRespBody = false
			return immediateReply(denial(500, "response_too_large", "the response body exceeds the size limit"))
		}
		st.awaitReqBody = false
		return immediateReply(denial(413, "payload_too_large", "the request body exceeds the size limit"))
	}
	st.bodyBuf = append(st.bodyBuf, b.GetBody()...)
	if !b.GetEndOfStream() {
		st.held++
		st.arm(phase)
		return nil
	}
	start := time.Now()
	resp := s.runOnBody(ctx, st, phase, start, st.bodyBuf, true)
	st.bodyBuf = st.bodyBuf[:0]
	if resp.immediate != nil {
		st.held = 0
		return immediateReply(resp.immediate)
	}
	if r := s.headersSent(st, resp.common); r != nil {
		st.held = 0
		return r
	}
	bm := resp.common.GetBodyMutation()
	reply := func(first bool) *extprocv3.ProcessingResponse {
		var c *extprocv3.CommonResponse
		switch {
		case bm == nil:
		case first:
			c = &extprocv3.CommonResponse{BodyMutation: bm}
		default:
			c = &extprocv3.CommonResponse{BodyMutation: &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_ClearBody{ClearBody: true}}}
		}
		if phase == agentv1.PolicyPhase_RESPONSE {
			return responseBodyReply(c)
		}
		return requestBodyReply(c)
	}
	for i := range st.held {
		st.pending = append(st.pending, reply(i == 0))
	}
	last := reply(st.held == 0)
	st.held = 0
	return last
}

// headerValue returns a header's value: Envoy sends raw_value only; value is read for clients
// that use the older field. HTTP lets a value hold bytes that are not UTF-8 (obs-text), but
// every string of the agent API must be UTF-8, or the call fails before the agent sees it; such
// bytes become U+FFFD, so that the request is still judged by its policies. A valid value
// shares raw's memory instead of copying it: a received message is never modified, and the
// string keeps it alive for as long as it is used.
func headerValue(raw []byte, value string) string {
	if len(raw) > 0 {
		if !utf8.Valid(raw) {
			return strings.ToValidUTF8(string(raw), "\uFFFD")
		}
		return unsafe.String(unsafe.SliceData(raw), len(raw))
	}
	return value
}

// addHeader adds a header to a map. The values of a repeated header are collected in *rep and
// joined with ", " once, by joinRepeated: joining them one at a time would copy the value so far
// on every repeat, which a stream of many headers of one name turns into quadratic time.
func addHeader(m map[string]string, rep *map[string][]string, k, v string) {
	old, ok := m[k]
	if !ok {
		m[k] = v
		return
	}
	if *rep == nil {
		*rep = map[string][]string{}
	}
	vs, seen := (*rep)[k]
	if !seen {
		vs = []string{old}
	}
	(*rep)[k] = append(vs, v)
}

// joinRepeated sets each repeated header to its values joined with ", ".
func joinRepeated(m map[string]string, rep map[string][]string) {
	for k, vs := range rep {
		m[k] = strings.Join(vs, ", ")
	}
}

// requestContext converts Envoy's request headers for the agent: pseudo-headers become fields,
// the rest a map of lowercase names.
func requestContext(h *extprocv3.HttpHeaders) *agentv1.RequestContext {
	rc := &agentv1.RequestContext{Headers: make(map[string]string, len(h.GetHeaders().GetHeaders()))}
	fillRequestContext(rc, h)
	return rc
}

// fillRequestContext adds Envoy's request headers to rc, whose header map must be empty.
func fillRequestContext(rc *agentv1.RequestContext, h *extprocv3.HttpHeaders) {
	var rep map[string][]string
	for _, hv := range h.GetHeaders().GetHeaders() {
		k := hv.GetKey()
		v := headerValue(hv.GetRawValue(), hv.GetValue())
		if len(k) > 0 && k[0] == ':' {
			switch k {
			case ":method":
				rc.Method = v
			case ":path":
				rc.Path = v
			case ":scheme":
				rc.Scheme = v
			case ":authority":
				rc.Authority = v
			}
			continue
		}
		addHeader(rc.Headers, &rep, strings.ToLower(k), v) // no copy when already lowercase
	}
	joinRepeated(rc.Headers, rep)
}

// clientIP takes the address of Envoy's source.address attribute without its port.
func clientIP(addr string) string {
	if addr == "" {
		return ""
	}
	if host, _, err := net.SplitHostPort(addr); err == nil {
		return host
	}
	return addr
}
