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
	protocolLog, agentLog, replyLog, policyLog, invalidLog *logging.Throttle
	// wake asks the health loop to check the agents now: a request met a route that is not
	// checked against its agent yet.
	wake chan time.Time
}

// NewServer returns a server with no snapshot; Store gives it one.
func NewServer(log *logging.Logger, m *kernelMetrics) *Server {
	return &Server{
		log:         log,
		metrics:     m,
		protocolLog: logging.NewThrottle(5 * time.Second),
		agentLog:    logging.NewThrottle(5 * time.Second),
		replyLog:    logging.NewThrottle(5 * time.Second),
		policyLog:   logging.NewThrottle(5 * time.Second),
		invalidLog:  logging.NewThrottle(5 * time.Second),
		wake:        make(chan time.Time, 1),
	}
}

// Store swaps in a new snapshot. Streams already open keep the one they started with.
func (s *Server) Store(snap *Snapshot) { s.snap.Store(snap) }

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
	respStatus                  int32
	respHeaders                 map[string]string
	respBody                    []byte
	// phase is the phase whose chain runs, for counting its outcome.
	phase agentv1.PolicyPhase
	// result is the outcome of the last phase, for the stream's span.
	result string
	// span is the stream's span, nil unless the stream is traced.
	span    trace.Span
	spanCtx context.Context
	tracer  *tracing.Tracer

	// call holds the agent request of the phase being run.
	call *agentCall

	// respBuf outlives a pooled stream's reset, so that its map is reused.
	respBuf map[string]string
}

// agentCall is a stream's agent request, allocated once per pooled stream.
type agentCall struct {
	req  agentv1.PolicyRequest
	resp agentv1.ResponseContext
}

// maxPooledHeaders caps the header maps a pooled stream keeps: a map grown by an unusual
// request is dropped rather than kept alive in the pool.
const maxPooledHeaders = 64

const (
	seenRequestHeaders uint8 = 1 << iota
	seenResponseHeaders
)

var streamPool = sync.Pool{New: func() any { return new(stream) }}

func getStream(snap *Snapshot) *stream {
	st := streamPool.Get().(*stream)
	st.snap = snap
	if st.call == nil {
		st.call = &agentCall{}
	}
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
	rh, call := st.respBuf, st.call
	*st = stream{}
	if call != nil {
		call.req = agentv1.PolicyRequest{}
		call.resp = agentv1.ResponseContext{}
		st.call = call
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
// the header map nor the received message its values point into.
func (st *stream) requestDone() {
	r := st.route
	if st.reqCtx == nil || r == nil || !(r.response.empty() || r.response.noRequest) {
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
	snap := s.snap.Load()
	if snap == nil || s.draining.Load() {
		return status.Error(codes.Unavailable, "policy-kernel is not serving")
	}
	s.streams.Add(1)
	defer s.streams.Add(-1)
	ctx := ps.Context()
	st := getStream(snap)
	defer putStream(st)
	defer endStreamSpan(st)
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
		resp, err := s.handle(ctx, st, req)
		if err != nil {
			s.metrics.protocolErrors.Inc()
			if s.protocolLog.Allow() {
				s.log.Warn().Str("error", err.Error()).Str("request_id", st.requestID).Msg("ext_proc protocol error")
			}
			return err
		}
		if err := ps.Send(resp); err != nil {
			return nil // the stream is gone; Envoy has given up on it
		}
	}
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
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestTrailers{RequestTrailers: &extprocv3.TrailersResponse{}}}, nil
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		return s.onResponseHeaders(ctx, st, v.ResponseHeaders)
	case *extprocv3.ProcessingRequest_ResponseBody:
		return s.onResponseBody(ctx, st, v.ResponseBody)
	case *extprocv3.ProcessingRequest_ResponseTrailers:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseTrailers{ResponseTrailers: &extprocv3.TrailersResponse{}}}, nil
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
	start := time.Now()
	rc := getRequestContext()
	fillRequestContext(rc, h)
	rc.ClientIp = clientIP(attribute(req, "source.address"))
	st.reqCtx = rc
	st.requestID = rc.Headers["x-request-id"]
	route := st.snap.route(attribute(req, "xds.route_name"), rc.Path)
	st.route = route
	s.traceStream(ctx, st)
	if route == nil {
		return requestHeadersReply(nil, skipResponseMode), nil
	}
	if route.invalid != "" {
		return s.refuseRoute(st, route), nil
	}
	mode := route.mode()
	if route.request.empty() {
		route.metrics.requests[statusAllow].Inc()
		return requestHeadersReply(nil, mode), nil
	}
	if route.request.body && !h.GetEndOfStream() {
		st.awaitReqBody = true
		return requestHeadersReply(nil, mode), nil
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
	st.result = statusInvalidRoute
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
	if !st.awaitReqBody {
		return requestBodyReply(nil), nil
	}
	start := time.Now()
	st.awaitReqBody = false
	if len(b.GetBody()) > st.snap.Config.Server.MaxBodySizeBytes {
		return immediateReply(denial(413, "payload_too_large", "the request body exceeds the size limit")), nil
	}
	st.reqCtx.Body = b.GetBody()
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
	route := st.route
	if route == nil || route.invalid != "" || route.response.empty() {
		return responseHeadersReply(nil), nil
	}
	start := time.Now()
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
	if route.response.body && !h.GetEndOfStream() {
		st.awaitRespBody = true
		return responseHeadersReply(nil), nil
	}
	resp := s.runChain(ctx, st, agentv1.PolicyPhase_RESPONSE, start, false)
	if resp.immediate != nil {
		return immediateReply(resp.immediate), nil
	}
	return responseHeadersReply(resp.common), nil
}

func (s *Server) onResponseBody(ctx context.Context, st *stream, b *extprocv3.HttpBody) (*extprocv3.ProcessingResponse, error) {
	if !st.awaitRespBody {
		return responseBodyReply(nil), nil
	}
	start := time.Now()
	st.awaitRespBody = false
	if len(b.GetBody()) > st.snap.Config.Server.MaxBodySizeBytes {
		return immediateReply(denial(500, "response_too_large", "the response body exceeds the size limit")), nil
	}
	st.respBody = b.GetBody()
	resp := s.runChain(ctx, st, agentv1.PolicyPhase_RESPONSE, start, true)
	if resp.immediate != nil {
		return immediateReply(resp.immediate), nil
	}
	return responseBodyReply(resp.common), nil
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
