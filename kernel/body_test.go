package kernel

import (
	"context"
	"strings"
	"testing"
	"time"

	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// bodyConfig adds routes whose chains read a body between other entries.
var bodyConfig = strings.Replace(baseConfig, "  default_policy:\n", `    - route_name: /split
      request_policy_chain:
        - policy: auth
        - policy: reqBody
        - policy: auth
          metadata: {after: "1"}
    - route_name: /respsplit
      response_policy_chain:
        - policy: hdr
        - policy: respBody
        - policy: lean
  default_policy:
`, 1)

// withModes puts Envoy's configured body modes on a first message, as protocol_config.
func withModes(r *extprocv3.ProcessingRequest, req, resp filterv3.ProcessingMode_BodySendMode) *extprocv3.ProcessingRequest {
	r.ProtocolConfig = &extprocv3.ProtocolConfiguration{RequestBodyMode: req, ResponseBodyMode: resp}
	return r
}

func chunk(b string, eos bool, response bool) *extprocv3.ProcessingRequest {
	body := &extprocv3.HttpBody{Body: []byte(b), EndOfStream: eos}
	if response {
		return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{ResponseBody: body}}
	}
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: body}}
}

func trailers(response bool) *extprocv3.ProcessingRequest {
	if response {
		return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseTrailers{ResponseTrailers: &extprocv3.HttpTrailers{}}}
	}
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestTrailers{RequestTrailers: &extprocv3.HttpTrailers{}}}
}

// push sends a message whose reply is held: none may come.
func (f *fakeStream) push(t *testing.T, r *extprocv3.ProcessingRequest) {
	t.Helper()
	f.in <- r
	select {
	case resp := <-f.out:
		t.Fatalf("a held chunk was answered: %v", resp)
	case <-time.After(20 * time.Millisecond):
	}
}

// recv waits for a reply.
func (f *fakeStream) recv(t *testing.T) *extprocv3.ProcessingResponse {
	t.Helper()
	select {
	case r := <-f.out:
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("no reply within 5s")
	}
	return nil
}

func policyNames(ps []*agentv1.Policy) string {
	var names []string
	for _, p := range ps {
		names = append(names, p.GetName()+p.GetMetadata()["after"])
	}
	return strings.Join(names, ",")
}

func errorCodeOf(r *extprocv3.ProcessingResponse) string {
	ir := r.GetImmediateResponse()
	if ir == nil {
		return ""
	}
	return ir.GetDetails()
}

func TestChainSplitKeepsOrder(t *testing.T) {
	k := newTestKernel(t, bodyConfig, &fakeAgent{})
	snap := k.s.Snapshot()
	f := func(route string, response bool, early, late string) {
		t.Helper()
		r, _ := snap.routes.ByName(route)
		c := &r.request
		if response {
			c = &r.response
		}
		if got := policyNames(c.early); got != early {
			t.Errorf("%s: early %q, want %q", route, got, early)
		}
		if got := policyNames(c.late); got != late {
			t.Errorf("%s: late %q, want %q", route, got, late)
		}
	}
	f("/split", false, "auth", "reqBody,auth1")
	f("/respsplit", true, "hdr", "respBody,lean")
	f("/upload", false, "", "reqBody")
	f("/api/v1/users", false, "", "") // no body: never split
}

func TestModeForBodyModes(t *testing.T) {
	k := newTestKernel(t, bodyConfig, &fakeAgent{})
	r, _ := k.s.Snapshot().routes.ByName("/split")
	f := func(req, resp, wantReq filterv3.ProcessingMode_BodySendMode) {
		t.Helper()
		m := r.modeFor(req, resp)
		if m.GetRequestBodyMode() != wantReq || m.GetRequestTrailerMode() != filterv3.ProcessingMode_SEND || m.GetResponseBodyMode() != filterv3.ProcessingMode_NONE {
			t.Errorf("configured %v/%v: override %v", req, resp, m)
		}
	}
	f(filterv3.ProcessingMode_NONE, filterv3.ProcessingMode_NONE, filterv3.ProcessingMode_BUFFERED)
	f(filterv3.ProcessingMode_BUFFERED, filterv3.ProcessingMode_STREAMED, filterv3.ProcessingMode_BUFFERED)
	f(filterv3.ProcessingMode_STREAMED, filterv3.ProcessingMode_NONE, filterv3.ProcessingMode_STREAMED)
	f(filterv3.ProcessingMode_BUFFERED_PARTIAL, filterv3.ProcessingMode_NONE, filterv3.ProcessingMode_BUFFERED)
}

