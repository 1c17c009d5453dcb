package envoytest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
)

// attributesKey is the map key Envoy files attributes under: the filter's name.
const attributesKey = "envoy.filters.http.ext_proc"

type streamEvent struct {
	msg *extprocv3.ProcessingResponse
	err error
}

type openResult int

const (
	openOK     openResult = iota
	openIgnore            // processing is complete: let the HTTP message through
	openError             // opening failed and a local reply has been sent
)

// exchange is one HTTP request through the filter: Envoy's Filter object.
//
// Timing model: the downstream request's headers arrive first and their reply is awaited
// before the body arrives, in ChunkBytes frames, followed by the trailers; the upstream
// response is delivered the same way. Envoy reacts to data arriving while a headers
// reply is outstanding by holding it, which leads to the same messages.
type exchange struct {
	ctx      context.Context
	c        *Client
	cfg      *FilterConfig
	req      *Request
	upstream Upstream
	dec, enc *procState

	stream  extprocv3.ExternalProcessor_ProcessClient
	cancel  context.CancelFunc
	stop    chan struct{}
	events  <-chan streamEvent
	sendQ   *sendQueue
	workers sync.WaitGroup

	// complete is Envoy's processing_complete_: the stream is finished with and the
	// rest of the HTTP exchange passes the filter untouched.
	complete           bool
	protocolConfigSent bool
	// replied is set once a local reply has been sent to the downstream client.
	replied bool

	res Result
}

func newExchange(ctx context.Context, c *Client, req *Request, upstream Upstream) *exchange {
	x := &exchange{ctx: ctx, c: c, cfg: &c.cfg, req: req, upstream: upstream}
	x.dec = &procState{x: x, isRequest: true}
	x.enc = &procState{x: x}
	x.dec.setMode(c.cfg.ProcessingMode)
	x.enc.setMode(c.cfg.ProcessingMode)
	return x
}

func (x *exchange) run() (*Result, error) {
	err := x.play()
	// The end of the HTTP exchange destroys the filter, which resets the stream: the
	// server sees CANCELLED. Envoy also half-closes first, but the reset goes out with
	// it and supersedes it, so cancelling alone is what the server observes.
	x.closeStream()
	x.workers.Wait()
	if err == nil {
		err = x.ctx.Err()
	}
	if err != nil {
		return nil, err
	}
	return &x.res, nil
}

func (x *exchange) play() error {
	x.dec.headers = x.requestHeaders()
	if len(x.req.Trailers) > 0 {
		x.dec.trailers = mapFromPairs(x.req.Trailers)
	}
	if err := x.runDirection(x.dec, x.req.Body); err != nil || x.replied {
		return err
	}

	fwd := &Forwarded{Headers: x.dec.headers.pairs(), Body: x.dec.out}
	fwd.Method, _ = x.dec.headers.get(":method")
	fwd.Path, _ = x.dec.headers.get(":path")
	fwd.Authority, _ = x.dec.headers.get(":authority")
	fwd.Scheme, _ = x.dec.headers.get(":scheme")
	if x.dec.trailers != nil {
		fwd.Trailers = x.dec.trailers.pairs()
	}
	x.res.Forwarded = fwd

	resp, err := x.callUpstream(fwd)
	if err != nil || x.replied {
		return err
	}
	if resp == nil {
		resp = &Response{}
	}
	code := resp.Status
	if code == 0 {
		code = 200
	}
	h := &headerMap{}
	h.add(":status", strconv.Itoa(code))
	for _, p := range resp.Headers {
		if k := strings.ToLower(p[0]); k != ":status" {
			h.add(k, p[1])
		}
	}
	x.enc.headers = h
	if len(resp.Trailers) > 0 {
		x.enc.trailers = mapFromPairs(resp.Trailers)
	}
	if err := x.runDirection(x.enc, resp.Body); err != nil || x.replied {
		return err
	}

	x.res.Status = code
	if v, ok := x.enc.headers.get(":status"); ok {
		if n, err := strconv.Atoi(v); err == nil {
			x.res.Status = n
		}
	}
	x.res.Headers = x.enc.headers.pairs()
	x.res.Body = x.enc.out
	if x.enc.trailers != nil {
		x.res.Trailers = x.enc.trailers.pairs()
	}
	x.res.Details = DetailsViaUpstream
	return nil
}

