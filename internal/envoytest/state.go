package envoytest

import (
	"strconv"
	"time"

	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
)

// cbState is what a direction awaits from the server (Envoy's ProcessorState::CallbackState).
type cbState int

const (
	cbIdle cbState = iota
	cbHeaders
	cbBufferedBody
	cbStreamedBody
	cbPartialBody
	cbTrailers
)

type chunk struct {
	data []byte
	eos  bool
}

// errSpurious is a reply that does not fit what was awaited. Envoy answers it with a
// local reply when failing closed and ignores the stream from then on when failing open.
type errSpurious struct{ msg string }

func (e *errSpurious) Error() string { return e.msg }

// procState is one direction of the filter: Envoy's DecodingProcessorState (request)
// or EncodingProcessorState (response).
type procState struct {
	x         *exchange
	isRequest bool

	cb           cbState
	sendHeaders  bool
	sendTrailers bool
	bodyMode     extprocfilterv3.ProcessingMode_BodySendMode

	headers *headerMap
	// held is true while the headers have been offered to the server and not yet
	// released; header mutations in body replies apply only then (Envoy's headers_).
	held                  bool
	noBody                bool
	completeBodyAvailable bool
	trailers              *headerMap // nil when the message has none
	trailersAvailable     bool
	trailersSent          bool

	// out is the body data that has passed the filter, in order.
	out []byte
	// buffered is BUFFERED data held until the server's reply.
	buffered    []byte
	hasBuffered bool
	// queue is STREAMED or BUFFERED_PARTIAL data sent to the server and not yet answered.
	queue        []chunk
	bodyReplaced bool
	partialDone  bool

	attrsSent bool

	timerOn            bool
	deadline           time.Time
	newTimeoutReceived bool
}

func (st *procState) setMode(m *extprocfilterv3.ProcessingMode) {
	// Headers are sent unless skipped, trailers only when asked for.
	if st.isRequest {
		st.sendHeaders = m.GetRequestHeaderMode() != extprocfilterv3.ProcessingMode_SKIP
		st.sendTrailers = m.GetRequestTrailerMode() == extprocfilterv3.ProcessingMode_SEND
		st.bodyMode = m.GetRequestBodyMode()
		return
	}
	st.sendHeaders = m.GetResponseHeaderMode() != extprocfilterv3.ProcessingMode_SKIP
	st.sendTrailers = m.GetResponseTrailerMode() == extprocfilterv3.ProcessingMode_SEND
	st.bodyMode = m.GetResponseBodyMode()
}

// shouldRemoveContentLength: in these modes Envoy cannot keep content-length right if the
// server changes the body, so it drops the header once the headers have been offered.
func (st *procState) shouldRemoveContentLength() bool {
	switch st.bodyMode {
	case extprocfilterv3.ProcessingMode_STREAMED, extprocfilterv3.ProcessingMode_FULL_DUPLEX_STREAMED,
		extprocfilterv3.ProcessingMode_BUFFERED_PARTIAL:
		return true
	case extprocfilterv3.ProcessingMode_BUFFERED:
		return !st.sendHeaders
	}
	return false
}

func (st *procState) startCall(cb cbState) {
	st.cb = cb
	st.timerOn = true
	st.deadline = time.Now().Add(st.x.cfg.MessageTimeout)
	st.newTimeoutReceived = false
}

// finishCall stops the timer even when more streamed replies are outstanding, as Envoy's
// onFinishProcessorCall does.
func (st *procState) finishCall(next cbState) {
	st.cb = next
	st.timerOn = false
	st.newTimeoutReceived = false
}

func (st *procState) restartTimer(d time.Duration) {
	if st.timerOn && !st.newTimeoutReceived {
		st.deadline = time.Now().Add(d)
		st.newTimeoutReceived = true
	}
}

// flush releases held data unmodified.
func (st *procState) flush() {
	st.out = append(st.out, st.buffered...)
	st.buffered, st.hasBuffered = nil, false
	for _, c := range st.queue {
		st.out = append(st.out, c.data...)
	}
	st.queue = nil
}

func (st *procState) queuedBytes() int {
	n := 0
	for _, c := range st.queue {
		n += len(c.data)
	}
	return n
}

// consolidate merges the queued chunks into one, which stays queued.
func (st *procState) consolidate() chunk {
	var all chunk
	for _, c := range st.queue {
		all.data = append(all.data, c.data...)
		all.eos = c.eos
	}
	st.queue = []chunk{all}
	return all
}

func (st *procState) applyHeaders(cr *extprocv3.CommonResponse) error {
	return applyHeaderMutation(cr.GetHeaderMutation(), st.headers,
		cr.GetStatus() == extprocv3.CommonResponse_CONTINUE_AND_REPLACE, st.x.c.checker, st.shouldRemoveContentLength())
}