func TestRequestBodyNeverSent(t *testing.T) {
	fa := &fakeAgent{}
	k := newTestKernel(t, bodyConfig, fa)
	route, _ := k.s.Snapshot().routes.ByName("/upload")
	f := func(name string, msgs []*extprocv3.ProcessingRequest, want string, missing uint64) {
		t.Helper()
		before := route.metrics.bodyMissing[0].Get()
		st := k.open(t)
		st.send(t, reqHeaders("/upload", false, ""))
		var r *extprocv3.ProcessingResponse
		for _, m := range msgs {
			r = st.send(t, m)
		}
		st.end(t)
		if got := errorCodeOf(r); got != want {
			t.Errorf("%s: %q, want %q (%v)", name, got, want, r)
		}
		if n := route.metrics.bodyMissing[0].Get() - before; n != missing {
			t.Errorf("%s: %d missing bodies counted, want %d", name, n, missing)
		}
	}
	f("response headers", []*extprocv3.ProcessingRequest{respHeaders("200", false)}, "request_body_not_received", 1)
	f("trailers, body mode unknown", []*extprocv3.ProcessingRequest{trailers(false)}, "request_body_not_received", 1)
	if fa.ncalls() != 0 {
		t.Fatalf("the chain ran %d times without its body", fa.ncalls())
	}
	// A stream that ends while the chain waits is counted too.
	before := route.metrics.bodyMissing[0].Get()
	st := k.open(t)
	st.send(t, reqHeaders("/upload", false, ""))
	st.end(t)
	if n := route.metrics.bodyMissing[0].Get() - before; n != 1 {
		t.Errorf("stream ended: %d counted, want 1", n)
	}
	if !strings.Contains(k.logs.String(), "before the body that the chain reads") {
		t.Errorf("not logged: %s", k.logs.String())
	}
}

func TestTrailersMeanAnEmptyBufferedBody(t *testing.T) {
	fa := &fakeAgent{fn: func(_ context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		if len(req.GetContext().GetBody()) != 0 {
			return nil, context.Canceled
		}
		if req.GetContext().GetHeaders()["x-set"] == "1" {
			return ok(setHeader("x-user", "u")), nil
		}
		return ok(), nil
	}}
	k := newTestKernel(t, bodyConfig, fa)
	st := k.open(t)
	st.send(t, withModes(reqHeaders("/upload", false, ""), filterv3.ProcessingMode_BUFFERED, filterv3.ProcessingMode_NONE))
	if r := st.send(t, trailers(false)); r.GetRequestTrailers() == nil || fa.ncalls() != 1 {
		t.Fatalf("%v, %d calls", r, fa.ncalls())
	}
	st.end(t)
	// A header change cannot ride on a trailers reply: refused, not dropped.
	st = k.open(t)
	st.send(t, withModes(reqHeaders("/upload", false, "", "x-set", "1"), filterv3.ProcessingMode_BUFFERED, filterv3.ProcessingMode_NONE))
	if r := st.send(t, trailers(false)); errorCodeOf(r) != "headers_already_sent" {
		t.Fatalf("%v", r)
	}
	st.end(t)
}

func TestStreamedRequestBodyJudgedWhole(t *testing.T) {
	fa := &fakeAgent{fn: func(_ context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		switch b := string(req.GetContext().GetBody()); {
		case b == "":
			return ok(setHeader("x-user", "u")), nil
		case strings.Contains(b, "evil"):
			return ok(immediateIns(403, nil, "no")), nil
		case b == "upper":
			return ok(setBody("UPPER")), nil
		case b == "hdr":
			return ok(setHeader("x-late", "1")), nil
		}
		return ok(), nil
	}}
	k := newTestKernel(t, bodyConfig, fa)
	open := func() *fakeStream {
		st := k.open(t)
		r := st.send(t, withModes(reqHeaders("/split", false, ""), filterv3.ProcessingMode_STREAMED, filterv3.ProcessingMode_NONE))
		if setHeadersOf(t, r.GetRequestHeaders().GetResponse().GetHeaderMutation())["x-user"] != "u" || r.GetModeOverride().GetRequestBodyMode() != filterv3.ProcessingMode_STREAMED {
			t.Fatalf("headers reply %v", r)
		}
		return st
	}
	calls := fa.ncalls()
	st := open()
	if got := policyNames(fa.call(calls).GetPolicies()); got != "auth" {
		t.Fatalf("on the headers: %s", got)
	}
	st.push(t, chunk("ev", false, false))
	r := st.send(t, chunk("il", true, false))
	if r.GetImmediateResponse().GetStatus().GetCode() != 403 {
		t.Fatalf("%v", r)
	}
	last := fa.call(fa.ncalls() - 1)
	if got := policyNames(last.GetPolicies()); got != "reqBody,auth1" || string(last.GetContext().GetBody()) != "evil" || last.GetContext().GetHeaders()["x-user"] != "u" {
		t.Fatalf("on the body: %s %q, headers %v", got, last.GetContext().GetBody(), last.GetContext().GetHeaders())
	}
	st.end(t)

	// Allowed with a new body: the held replies go out in order, the first with the body.
	st = open()
	st.push(t, chunk("up", false, false))
	st.push(t, chunk("pe", false, false))
	st.in <- chunk("r", true, false)
	var bodies []string
	for range 3 {
		r := st.recv(t)
		bm := r.GetRequestBody().GetResponse().GetBodyMutation()
		if r.GetRequestBody() == nil || r.GetRequestBody().GetResponse().GetHeaderMutation() != nil {
			t.Fatalf("%v", r)
		}
		bodies = append(bodies, string(bm.GetBody())+map[bool]string{true: "<clear>"}[bm.GetClearBody()])
	}
	if got := strings.Join(bodies, "|"); got != "UPPER|<clear>|<clear>" {
		t.Fatalf("replies %s", got)
	}
	st.end(t)

	// A header change after the headers went upstream: refused.
	st = open()
	if r := st.send(t, chunk("hdr", true, false)); errorCodeOf(r) != "headers_already_sent" {
		t.Fatalf("%v", r)
	}
	st.end(t)
}

