package kernel

import (
	"context"
	"errors"
	"strings"
	"time"

	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/headers"
)

// skipResponseMode asks Envoy not to send the response headers of a request whose route has no
// response chain: one message per HTTP request instead of two.
var skipResponseMode = &filterv3.ProcessingMode{
	RequestHeaderMode:   filterv3.ProcessingMode_SEND,
	ResponseHeaderMode:  filterv3.ProcessingMode_SKIP,
	RequestBodyMode:     filterv3.ProcessingMode_NONE,
	ResponseBodyMode:    filterv3.ProcessingMode_NONE,
	RequestTrailerMode:  filterv3.ProcessingMode_SKIP,
	ResponseTrailerMode: filterv3.ProcessingMode_SKIP,
}

// modeFor returns the processing mode the route needs, sent as mode_override on the reply to
// request_headers (Envoy honours it when the filter sets allow_mode_override): a buffered body
// only for a chain that reads one, the trailers of such a body (they tell the kernel that no
// body comes), and no response messages for a route without a response chain. A body that
// Envoy's filter config streams (protocol_config) stays STREAMED: were it overridden to
// BUFFERED, the kernel could not tell whether Envoy honoured the override, and so whether a
// body message is the whole body or its first chunk. nil leaves Envoy's configured mode
// alone, which is what the route needs when it matches Envoy's defaults.
func (r *Route) modeFor(reqBody, respBody filterv3.ProcessingMode_BodySendMode) *filterv3.ProcessingMode {
	return r.procModes[modeIndex(reqBody, respBody)]
}

// modeIndex numbers the combinations of streamed bodies that a route keeps a mode for.
func modeIndex(reqBody, respBody filterv3.ProcessingMode_BodySendMode) int {
	i := 0
	if reqBody == filterv3.ProcessingMode_STREAMED {
		i |= 1
	}
	if respBody == filterv3.ProcessingMode_STREAMED {
		i |= 2
	}
	return i
}

// computeMode computes a mode of modeFor: reqStreamed and respStreamed say that Envoy's filter
// config streams that body.
func computeMode(r *Route, reqStreamed, respStreamed bool) *filterv3.ProcessingMode {
	return computeModeBody(r, r.request.body, reqStreamed, respStreamed)
}

// computeModeBody is computeMode with reqBody saying whether the request body is asked for.
func computeModeBody(r *Route, reqBody, reqStreamed, respStreamed bool) *filterv3.ProcessingMode {
	if r.invalid != "" {
		return nil
	}
	if r.response.empty() && !reqBody {
		return skipResponseMode
	}
	if !reqBody && !r.response.body {
		return nil
	}
	m := &filterv3.ProcessingMode{
		RequestHeaderMode:   filterv3.ProcessingMode_SEND,
		ResponseHeaderMode:  filterv3.ProcessingMode_SEND,
		RequestBodyMode:     filterv3.ProcessingMode_NONE,
		ResponseBodyMode:    filterv3.ProcessingMode_NONE,
		RequestTrailerMode:  filterv3.ProcessingMode_SKIP,
		ResponseTrailerMode: filterv3.ProcessingMode_SKIP,
	}
	bodyMode := func(streamed bool) filterv3.ProcessingMode_BodySendMode {
		if streamed {
			return filterv3.ProcessingMode_STREAMED
		}
		return filterv3.ProcessingMode_BUFFERED
	}
	if reqBody {
		m.RequestBodyMode = bodyMode(reqStreamed)
		m.RequestTrailerMode = filterv3.ProcessingMode_SEND
	}
	if r.response.empty() {
		m.ResponseHeaderMode = filterv3.ProcessingMode_SKIP
	}
	if r.response.body {
		m.ResponseBodyMode = bodyMode(respStreamed)
		m.ResponseTrailerMode = filterv3.ProcessingMode_SEND
	}
	return m
}

// chainResult is what a chain run comes to for Envoy: either an immediate response, or a
// CommonResponse (nil when nothing changes).
type chainResult struct {
	immediate *extprocv3.ImmediateResponse
	common    *extprocv3.CommonResponse
}