func (x *exchange) requestHeaders() *headerMap {
	r := x.req
	method, path, authority, scheme := r.Method, r.Path, r.Authority, r.Scheme
	var rest [][2]string
	for _, p := range r.Headers {
		k := strings.ToLower(p[0])
		switch k {
		case ":method":
			method = p[1]
		case ":path":
			path = p[1]
		case ":authority":
			authority = p[1]
		case ":scheme":
			scheme = p[1]
		case "host":
			if authority == "" {
				authority = p[1]
			}
		default:
			rest = append(rest, [2]string{k, p[1]})
		}
	}
	if method == "" {
		method = "GET"
	}
	if path == "" {
		path = "/"
	}
	if authority == "" {
		authority = "example.com"
	}
	if scheme == "" {
		scheme = "http"
	}
	h := &headerMap{}
	h.add(":authority", authority)
	h.add(":path", path)
	h.add(":method", method)
	h.add(":scheme", scheme)
	for _, p := range rest {
		h.add(p[0], p[1])
	}
	return h
}

// runDirection passes one HTTP message (request or response) through the filter:
// Envoy's decodeHeaders/decodeData/decodeTrailers, or their encode counterparts.
func (x *exchange) runDirection(st *procState, body []byte) error {
	endStream := len(body) == 0 && st.trailers == nil
	if endStream {
		st.completeBodyAvailable = true
	}
	if !x.complete && st.sendHeaders {
		if x.openStream() == openOK {
			x.sendHeadersMsg(st, endStream)
		}
		if x.replied {
			return nil
		}
	}
	if !x.complete && st.shouldRemoveContentLength() {
		st.headers.remove("content-length")
	}
	if err := x.waitIdle(st); err != nil || x.replied {
		return err
	}
	for off := 0; off < len(body); off += x.cfg.ChunkBytes {
		end := min(off+x.cfg.ChunkBytes, len(body))
		if err := x.onData(st, body[off:end], end == len(body) && st.trailers == nil); err != nil || x.replied {
			return err
		}
	}
	if st.trailers != nil {
		x.onTrailers(st)
		if x.replied {
			return nil
		}
	}
	if err := x.waitIdle(st); err != nil || x.replied {
		return err
	}
	st.flush()
	return nil
}

func (x *exchange) onData(st *procState, data []byte, endStream bool) error {
	if endStream {
		st.completeBodyAvailable = true
	}
	if st.bodyReplaced {
		// CONTINUE_AND_REPLACE supplied the body; the original data is drained.
		return nil
	}
	if x.complete {
		st.flush()
		st.out = append(st.out, data...)
		return nil
	}
	switch st.bodyMode {
	case extprocfilterv3.ProcessingMode_NONE:
		st.out = append(st.out, data...)
	case extprocfilterv3.ProcessingMode_BUFFERED:
		st.buffered = append(st.buffered, data...)
		st.hasBuffered = true
		if len(st.buffered) > x.cfg.MaxBufferBytes {
			x.payloadTooLarge(st)
			return nil
		}
		if endStream {
			switch x.openStream() {
			case openError:
				return nil
			case openIgnore:
				st.flush()
				return nil
			}
			x.sendBodyMsg(st, st.buffered, true, cbBufferedBody)
		}
	case extprocfilterv3.ProcessingMode_STREAMED:
		switch x.openStream() {
		case openError:
			return nil
		case openIgnore:
			st.flush()
			st.out = append(st.out, data...)
			return nil
		}
		// Each chunk goes out at once; replies come back in order, one per chunk.
		st.queue = append(st.queue, chunk{data: data, eos: endStream})
		x.sendBodyMsg(st, data, endStream, cbStreamedBody)
	case extprocfilterv3.ProcessingMode_BUFFERED_PARTIAL:
		if st.partialDone {
			st.out = append(st.out, data...)
			return nil
		}
		st.queue = append(st.queue, chunk{data: data, eos: endStream})
		if st.cb == cbPartialBody {
			// Held until the outstanding reply arrives.
			return nil
		}
		if endStream || st.queuedBytes() > x.cfg.MaxBufferBytes {
			switch x.openStream() {
			case openError:
				return nil
			case openIgnore:
				st.flush()
				return nil
			}
			all := st.consolidate()
			x.sendBodyMsg(st, all.data, all.eos, cbPartialBody)
		}
	default:
		return fmt.Errorf("%w: %s", errUnsupported, st.bodyMode)
	}
	return nil
}