func TestStreamedBodyOverTheCap(t *testing.T) {
	cfg := strings.Replace(bodyConfig, "policy_kernel:\n", "policy_kernel:\n  server:\n    max_body_size_bytes: 4\n", 1)
	fa := &fakeAgent{}
	k := newTestKernel(t, cfg, fa)
	st := k.open(t)
	st.send(t, withModes(reqHeaders("/upload", false, ""), filterv3.ProcessingMode_STREAMED, filterv3.ProcessingMode_NONE))
	st.push(t, chunk("123", false, false))
	if r := st.send(t, chunk("45", false, false)); r.GetImmediateResponse().GetStatus().GetCode() != 413 || fa.ncalls() != 0 {
		t.Fatalf("%v", r)
	}
	st.end(t)
	st = k.open(t)
	st.send(t, withModes(reqHeaders("/download", false, ""), filterv3.ProcessingMode_NONE, filterv3.ProcessingMode_STREAMED))
	st.send(t, respHeaders("200", false))
	if r := st.send(t, chunk("12345", true, true)); r.GetImmediateResponse().GetStatus().GetCode() != 500 || fa.ncalls() != 0 {
		t.Fatalf("%v", r)
	}
	st.end(t)
}

func TestResponseChainSplitOnHeaders(t *testing.T) {
	fa := &fakeAgent{fn: func(_ context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		if req.GetResponse().GetBody() == nil {
			return ok(setHeader("x-frame-options", "DENY")), nil
		}
		return ok(setBody("new")), nil
	}}
	k := newTestKernel(t, bodyConfig, fa)
	route, _ := k.s.Snapshot().routes.ByName("/respsplit")
	// Envoy's configured mode may send no body: the entries before the body reader run on
	// the headers, the rest on the body, seeing the first ones' header changes.
	st := k.open(t)
	st.send(t, reqHeaders("/respsplit", true, ""))
	r := st.send(t, respHeaders("200", false))
	if setHeadersOf(t, r.GetResponseHeaders().GetResponse().GetHeaderMutation())["x-frame-options"] != "DENY" {
		t.Fatalf("%v", r)
	}
	if got := policyNames(fa.call(0).GetPolicies()); got != "hdr" {
		t.Fatalf("on the headers: %s", got)
	}
	r = st.send(t, respBody("old"))
	last := fa.call(1)
	if string(r.GetResponseBody().GetResponse().GetBodyMutation().GetBody()) != "new" || policyNames(last.GetPolicies()) != "respBody,lean" || last.GetResponse().GetHeaders()["x-frame-options"] != "DENY" {
		t.Fatalf("%v; late run %v", r, last)
	}
	st.end(t)
	if n := route.metrics.responses[statusAllow].Get(); n != 1 {
		t.Fatalf("response phase counted %d times, want once", n)
	}

	// Envoy buffers the response body: one run on it.
	st = k.open(t)
	st.send(t, withModes(reqHeaders("/respsplit", true, ""), filterv3.ProcessingMode_NONE, filterv3.ProcessingMode_BUFFERED))
	if r := st.send(t, respHeaders("200", false)); r.GetResponseHeaders().GetResponse() != nil {
		t.Fatalf("%v", r)
	}
	st.send(t, respBody("old"))
	if got := policyNames(fa.call(fa.ncalls() - 1).GetPolicies()); got != "hdr,respBody,lean" {
		t.Fatalf("buffered: %s", got)
	}
	st.end(t)

	// Trailers instead of the body: refused and counted.
	before := route.metrics.bodyMissing[1].Get()
	st = k.open(t)
	st.send(t, reqHeaders("/respsplit", true, ""))
	st.send(t, respHeaders("200", false))
	if r := st.send(t, trailers(true)); errorCodeOf(r) != "response_body_not_received" || r.GetImmediateResponse().GetStatus().GetCode() != 500 {
		t.Fatalf("%v", r)
	}
	st.end(t)
	if route.metrics.bodyMissing[1].Get() != before+1 {
		t.Fatal("missing response body not counted")
	}
}