// runChain runs the route's chain of a phase on the agent and turns the outcome into Envoy's
// terms. It always returns an answer within the message budget: the agent's answer, or the
// deny or continue that the agent's fail_open setting asks for.
func (s *Server) runChain(ctx context.Context, st *stream, phase agentv1.PolicyPhase, start time.Time, inBody bool) chainResult {
	route := st.route
	st.phase = phase
	ch := &route.request
	if phase == agentv1.PolicyPhase_RESPONSE {
		ch = &route.response
	}
	if ch.static != nil && st.part == partAll && !inBody && st.explain == nil && route.agent.healthy.Load() {
		return s.runStatic(st, ch.static, start)
	}
	cfg := st.snap.Config
	// The request is pooled apart from the stream: it is only read while it is sent, and a
	// stream waiting for its upstream's response does not hold one.
	call := agentCalls.Get().(*agentCall)
	req := &call.req
	*req = agentv1.PolicyRequest{
		RequestId: st.requestID,
		Policies:  ch.part(st.part),
		Context:   st.reqCtx,
		Phase:     phase,
		State:     st.state,
		RouteName: route.Name,
		Explain:   st.explain != nil,
		ChainId:   ch.ids[st.part],
	}
	if phase == agentv1.PolicyPhase_RESPONSE {
		call.resp = agentv1.ResponseContext{Headers: st.respHeaders, StatusCode: st.respStatus, Body: st.responseBody()}
		req.Response = &call.resp
		if ch.noRequest {
			req.Context = nil
		}
	}
	agent := route.agent
	span := st.traceCall(req, agent.cfg.Name)
	resp, err := s.callAgent(ctx, agent, req, start, cfg.Server.MessageTimeoutMS)
	s.logCall(st, agent, phase, resp, err, start)
	if st.explain != nil {
		st.explain.add(phase, resp)
	}
	// The request went out encoded: let go of what it points to (the request context, the
	// received message its strings point into) while the stream waits for its next message.
	callID := req.GetCallId()
	*req = agentv1.PolicyRequest{}
	call.resp = agentv1.ResponseContext{}
	agentCalls.Put(call)
	endCallSpan(span, resp, err)
	defer route.metrics.duration.UpdateDuration(start)
	if err != nil {
		if ctx.Err() != nil {
			// Envoy ended the stream while the agent was deciding, its normal way of ending a
			// request that is gone: no one waits for this answer, and it is no agent failure.
			return chainResult{immediate: denial(cfg.Server.StatusOnError, "stream_ended", "the stream ended before the policy agent decided")}
		}
		if !agentUnreachable(err) {
			return s.invalidReply(st, err)
		}
		return s.agentFailed(st, agent, err)
	}
	if msg := route.stale(); msg != "" {
		return s.staleRoute(st, msg)
	}
	if resp.GetStatus() == nil {
		return s.invalidReply(st, errors.New("reply without a status"))
	}
	if resp.GetCallId() != callID {
		return s.invalidReply(st, errors.New("reply for another call"))
	}
	switch resp.GetStatus().GetCode() {
	case agentv1.StatusCode_OK, agentv1.StatusCode_POLICY_DENIED:
	case agentv1.StatusCode_TIMEOUT:
		return s.agentFailed(st, agent, context.DeadlineExceeded)
	case agentv1.StatusCode_POLICY_ERROR:
		st.outcome(statusError)
		if s.policyLog.Allow() {
			s.log.Error().Str("route", route.Name).Str("request_id", st.requestID).
				Str("policy", resp.GetStatus().GetPolicyName()).Str("error", resp.GetMessage()).Msg("policy failed; request denied")
		}
		return chainResult{immediate: denial(cfg.Server.StatusOnError, "policy_error", "a policy failed")}
	case agentv1.StatusCode_CHAIN_UNKNOWN:
		// Sent again with the policies by the client; an agent that still does not know the
		// chain cannot be trusted with it.
		return s.invalidReply(st, errors.New("the agent does not keep the chain it was sent"))
	default:
		return s.invalidReply(st, errors.New("unknown status code"))
	}
	m, err := buildMutation(phase, resp.GetInstructions(), st.setState)
	if err != nil {
		return s.invalidReply(st, err)
	}
	if resp.GetStatus().GetCode() == agentv1.StatusCode_POLICY_DENIED && m.immediate == nil {
		m.immediate = denial(403, "forbidden", "denied by policy")
	}
	res := chainResult{immediate: m.immediate}
	if res.immediate == nil {
		res.common = m.common(inBody)
		st.outcome(statusAllow)
	} else {
		st.outcome(statusDeny)
	}
	s.dropped(route, m.dropped)
	return res
}