func (x *exchange) onTrailers(st *procState) {
	if x.complete {
		return
	}
	bodyDelivered := st.completeBodyAvailable
	st.completeBodyAvailable = true
	st.trailersAvailable = true
	if st.cb != cbIdle {
		// Held until the outstanding reply arrives; its handling sends them.
		return
	}
	buffered := st.hasBuffered && st.bodyMode == extprocfilterv3.ProcessingMode_BUFFERED
	partial := len(st.queue) > 0 && st.bodyMode == extprocfilterv3.ProcessingMode_BUFFERED_PARTIAL
	if !bodyDelivered && (buffered || partial) {
		// The trailers complete the body, which goes out with end_of_stream false.
		switch x.openStream() {
		case openError:
			return
		case openIgnore:
			st.flush()
			return
		}
		if buffered {
			x.sendBodyMsg(st, st.buffered, false, cbBufferedBody)
		} else {
			all := st.consolidate()
			x.sendBodyMsg(st, all.data, false, cbPartialBody)
		}
		return
	}
	if !st.sendTrailers {
		return
	}
	if x.openStream() != openOK {
		return
	}
	x.sendTrailersMsg(st)
}

func (x *exchange) payloadTooLarge(st *procState) {
	x.finishCalls()
	if st.isRequest {
		x.sendLocalReply(413, []byte("Payload Too Large"), nil, DetailsRequestTooLarge, nil)
	} else {
		x.sendLocalReply(500, []byte("Internal Server Error"), nil, DetailsResponseTooLarge, nil)
	}
}

// --- messages to the server ---

func (x *exchange) newRequest(st *procState) *extprocv3.ProcessingRequest {
	m := &extprocv3.ProcessingRequest{MetadataContext: &corev3.Metadata{}}
	names := x.cfg.ResponseAttributes
	if st.isRequest {
		names = x.cfg.RequestAttributes
	}
	if !st.attrsSent && len(names) > 0 {
		s := &structpb.Struct{Fields: map[string]*structpb.Value{}}
		for _, n := range names {
			if v, ok := x.req.Attributes[n]; ok {
				s.Fields[n] = structpb.NewStringValue(v)
			}
		}
		st.attrsSent = true
		m.Attributes = map[string]*structpb.Struct{attributesKey: s}
	}
	return m
}

func (x *exchange) addProtocolConfig(m *extprocv3.ProcessingRequest) {
	if x.protocolConfigSent {
		return
	}
	x.protocolConfigSent = true
	m.ProtocolConfig = &extprocv3.ProtocolConfiguration{
		RequestBodyMode:  x.dec.bodyMode,
		ResponseBodyMode: x.enc.bodyMode,
	}
}

func (x *exchange) sendHeadersMsg(st *procState, endStream bool) {
	st.held = true
	st.noBody = endStream
	m := x.newRequest(st)
	hh := &extprocv3.HttpHeaders{Headers: st.headers.proto(), EndOfStream: endStream}
	if st.isRequest {
		m.Request = &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: hh}
	} else {
		m.Request = &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: hh}
	}
	x.addProtocolConfig(m)
	st.startCall(cbHeaders)
	x.send(m)
}