func (st *procState) handleHeadersResponse(r *extprocv3.HeadersResponse) error {
	if st.cb != cbHeaders {
		return &errSpurious{"spurious message"}
	}
	cr := r.GetResponse()
	if cr.GetHeaderMutation() != nil {
		if err := st.applyHeaders(cr); err != nil {
			return err
		}
	}
	st.finishCall(cbIdle)

	if cr.GetStatus() == extprocv3.CommonResponse_CONTINUE_AND_REPLACE {
		if bm := cr.GetBodyMutation(); bm != nil {
			// The new body rarely matches the old content-length.
			st.headers.remove("content-length")
			st.bodyReplaced = true
			st.buffered = applyBodyMutation(bm, st.buffered)
			st.hasBuffered = true
			st.flush()
		}
		// Nothing more of this message goes to the server.
		st.bodyMode = extprocfilterv3.ProcessingMode_NONE
		st.sendTrailers = false
	} else if !st.noBody {
		if st.completeBodyAvailable && st.bodyMode != extprocfilterv3.ProcessingMode_NONE && st.hasBuffered {
			// The whole body arrived while the headers were out: send it at once.
			st.x.sendBodyMsg(st, st.buffered, !st.trailersAvailable, cbBufferedBody)
			return nil
		}
		switch st.bodyMode {
		case extprocfilterv3.ProcessingMode_BUFFERED, extprocfilterv3.ProcessingMode_BUFFERED_PARTIAL:
			// The headers stay held so that the body reply can still change them.
			return nil
		case extprocfilterv3.ProcessingMode_NONE:
		default:
			// STREAMED: the headers go on and the chunks follow them.
			return nil
		}
		if st.sendTrailers && st.trailersAvailable {
			st.x.sendTrailersMsg(st)
			return nil
		}
	}
	st.held = false
	return nil
}

func (st *procState) handleBodyResponse(r *extprocv3.BodyResponse) error {
	switch st.cb {
	case cbBufferedBody, cbStreamedBody, cbPartialBody:
	default:
		return &errSpurious{"spurious message"}
	}
	cr := r.GetResponse()
	bm := cr.GetBodyMutation()
	switch st.cb {
	case cbBufferedBody:
		if cr.GetHeaderMutation() != nil && st.held {
			if err := st.applyHeaders(cr); err != nil {
				return err
			}
		}
		if bm != nil {
			if err := st.validateContentLength(bm); err != nil {
				return err
			}
			st.buffered = applyBodyMutation(bm, st.buffered)
		}
		st.finishCall(cbIdle)
	case cbStreamedBody:
		if bm.GetStreamedResponse() != nil {
			return &errSpurious{"spurious message: streamed_response is received while body_mode_ is not FULL_DUPLEX_STREAMED"}
		}
		// Header mutations in a streamed body reply are not applied.
		c := st.queue[0]
		st.queue = st.queue[1:]
		data := c.data
		if bm != nil {
			data = applyBodyMutation(bm, data)
		}
		st.out = append(st.out, data...)
		if len(st.queue) == 0 {
			st.finishCall(cbIdle)
		} else {
			st.finishCall(st.cb)
		}
	case cbPartialBody:
		if len(st.queue) == 0 {
			return &errMutation{"Invalid chunk in partial body callback"}
		}
		c := st.queue[0]
		st.queue = st.queue[1:]
		if cr.GetHeaderMutation() != nil && st.held {
			if err := st.applyHeaders(cr); err != nil {
				return err
			}
		}
		data := c.data
		if bm != nil {
			data = applyBodyMutation(bm, data)
		}
		st.out = append(st.out, data...)
		st.finishCall(cbIdle)
		st.flush()
		st.partialDone = true
	}
	st.held = false
	if st.sendTrailers && st.trailersAvailable && len(st.queue) == 0 {
		st.x.sendTrailersMsg(st)
	}
	return nil
}

// validateContentLength rejects a buffered body mutation whose length disagrees with a
// content-length header still held.
func (st *procState) validateContentLength(bm *extprocv3.BodyMutation) error {
	if !st.held {
		return nil
	}
	v, ok := st.headers.get("content-length")
	if !ok {
		return nil
	}
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		return nil
	}
	if n != uint64(len(bm.GetBody())) {
		return &errMutation{"mismatch between content length and the length of the mutated body"}
	}
	return nil
}

func (st *procState) handleTrailersResponse(r *extprocv3.TrailersResponse) error {
	if st.cb != cbTrailers {
		return &errSpurious{"spurious message"}
	}
	if hm := r.GetHeaderMutation(); hm != nil {
		if err := applyHeaderMutation(hm, st.trailers, false, st.x.c.checker, false); err != nil {
			return err
		}
	}
	st.finishCall(cbIdle)
	return nil
}