// dropped counts the mutations of a reply that Envoy would have rejected, and logs them once
// per route.
func (s *Server) dropped(route *Route, dropped []string) {
	if len(dropped) == 0 {
		return
	}
	route.metrics.rejected.Add(len(dropped))
	if route.droppedLogged.CompareAndSwap(false, true) {
		s.log.Warn().Str("route", route.Name).Strs("dropped", dropped).
			Msg("dropped mutations that Envoy would reject (logged once per route)")
	}
}

// runStatic answers for a chain whose entries answer every request alike (chain.static): what
// the agent would have answered, without calling it. It serves while the agent's health check
// passes: an agent found down is called as before, so that its requests get the answer of an
// agent that is down (deny, or fail_open), as on any other route. A route whose agent has since
// been replaced by one that cannot run the chain is refused as on a call.
func (s *Server) runStatic(st *stream, sc *staticChain, start time.Time) chainResult {
	route := st.route
	defer route.metrics.duration.UpdateDuration(start)
	if msg := route.stale(); msg != "" {
		return s.staleRoute(st, msg)
	}
	st.outcome(statusAllow)
	s.dropped(route, sc.dropped)
	return chainResult{common: sc.common}
}

// outcome counts the result of the phase being run: policy_kernel_requests_total counts HTTP
// requests by the request phase's decision; response-phase decisions have their own counter.
func (st *stream) outcome(status string) {
	st.setResult(status)
	if st.part == partEarly && (status == statusAllow || status == statusFailOpen) {
		return // the part that reads the body decides; it is counted then
	}
	if st.phase == agentv1.PolicyPhase_RESPONSE {
		st.route.metrics.responses[status].Inc()
		return
	}
	st.route.metrics.requests[status].Inc()
}

func (st *stream) setState(k, v string) {
	if st.state == nil {
		st.state = make(map[string]string, 4)
	}
	// k and v point into the agent's reply batch, which holds other streams' replies too:
	// one copy of both keeps the stream from holding the batch until its response phase.
	kv := k + v
	st.state[kv[:len(k)]] = kv[len(k):]
}

// callAgent calls the agent within the message budget: each attempt gets the agent's
// timeout_ms or what is left of the budget, and a call is retried only when it never reached
// the agent, so no policy runs twice.
func (s *Server) callAgent(ctx context.Context, agent *agentState, req *agentv1.PolicyRequest, start time.Time, messageTimeoutMS int) (*agentv1.PolicyResponse, error) {
	// Answer Envoy a little before its message_timeout, so that our deny or continue wins.
	budget := time.Duration(messageTimeoutMS) * time.Millisecond * 9 / 10
	deadline := start.Add(budget)
	cfg := agent.cfg
	var lastErr error
	for attempt := 1; attempt <= cfg.Retry.MaxAttempts; attempt++ {
		remaining := time.Until(deadline)
		if remaining <= 0 {
			break
		}
		timeout := min(time.Duration(cfg.TimeoutMS)*time.Millisecond, remaining)
		req.DeadlineMs = timeout.Milliseconds()
		var (
			resp *agentv1.PolicyResponse
			err  error
		)
		called := time.Now()
		if te, ok := agent.client.(timeoutExecutor); ok {
			resp, err = te.ExecuteTimeout(ctx, req, timeout)
		} else {
			actx, cancel := context.WithTimeout(ctx, timeout)
			resp, err = agent.client.Execute(actx, req)
			cancel()
		}
		agent.metrics.calls.UpdateDuration(called)
		if err == nil {
			return resp, nil
		}
		lastErr = err
		if !errors.Is(err, ErrNotDelivered) || ctx.Err() != nil {
			break
		}
		backoff := time.Duration(cfg.Retry.BackoffMS*attempt) * time.Millisecond
		if time.Until(deadline) <= backoff {
			break
		}
		s.logRetry(agent, attempt, backoff, err)
		time.Sleep(backoff)
	}
	if lastErr == nil {
		lastErr = context.DeadlineExceeded
	}
	return nil, lastErr
}