func (x *exchange) sendBodyMsg(st *procState, data []byte, endStream bool, next cbState) {
	m := x.newRequest(st)
	hb := &extprocv3.HttpBody{Body: bytes.Clone(data), EndOfStream: endStream}
	if st.isRequest {
		m.Request = &extprocv3.ProcessingRequest_RequestBody{RequestBody: hb}
	} else {
		m.Request = &extprocv3.ProcessingRequest_ResponseBody{ResponseBody: hb}
	}
	x.addProtocolConfig(m)
	st.startCall(next)
	x.send(m)
}

func (x *exchange) sendTrailersMsg(st *procState) {
	if st.trailersSent {
		return
	}
	st.trailersSent = true
	m := x.newRequest(st)
	ht := &extprocv3.HttpTrailers{Trailers: st.trailers.proto()}
	if st.isRequest {
		m.Request = &extprocv3.ProcessingRequest_RequestTrailers{RequestTrailers: ht}
	} else {
		m.Request = &extprocv3.ProcessingRequest_ResponseTrailers{ResponseTrailers: ht}
	}
	next := st.cb
	if next == cbIdle {
		next = cbTrailers
	}
	x.addProtocolConfig(m)
	st.startCall(next)
	x.send(m)
}

// --- the stream ---

// sendQueue decouples sending from the exchange, as Envoy's asynchronous gRPC client
// does: a server that stops reading cannot block the filter or its timers.
type sendQueue struct {
	mu   sync.Mutex
	q    []*extprocv3.ProcessingRequest
	wake chan struct{}
}

func (x *exchange) openStream() openResult {
	if x.complete {
		return openIgnore
	}
	if x.stream != nil {
		return openOK
	}
	// Envoy gives the stream no deadline (no grpc-timeout header), so ctx's deadline is
	// not handed to gRPC; the stream is cancelled when ctx ends instead.
	sctx, cancelStream := context.WithCancel(context.WithoutCancel(x.ctx))
	stopAfter := context.AfterFunc(x.ctx, cancelStream)
	cancel := func() {
		stopAfter()
		cancelStream()
	}
	s, err := x.c.pick().Process(sctx)
	if err != nil {
		cancel()
		st := status.Convert(err)
		x.onGrpcError(st.Code(), st.Message())
		if x.replied {
			return openError
		}
		return openIgnore
	}
	events := make(chan streamEvent)
	x.stream, x.cancel, x.stop, x.events = s, cancel, make(chan struct{}), events
	x.sendQ = &sendQueue{wake: make(chan struct{}, 1)}
	x.workers.Add(2)
	go x.receiveLoop(s, events, x.stop)
	go x.sendLoop(s, x.sendQ, x.stop)
	return openOK
}

func (x *exchange) receiveLoop(s extprocv3.ExternalProcessor_ProcessClient, events chan<- streamEvent, stop <-chan struct{}) {
	defer x.workers.Done()
	for {
		m, err := s.Recv()
		select {
		case events <- streamEvent{msg: m, err: err}:
		case <-stop:
			return
		}
		if err != nil {
			return
		}
	}
}

func (x *exchange) sendLoop(s extprocv3.ExternalProcessor_ProcessClient, q *sendQueue, stop <-chan struct{}) {
	defer x.workers.Done()
	for {
		q.mu.Lock()
		if len(q.q) == 0 {
			q.mu.Unlock()
			select {
			case <-q.wake:
				continue
			case <-stop:
				return
			}
		}
		m := q.q[0]
		q.q[0] = nil
		q.q = q.q[1:]
		q.mu.Unlock()
		// A failed send means the stream has ended; its status reaches receiveLoop.
		if err := s.Send(m); err != nil {
			return
		}
	}
}