func TestFullDuplexBodyRefused(t *testing.T) {
	fa := &fakeAgent{}
	k := newTestKernel(t, bodyConfig, fa)
	st := k.open(t)
	r := st.send(t, withModes(reqHeaders("/upload", false, ""), filterv3.ProcessingMode_FULL_DUPLEX_STREAMED, filterv3.ProcessingMode_NONE))
	if errorCodeOf(r) != "unsupported_body_mode" || fa.ncalls() != 0 {
		t.Fatalf("%v", r)
	}
	st.end(t)
	// A route that reads no body is not affected.
	st = k.open(t)
	if r := st.send(t, withModes(reqHeaders("/api/v1/users", true, ""), filterv3.ProcessingMode_FULL_DUPLEX_STREAMED, filterv3.ProcessingMode_NONE)); r.GetRequestHeaders() == nil {
		t.Fatalf("%v", r)
	}
	st.end(t)
}

func TestHeldChunksRefusedBeforeEnvoysTimeout(t *testing.T) {
	fa := &fakeAgent{}
	k := newTestKernel(t, bodyConfig, fa) // message_timeout_ms 200: the guard fires at 180 ms
	route, _ := k.s.Snapshot().routes.ByName("/upload")
	st := k.open(t)
	st.send(t, withModes(reqHeaders("/upload", false, ""), filterv3.ProcessingMode_STREAMED, filterv3.ProcessingMode_NONE))
	start := time.Now()
	st.in <- chunk("ab", false, false)
	r := st.recv(t)
	if d := time.Since(start); errorCodeOf(r) != "request_body_incomplete" || d < 150*time.Millisecond {
		t.Fatalf("after %v: %v", d, r)
	}
	// A message still in flight is not answered again.
	st.in <- chunk("cd", true, false)
	select {
	case r := <-st.out:
		t.Fatalf("answered after the refusal: %v", r)
	case <-time.After(50 * time.Millisecond):
	}
	st.end(t)
	if fa.ncalls() != 0 || route.metrics.bodyMissing[0].Get() != 1 || route.metrics.requests[statusError].Get() != 1 {
		t.Fatalf("calls %d, missing %d, errors %d", fa.ncalls(), route.metrics.bodyMissing[0].Get(), route.metrics.requests[statusError].Get())
	}
	// Chunks that keep coming re-arm it: no refusal while the body flows.
	st = k.open(t)
	st.send(t, withModes(reqHeaders("/upload", false, ""), filterv3.ProcessingMode_STREAMED, filterv3.ProcessingMode_NONE))
	for range 4 {
		st.push(t, chunk("x", false, false))
		time.Sleep(100 * time.Millisecond)
	}
	if r := st.send(t, chunk("y", true, false)); r.GetRequestBody() == nil {
		t.Fatalf("%v", r)
	}
	for range 4 {
		st.recv(t)
	}
	st.end(t)
}

func TestSecondBodyChunkAfterJudgedBodyRefused(t *testing.T) {
	fa := &fakeAgent{}
	k := newTestKernel(t, bodyConfig, fa)
	// No protocol_config: the kernel takes the first body message for the whole body.
	st := k.open(t)
	st.send(t, reqHeaders("/upload", false, ""))
	if r := st.send(t, chunk("ab", false, false)); r.GetRequestBody() == nil {
		t.Fatalf("%v", r)
	}
	if r := st.send(t, chunk("cd", true, false)); errorCodeOf(r) != "body_not_judged_whole" {
		t.Fatalf("%v", r)
	}
	st.end(t)
	// A route that does not read the body lets its chunks through.
	st = k.open(t)
	st.send(t, reqHeaders("/api/v1/users", false, ""))
	for range 2 {
		if r := st.send(t, chunk("ab", false, false)); r.GetRequestBody() == nil {
			t.Fatalf("%v", r)
		}
	}
	st.end(t)
}