// agentUnreachable reports whether a failed agent call is one that fail_open covers: the agent
// could not be reached, or did not answer in time. Any other failure means the agent was reached
// and the exchange broke (a reply that did not marshal or unmarshal, one over the size limit, a
// handler error, no agent service at the socket); continuing then would let a request that
// breaks the agent bypass its policies, so it is an invalid agent response.
func agentUnreachable(err error) bool {
	if errors.Is(err, ErrNotDelivered) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return true
	}
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled:
		return true
	}
	return false
}

// agentFailed answers for an agent that could not be asked: continue when the agent is
// fail-open, else deny.
func (s *Server) agentFailed(st *stream, agent *agentState, err error) chainResult {
	route := st.route
	timeout := errors.Is(err, context.DeadlineExceeded) || status.Code(err) == codes.DeadlineExceeded
	if timeout {
		agent.metrics.timeouts.Inc()
	} else {
		agent.metrics.unavailable.Inc()
	}
	if s.agentLog.Allow() {
		// A timeout is the agent being slow, which fail_open or the deny covers: a warning;
		// an agent that cannot be reached at all is an error.
		ev := s.log.Error()
		if timeout {
			ev = s.log.Warn()
		}
		ev.Str("agent", agent.cfg.Name).Str("route", route.Name).Str("request_id", st.requestID).
			Bool("timeout", timeout).Bool("fail_open", agent.cfg.FailOpen).Str("error", err.Error()).Msg("policy agent call failed")
	}
	if agent.cfg.FailOpen {
		st.outcome(statusFailOpen)
		return chainResult{common: stripOwned(st)}
	}
	st.outcome(statusError)
	code := "policy_agent_unavailable"
	if timeout {
		code = "policy_agent_timeout"
	}
	return chainResult{immediate: denial(st.snap.Config.Server.StatusOnError, code, "the policy agent could not decide")}
}

// stripOwned is what a fail-open request phase still changes without the agent: it removes the
// client's own copies of the request headers the chain's policies set from what they verified
// (an identity header such as x-user-id, in any spelling an upstream may read as that name), as
// the agent does before every request chain, so that a client cannot pass its own value off as
// the policy's while the agent is down. nil when there is nothing to remove.
func stripOwned(st *stream) *extprocv3.CommonResponse {
	owned := st.route.request.owned
	if st.phase != agentv1.PolicyPhase_REQUEST || len(owned) == 0 || st.reqCtx == nil {
		return nil
	}
	var remove []string
	for k := range st.reqCtx.Headers {
		for _, o := range owned {
			if headers.SameName(k, o) {
				remove = append(remove, strings.Clone(k))
				break
			}
		}
	}
	if len(remove) == 0 {
		return nil
	}
	return &extprocv3.CommonResponse{HeaderMutation: &extprocv3.HeaderMutation{RemoveHeaders: remove}}
}

// invalidReply answers for an agent reply the kernel cannot act on: deny with 500, whatever
// fail_open says, because the agent was reached and said something wrong (§3.5).
func (s *Server) invalidReply(st *stream, err error) chainResult {
	st.outcome(statusError)
	if s.replyLog.Allow() {
		s.log.Error().Str("route", st.route.Name).Str("request_id", st.requestID).Str("error", err.Error()).Msg("invalid agent response; request denied")
	}
	return chainResult{immediate: denial(500, "invalid_agent_response", "the policy agent answered something the kernel cannot apply")}
}