func (x *exchange) send(m *extprocv3.ProcessingRequest) {
	x.res.Sent = append(x.res.Sent, m)
	x.sendQ.mu.Lock()
	x.sendQ.q = append(x.sendQ.q, m)
	x.sendQ.mu.Unlock()
	select {
	case x.sendQ.wake <- struct{}{}:
	default:
	}
}

// closeStream drops the stream; later replies are never read, as Envoy ignores them.
func (x *exchange) closeStream() {
	if x.stream == nil {
		return
	}
	close(x.stop)
	x.cancel()
	x.stream, x.events = nil, nil
}

// --- waiting ---

func (x *exchange) timer() (<-chan time.Time, func()) {
	var deadline time.Time
	armed := false
	for _, st := range []*procState{x.dec, x.enc} {
		if st.timerOn && (!armed || st.deadline.Before(deadline)) {
			deadline, armed = st.deadline, true
		}
	}
	if !armed {
		return nil, func() {}
	}
	t := time.NewTimer(time.Until(deadline))
	return t.C, func() { t.Stop() }
}

var errNothingToWaitFor = errors.New("envoytest: internal error: a reply is awaited on no stream and no timer")

// waitIdle handles stream events until st awaits no reply or a local reply was sent.
func (x *exchange) waitIdle(st *procState) error {
	for !x.replied && st.cb != cbIdle {
		tc, stop := x.timer()
		if tc == nil && x.events == nil {
			return errNothingToWaitFor
		}
		select {
		case ev := <-x.events:
			stop()
			x.onEvent(ev)
		case <-tc:
			x.onMessageTimeout()
		case <-x.ctx.Done():
			stop()
			return x.ctx.Err()
		}
	}
	return nil
}

// callUpstream runs the upstream while still handling the stream: a reply or a stream
// failure arriving meanwhile is acted on as Envoy would, possibly with a local reply.
func (x *exchange) callUpstream(fwd *Forwarded) (*Response, error) {
	if x.upstream == nil {
		return nil, nil
	}
	done := make(chan *Response, 1)
	go func() { done <- x.upstream(fwd) }()
	for {
		tc, stop := x.timer()
		select {
		case r := <-done:
			stop()
			return r, nil
		case ev := <-x.events:
			stop()
			x.onEvent(ev)
			if x.replied {
				<-done
				return nil, nil
			}
		case <-tc:
			x.onMessageTimeout()
			if x.replied {
				<-done
				return nil, nil
			}
		case <-x.ctx.Done():
			stop()
			<-done
			return nil, x.ctx.Err()
		}
	}
}

// --- handling what the server does (Envoy's onReceiveMessage and friends) ---

func (x *exchange) onEvent(ev streamEvent) {
	if ev.err == nil {
		x.res.Received = append(x.res.Received, ev.msg)
		x.onMessage(ev.msg)
		return
	}
	x.events = nil
	if errors.Is(ev.err, io.EOF) {
		x.onGrpcClose()
		return
	}
	st := status.Convert(ev.err)
	x.onGrpcError(st.Code(), st.Message())
}

func (x *exchange) onMessage(r *extprocv3.ProcessingResponse) {
	if x.complete {
		return
	}
	// A request for more time is handled on its own; the rest of such a message is
	// not looked at.
	if r.GetOverrideMessageTimeout() != nil {
		x.onNewTimeout(r.GetOverrideMessageTimeout())
		return
	}
	x.maybeOverrideMode(r)

	var err error
	switch v := r.GetResponse().(type) {
	case *extprocv3.ProcessingResponse_RequestHeaders:
		err = x.dec.handleHeadersResponse(v.RequestHeaders)
	case *extprocv3.ProcessingResponse_ResponseHeaders:
		err = x.enc.handleHeadersResponse(v.ResponseHeaders)
	case *extprocv3.ProcessingResponse_RequestBody:
		err = x.dec.handleBodyResponse(v.RequestBody)
	case *extprocv3.ProcessingResponse_ResponseBody:
		err = x.enc.handleBodyResponse(v.ResponseBody)
	case *extprocv3.ProcessingResponse_RequestTrailers:
		err = x.dec.handleTrailersResponse(v.RequestTrailers)
	case *extprocv3.ProcessingResponse_ResponseTrailers:
		err = x.enc.handleTrailersResponse(v.ResponseTrailers)
	case *extprocv3.ProcessingResponse_ImmediateResponse:
		x.complete = true
		x.finishCalls()
		x.closeStream()
		x.sendImmediateResponse(v.ImmediateResponse)
		return
	default:
		// No response set, or one Envoy 1.36 does not know (streamed_immediate_response).
		err = &errSpurious{"unhandled message"}
	}
	if err == nil {
		return
	}
	var sp *errSpurious
	switch {
	case errors.As(err, &sp):
		if x.cfg.FailureModeAllow {
			x.complete = true
			x.closeStream()
			x.clearAsyncState()
			return
		}
		x.handleErrorResponse(sp.msg)
	default:
		x.handleErrorResponse(err.Error())
	}
}

// maybeOverrideMode applies a mode_override as Envoy 1.36 does (ext_proc.cc,
// onReceiveMessage and effectiveModeOverride): only with allow_mode_override, only while a
// headers reply is awaited in either direction, and only if allowed_override_modes (when
// set) lists the result. The new mode starts from the filter's configured mode, takes
// every header and trailer mode the override sets to other than DEFAULT, and takes both
// body modes as they are, so an omitted body mode means NONE. It replaces the mode of both
// directions for the rest of the stream.
func (x *exchange) maybeOverrideMode(r *extprocv3.ProcessingResponse) {
	o := r.GetModeOverride()
	if !x.cfg.AllowModeOverride || o == nil {
		return
	}
	cfgMode := x.cfg.ProcessingMode
	if cfgMode.GetRequestBodyMode() == extprocfilterv3.ProcessingMode_FULL_DUPLEX_STREAMED ||
		cfgMode.GetResponseBodyMode() == extprocfilterv3.ProcessingMode_FULL_DUPLEX_STREAMED {
		return
	}
	if x.dec.cb != cbHeaders && x.enc.cb != cbHeaders {
		return
	}
	mode := proto.Clone(cfgMode).(*extprocfilterv3.ProcessingMode)
	if o.GetRequestHeaderMode() != extprocfilterv3.ProcessingMode_DEFAULT {
		mode.RequestHeaderMode = o.GetRequestHeaderMode()
	}
	if o.GetResponseHeaderMode() != extprocfilterv3.ProcessingMode_DEFAULT {
		mode.ResponseHeaderMode = o.GetResponseHeaderMode()
	}
	if o.GetRequestTrailerMode() != extprocfilterv3.ProcessingMode_DEFAULT {
		mode.RequestTrailerMode = o.GetRequestTrailerMode()
	}
	if o.GetResponseTrailerMode() != extprocfilterv3.ProcessingMode_DEFAULT {
		mode.ResponseTrailerMode = o.GetResponseTrailerMode()
	}
	mode.RequestBodyMode = o.GetRequestBodyMode()
	mode.ResponseBodyMode = o.GetResponseBodyMode()
	if len(x.cfg.AllowedOverrideModes) > 0 {
		allowed := false
		for _, a := range x.cfg.AllowedOverrideModes {
			// request_header_mode is not compared: it cannot matter any more.
			if mode.GetRequestBodyMode() == a.GetRequestBodyMode() &&
				mode.GetRequestTrailerMode() == a.GetRequestTrailerMode() &&
				mode.GetResponseHeaderMode() == a.GetResponseHeaderMode() &&
				mode.GetResponseBodyMode() == a.GetResponseBodyMode() &&
				mode.GetResponseTrailerMode() == a.GetResponseTrailerMode() {
				allowed = true
				break
			}
		}
		if !allowed {
			return
		}
	}
	x.dec.setMode(mode)
	x.enc.setMode(mode)
}

// onNewTimeout honours override_message_timeout: once per outstanding message, within
// [1ms, MaxMessageTimeout], the running timer restarts with the new duration.
func (x *exchange) onNewTimeout(d *durationpb.Duration) {
	if d.CheckValid() != nil {
		return
	}
	timeout := d.AsDuration().Truncate(time.Millisecond)
	if timeout < time.Millisecond || timeout > x.cfg.MaxMessageTimeout {
		return
	}
	x.dec.restartTimer(timeout)
	x.enc.restartTimer(timeout)
}

func (x *exchange) onMessageTimeout() {
	x.complete = true
	x.closeStream()
	if x.cfg.FailureModeAllow {
		x.clearAsyncState()
		return
	}
	x.finishCalls()
	x.sendLocalReply(504, nil, nil, DetailsMessageTimeout, nil)
}

func (x *exchange) onGrpcClose() {
	if x.complete {
		return
	}
	x.complete = true
	x.closeStream()
	x.clearAsyncState()
}

func (x *exchange) onGrpcError(code codes.Code, msg string) {
	if x.complete {
		return
	}
	if x.cfg.FailureModeAllow {
		x.onGrpcClose()
		return
	}
	x.complete = true
	x.finishCalls()
	x.closeStream()
	x.sendLocalReply(x.cfg.StatusOnError, nil, nil, fmt.Sprintf("%s%d{%s}", DetailsGRPCErrorPrefix, int(code), msg), nil)
}

func (x *exchange) handleErrorResponse(msg string) {
	x.complete = true
	x.finishCalls()
	x.closeStream()
	x.sendLocalReply(x.cfg.StatusOnError, nil, nil, msg, nil)
}

// finishCalls stops both timers and marks both directions as awaiting nothing.
func (x *exchange) finishCalls() {
	x.dec.finishCall(cbIdle)
	x.enc.finishCall(cbIdle)
}

// clearAsyncState abandons whatever was awaited and lets held data through unmodified.
func (x *exchange) clearAsyncState() {
	for _, st := range []*procState{x.dec, x.enc} {
		st.finishCall(cbIdle)
		st.flush()
	}
}

func (x *exchange) sendImmediateResponse(ir *extprocv3.ImmediateResponse) {
	code := 200
	if ir.GetStatus() != nil {
		code = int(ir.GetStatus().GetCode())
	}
	x.sendLocalReply(code, ir.GetBody(), ir.GetHeaders(), ir.GetDetails(), ir)
}

// sendLocalReply answers the downstream client as Envoy's sendLocalReply does: a status
// under 200 becomes 200, header mutations go through the filter's mutation rules and
// stop at the first error (the reply is still sent), and a body brings content-length
// and, unless set, content-type: text/plain.
func (x *exchange) sendLocalReply(code int, body []byte, hm *extprocv3.HeaderMutation, details string, ir *extprocv3.ImmediateResponse) {
	if code < 200 {
		code = 200
	}
	h := &headerMap{}
	h.add(":status", strconv.Itoa(code))
	if hm != nil {
		_ = applyHeaderMutation(hm, h, false, x.c.checker, false)
	}
	if len(body) > 0 {
		h.set("content-length", strconv.Itoa(len(body)))
		if !h.has("content-type") {
			h.set("content-type", "text/plain")
		}
	} else {
		h.remove("content-length")
		h.remove("content-type")
	}
	x.replied = true
	x.res.Status = code
	x.res.Headers = h.pairs()
	x.res.Body = bytes.Clone(body)
	x.res.Trailers = nil
	x.res.LocalReply = true
	x.res.Details = replaceWhitespace(details)
	x.res.ImmediateResponse = ir
}

// replaceWhitespace mirrors Envoy's StringUtil::replaceAllEmptySpace, applied to the
// details of every local reply the filter sends.
func replaceWhitespace(s string) string {
	return strings.Map(func(r rune) rune {
		switch r {
		case ' ', '\t', '\n', '\v', '\f', '\r':
			return '_'
		}
		return r
	}, s)
}
