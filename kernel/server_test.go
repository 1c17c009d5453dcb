package kernel

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

func TestRouteSelection(t *testing.T) {
	fa := &fakeAgent{}
	k := newTestKernel(t, baseConfig, fa)
	f := func(path, attr string, wantRoute string, wantHeader string) {
		t.Helper()
		before := fa.ncalls()
		st := k.open(t)
		st.send(t, reqHeaders(path, true, attr))
		st.end(t)
		if fa.ncalls() != before+1 {
			t.Fatalf("%s %q: agent calls %d → %d", path, attr, before, fa.ncalls())
		}
		c := fa.call(before)
		if c.GetRouteName() != wantRoute {
			t.Errorf("%s (attribute %q) → route %q, want %q", path, attr, c.GetRouteName(), wantRoute)
		}
		if wantHeader != "" && c.GetPolicies()[0].GetMetadata()["header_name"] != wantHeader {
			t.Errorf("%s: chain %v", path, c.GetPolicies())
		}
	}
	f("/api/v1/users", "", "/api/v1/users", "X-API-Key")
	f("/api/v1/users/7?x=1", "", "/api/v1/users", "X-API-Key")
	// The attribute wins over the path.
	f("/api/v1/users", "named-route", "named-route", "X-Other")
	// An attribute naming no route falls back to the path.
	f("/api/v1/users", "unknown", "/api/v1/users", "X-API-Key")
	f("/elsewhere", "", "default", "")
}

func TestRequestContextAndIDs(t *testing.T) {
	fa := &fakeAgent{}
	k := newTestKernel(t, baseConfig, fa)
	st := k.open(t)
	st.send(t, reqHeaders("/api/v1/users?id=1", true, "", "x-request-id", "req-42", "accept", "a", "accept", "b", "X-Mixed", "v"))
	st.end(t)
	c := fa.call(0)
	rc := c.GetContext()
	if rc.GetMethod() != "GET" || rc.GetPath() != "/api/v1/users?id=1" || rc.GetAuthority() != "example.com" || rc.GetScheme() != "http" || rc.GetClientIp() != "10.0.0.7" {
		t.Fatalf("pseudo-headers and client ip: %+v", rc)
	}
	if rc.GetHeaders()["accept"] != "a, b" || rc.GetHeaders()["x-mixed"] != "v" || rc.GetHeaders()[":path"] != "" {
		t.Fatalf("headers: %v", rc.GetHeaders())
	}
	if c.GetRequestId() != "req-42" || c.GetDeadlineMs() <= 0 || c.GetDeadlineMs() > 50 {
		t.Fatalf("request id %q, deadline %d", c.GetRequestId(), c.GetDeadlineMs())
	}
}

// TestResponseChainWithoutTheRequest: the request is not sent again in the response phase when
// no policy of the response chain reads it, and is when one does.
func TestResponseChainWithoutTheRequest(t *testing.T) {
	for _, c := range []struct {
		path     string
		wantSent bool
	}{
		{"/lean", false},
		{"/mixed", true},        // hdr reads the request
		{"/api/v1/users", true}, // hdr alone
	} {
		k := newTestKernel(t, baseConfig, &fakeAgent{})
		st := k.open(t)
		st.send(t, reqHeaders(c.path, false, "", "x-api-key", "k", "x-request-id", "rid-7"))
		st.send(t, respHeaders("200", true))
		last := k.agent.call(k.agent.ncalls() - 1)
		if last.GetRequestId() != "rid-7" {
			t.Errorf("%s: response phase request id %q, want rid-7", c.path, last.GetRequestId())
		}
		if last.GetPhase() != agentv1.PolicyPhase_RESPONSE || last.GetResponse().GetStatusCode() != 200 {
			t.Fatalf("%s: last call %v", c.path, last)
		}
		if sent := last.GetContext() != nil; sent != c.wantSent {
			t.Errorf("%s: request context sent in the response phase = %v, want %v", c.path, sent, c.wantSent)
		}
		if c.wantSent && last.GetContext().GetPath() != c.path {
			t.Errorf("%s: request context %v", c.path, last.GetContext())
		}
	}
}

func TestEmptyChainNeverCallsAgent(t *testing.T) {
	fa := &fakeAgent{}
	k := newTestKernel(t, baseConfig, fa)
	st := k.open(t)
	r := st.send(t, reqHeaders("/open", false, ""))
	// No response chain either: Envoy is asked to skip the response headers.
	if r.GetRequestHeaders() == nil || r.GetModeOverride().GetResponseHeaderMode() != filterv3.ProcessingMode_SKIP {
		t.Fatalf("reply %v", r)
	}
	// If Envoy sends them anyway (override not allowed), they pass.
	if r := st.send(t, respHeaders("200", true)); r.GetResponseHeaders() == nil || r.GetResponseHeaders().GetResponse() != nil {
		t.Fatalf("response reply %v", r)
	}
	if err := st.end(t); err != nil {
		t.Fatal(err)
	}
	if fa.ncalls() != 0 {
		t.Fatalf("agent called %d times for empty chains", fa.ncalls())
	}
}

func TestNoRouteNoDefault(t *testing.T) {
	fa := &fakeAgent{}
	k := newTestKernel(t, strings.Split(baseConfig, "  default_policy:")[0], fa)
	st := k.open(t)
	r := st.send(t, reqHeaders("/nowhere", true, ""))
	if r.GetRequestHeaders() == nil || r.GetModeOverride().GetResponseHeaderMode() != filterv3.ProcessingMode_SKIP || fa.ncalls() != 0 {
		t.Fatalf("reply %v, calls %d", r, fa.ncalls())
	}
	st.end(t)
}

func TestAllowWithHeaderMutations(t *testing.T) {
	fa := &fakeAgent{fn: func(_ context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		return ok(
			setHeader("X-User-ID", "u1"),
			setHeader("x-gone", "1"), removeHeader("x-gone"),
			removeHeader("x-back"), appendHeader("x-back", "2"),
			setHeader("x-multi", "1"), appendHeader("x-multi", "2"),
			removeHeader("x-api-key"),
			setHeader(":path", "/rewritten"),
		), nil
	}}
	k := newTestKernel(t, baseConfig, fa)
	st := k.open(t)
	r := st.send(t, reqHeaders("/api/v1/users", true, ""))
	hm := r.GetRequestHeaders().GetResponse().GetHeaderMutation()
	got := setHeadersOf(t, hm)
	want := map[string]string{"x-user-id": "u1", "x-back": "2", "x-multi": "+2", ":path": "/rewritten"}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("set %s = %q, want %q (all: %v)", k, got[k], v, got)
		}
	}
	if _, ok := got["x-gone"]; ok {
		t.Error("set then remove must not set")
	}
	rm := strings.Join(hm.GetRemoveHeaders(), ",")
	if rm != "x-gone,x-api-key" {
		t.Errorf("remove_headers = %q", rm)
	}
	// x-multi: set 1 then append 2 → one overwrite and one append.
	n := 0
	for _, o := range hm.GetSetHeaders() {
		if o.GetHeader().GetKey() == "x-multi" {
			n++
		}
	}
	if n != 2 {
		t.Errorf("x-multi operations %d, want 2", n)
	}
	st.end(t)
}

func TestDisallowedMutationsDroppedAndCounted(t *testing.T) {
	fa := &fakeAgent{fn: func(context.Context, *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		return ok(
			setHeader("host", "evil"), setHeader(":authority", "evil"), setHeader(":method", "POST"), setHeader(":scheme", "https"),
			setHeader("x-envoy-upstream-rq-timeout-ms", "1"), setHeader(":status", "200"),
			setHeader("x-bad", "a\r\nInjected: 1"), setHeader("x-nul", "a\x00"), setHeader("bad name", "v"),
			setHeader(":path", "no-slash"),
			removeHeader(":path"), removeHeader("host"), removeHeader("x-envoy-foo"),
			setHeader("x-fine", "ok"),
		), nil
	}}
	k := newTestKernel(t, baseConfig, fa)
	st := k.open(t)
	r := st.send(t, reqHeaders("/api/v1/users", true, ""))
	hm := r.GetRequestHeaders().GetResponse().GetHeaderMutation()
	got := setHeadersOf(t, hm)
	if len(got) != 1 || got["x-fine"] != "ok" || len(hm.GetRemoveHeaders()) != 0 {
		t.Fatalf("only x-fine may pass: set %v remove %v", got, hm.GetRemoveHeaders())
	}
	st.end(t)
	rm := k.s.Snapshot().routes
	route, _ := rm.ByName("/api/v1/users")
	if n := route.metrics.rejected.Get(); n != 13 {
		t.Fatalf("rejected mutations counted %d, want 13", n)
	}
	if c := strings.Count(k.logs.String(), "dropped mutations"); c != 1 {
		t.Fatalf("dropped mutations logged %d times, want once per route", c)
	}
	// A second request drops again, counts again, logs nothing more.
	st = k.open(t)
	st.send(t, reqHeaders("/api/v1/users", true, ""))
	st.end(t)
	if c := strings.Count(k.logs.String(), "dropped mutations"); c != 1 || route.metrics.rejected.Get() != 26 {
		t.Fatalf("logged %d, counted %d", c, route.metrics.rejected.Get())
	}
}

func TestDenyBecomesImmediateResponse(t *testing.T) {
	fa := &fakeAgent{fn: func(context.Context, *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		r := ok(setHeader("x-ignored", "1"), immediateIns(401, map[string]string{"WWW-Authenticate": "API-Key", "content-type": "application/json", "x-bad": "a\nb", ":status": "500"}, `{"error":"unauthorized"}`))
		r.Status.Code = agentv1.StatusCode_POLICY_DENIED
		return r, nil
	}}
	k := newTestKernel(t, baseConfig, fa)
	st := k.open(t)
	r := st.send(t, reqHeaders("/api/v1/users", true, ""))
	ir := r.GetImmediateResponse()
	if ir == nil || ir.GetStatus().GetCode() != 401 || string(ir.GetBody()) != `{"error":"unauthorized"}` || ir.GetDetails() != "unauthorized_by_policy" {
		t.Fatalf("immediate %v", r)
	}
	hs := setHeadersOf(t, ir.GetHeaders())
	if hs["www-authenticate"] != "API-Key" || hs["content-type"] != "application/json" || len(hs) != 2 {
		t.Fatalf("immediate headers %v", hs)
	}
	st.end(t)
	route, _ := k.s.Snapshot().routes.ByName("/api/v1/users")
	if route.metrics.requests[statusDeny].Get() != 1 {
		t.Fatal("deny not counted")
	}
}

func TestDeniedWithoutImmediateGets403(t *testing.T) {
	fa := &fakeAgent{fn: func(context.Context, *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		return &agentv1.PolicyResponse{Status: &agentv1.ResponseStatus{Code: agentv1.StatusCode_POLICY_DENIED}}, nil
	}}
	k := newTestKernel(t, baseConfig, fa)
	st := k.open(t)
	r := st.send(t, reqHeaders("/api/v1/users", true, ""))
	if r.GetImmediateResponse().GetStatus().GetCode() != 403 {
		t.Fatalf("%v", r)
	}
	st.end(t)
}

func jsonErrorOf(t *testing.T, ir *extprocv3.ImmediateResponse) string {
	t.Helper()
	var b struct {
		Error string `json:"error"`
	}
	if err := json.Unmarshal(ir.GetBody(), &b); err != nil {
		t.Fatalf("body %q: %v", ir.GetBody(), err)
	}
	return b.Error
}

func TestAgentFailures(t *testing.T) {
	f := func(failOpen bool, agentErr error, wantStatus int, wantCode string, wantCalls int) {
		t.Helper()
		cfg := baseConfig
		if failOpen {
			cfg = strings.Replace(cfg, "timeout_ms: 50", "timeout_ms: 50\n      fail_open: true", 1)
		}
		fa := &fakeAgent{fn: func(ctx context.Context, _ *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
			if errors.Is(agentErr, context.DeadlineExceeded) {
				<-ctx.Done()
				return nil, status.Error(codes.DeadlineExceeded, "deadline")
			}
			return nil, agentErr
		}}
		k := newTestKernel(t, cfg, fa)
		st := k.open(t)
		start := time.Now()
		r := st.send(t, reqHeaders("/api/v1/users", true, ""))
		// The budget itself (90% of message_timeout_ms) is what DeadlineMs carries, checked
		// in TestRequestContextAndIDs; here only that the answer comes, with room for a
		// loaded machine under the race detector.
		if el := time.Since(start); el > time.Second {
			t.Errorf("answer took %v", el)
		}
		st.end(t)
		if fa.ncalls() != wantCalls {
			t.Errorf("agent called %d times, want %d", fa.ncalls(), wantCalls)
		}
		if wantStatus == 0 {
			if r.GetRequestHeaders() == nil {
				t.Fatalf("fail-open must continue: %v", r)
			}
			return
		}
		ir := r.GetImmediateResponse()
		if ir.GetStatus().GetCode() != int32ToCode(wantStatus) || jsonErrorOf(t, ir) != wantCode {
			t.Fatalf("got %v, want %d %s", r, wantStatus, wantCode)
		}
	}
	notDelivered := fmt.Errorf("%w: %w", ErrNotDelivered, status.Error(codes.Unavailable, "connection refused"))
	f(false, notDelivered, 500, "policy_agent_unavailable", 3)
	f(true, notDelivered, 0, "", 3)
	// Delivered but failed: never retried, a policy may have run.
	f(false, status.Error(codes.Unavailable, "transport is closing"), 500, "policy_agent_unavailable", 1)
	f(false, status.Error(codes.Internal, "boom"), 500, "invalid_agent_response", 1)
	f(true, status.Error(codes.Internal, "boom"), 500, "invalid_agent_response", 1)
	f(false, context.DeadlineExceeded, 500, "policy_agent_timeout", 1)
	f(true, context.DeadlineExceeded, 0, "", 1)
}

func int32ToCode(n int) (c typeStatusCode) { return typeStatusCode(n) }

func TestAgentTimeoutCounted(t *testing.T) {
	fa := &fakeAgent{fn: func(ctx context.Context, _ *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		<-ctx.Done()
		return nil, ctx.Err()
	}}
	k := newTestKernel(t, baseConfig, fa)
	st := k.open(t)
	st.send(t, reqHeaders("/api/v1/users", true, ""))
	st.end(t)
	if n := k.state.metrics.timeouts.Get(); n != 1 {
		t.Fatalf("timeouts %d", n)
	}
	// The agent reporting its own timeout counts the same way.
	fa.mu.Lock()
	fa.fn = func(context.Context, *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		return &agentv1.PolicyResponse{Status: &agentv1.ResponseStatus{Code: agentv1.StatusCode_TIMEOUT}}, nil
	}
	fa.mu.Unlock()
	st = k.open(t)
	r := st.send(t, reqHeaders("/api/v1/users", true, ""))
	st.end(t)
	if jsonErrorOf(t, r.GetImmediateResponse()) != "policy_agent_timeout" || k.state.metrics.timeouts.Get() != 2 {
		t.Fatalf("%v, timeouts %d", r, k.state.metrics.timeouts.Get())
	}
}

func TestRetryWithinBudget(t *testing.T) {
	var n atomic.Int32
	fa := &fakeAgent{fn: func(ctx context.Context, _ *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		if n.Add(1) < 3 {
			return nil, fmt.Errorf("%w: refused", ErrNotDelivered)
		}
		return ok(setHeader("x-ok", "1")), nil
	}}
	k := newTestKernel(t, baseConfig, fa)
	st := k.open(t)
	r := st.send(t, reqHeaders("/api/v1/users", true, ""))
	st.end(t)
	if setHeadersOf(t, r.GetRequestHeaders().GetResponse().GetHeaderMutation())["x-ok"] != "1" || n.Load() != 3 {
		t.Fatalf("third attempt should win: %v after %d", r, n.Load())
	}
}

func TestPolicyErrorAndInvalidReplies(t *testing.T) {
	f := func(name string, resp *agentv1.PolicyResponse, wantStatus int32, wantCode string) {
		t.Helper()
		cfg := strings.Replace(baseConfig, "timeout_ms: 50", "timeout_ms: 50\n      fail_open: true", 1)
		fa := &fakeAgent{fn: func(context.Context, *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) { return resp, nil }}
		k := newTestKernel(t, cfg, fa)
		st := k.open(t)
		r := st.send(t, reqHeaders("/api/v1/users", true, ""))
		st.end(t)
		ir := r.GetImmediateResponse()
		if int32(ir.GetStatus().GetCode()) != wantStatus || jsonErrorOf(t, ir) != wantCode {
			t.Fatalf("%s: got %v", name, r)
		}
	}
	f("policy error", &agentv1.PolicyResponse{Status: &agentv1.ResponseStatus{Code: agentv1.StatusCode_POLICY_ERROR, PolicyName: "auth"}, Message: "boom"}, 500, "policy_error")
	f("unknown status", &agentv1.PolicyResponse{Status: &agentv1.ResponseStatus{Code: agentv1.StatusCode(42)}}, 500, "invalid_agent_response")
	f("unknown instruction", ok(&agentv1.Instruction{Type: agentv1.InstructionType(77)}), 500, "invalid_agent_response")
	f("header without payload", ok(&agentv1.Instruction{Type: agentv1.InstructionType_SET_HEADER}), 500, "invalid_agent_response")
	f("state without key", ok(setState("", "v")), 500, "invalid_agent_response")
	f("immediate without payload", ok(&agentv1.Instruction{Type: agentv1.InstructionType_IMMEDIATE_RESPONSE}), 500, "invalid_agent_response")
	f("immediate with bad status", ok(immediateIns(99, nil, "")), 500, "invalid_agent_response")
	f("reply to another call", &agentv1.PolicyResponse{CallId: 9, Status: &agentv1.ResponseStatus{}}, 500, "invalid_agent_response")
}

func TestInvalidRouteDenied(t *testing.T) {
	fa := &fakeAgent{}
	k := newTestKernel(t, baseConfig, fa)
	snap := k.s.Snapshot()
	if len(snap.invalid) != 1 || !strings.Contains(snap.invalid[0], `route "/broken": policy "notThere" is not supported by agent "a"`) {
		t.Fatalf("invalid routes: %v", snap.invalid)
	}
	st := k.open(t)
	r := st.send(t, reqHeaders("/broken", true, ""))
	st.end(t)
	if ir := r.GetImmediateResponse(); ir.GetStatus().GetCode() != 500 || jsonErrorOf(t, ir) != "invalid_route" || fa.ncalls() != 0 {
		t.Fatalf("%v", r)
	}
	route, _ := snap.routes.ByName("/broken")
	if route.metrics.requests[statusInvalidRoute].Get() != 1 || !strings.Contains(k.logs.String(), "request on an invalid route denied") {
		t.Fatal("invalid route not counted or logged")
	}
}

func TestResponsePhaseUsesRequestRouteAndState(t *testing.T) {
	fa := &fakeAgent{fn: func(_ context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		if req.GetPhase() == agentv1.PolicyPhase_REQUEST {
			return ok(setState("user_id", "u1"), setHeader("x-user-id", "u1")), nil
		}
		return ok(setHeader("X-Frame-Options", "DENY"), setHeader(":status", "201"), removeHeader("server")), nil
	}}
	k := newTestKernel(t, baseConfig, fa)
	st := k.open(t)
	r := st.send(t, reqHeaders("/api/v1/users", false, ""))
	if r.GetModeOverride() != nil {
		t.Fatalf("a route with a response chain and no bodies keeps Envoy's mode: %v", r.GetModeOverride())
	}
	// A reload between the phases must not change the stream's route.
	k.s.Store(buildSnapshot(k.s.Snapshot().Config, "v2", k.s.Snapshot().agents, k.m))
	k.s.Snapshot().routes = k.s.Snapshot().routes // the new snapshot is current now
	r = st.send(t, respHeaders("200", true, "server", "upstream", "x-a", "1", "x-a", "2"))
	hm := r.GetResponseHeaders().GetResponse().GetHeaderMutation()
	hs := setHeadersOf(t, hm)
	if hs["x-frame-options"] != "DENY" || hs[":status"] != "201" || strings.Join(hm.GetRemoveHeaders(), ",") != "server" {
		t.Fatalf("response mutations %v %v", hs, hm.GetRemoveHeaders())
	}
	st.end(t)
	c := fa.call(1)
	if c.GetPhase() != agentv1.PolicyPhase_RESPONSE || c.GetRouteName() != "/api/v1/users" || c.GetState()["user_id"] != "u1" {
		t.Fatalf("response call %v", c)
	}
	if c.GetResponse().GetStatusCode() != 200 || c.GetResponse().GetHeaders()["x-a"] != "1, 2" || c.GetContext().GetPath() != "/api/v1/users" {
		t.Fatalf("response context %v", c.GetResponse())
	}
}

func TestRequestBodyPhase(t *testing.T) {
	fa := &fakeAgent{fn: func(_ context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		switch string(req.GetContext().GetBody()) {
		case "":
			return ok(), nil
		case `{"a":1}`:
		default:
			return nil, errors.New("wrong body sent")
		}
		return ok(setBody(`{"a":2}`), setHeader("x-checked", "1")), nil
	}}
	k := newTestKernel(t, baseConfig, fa)
	st := k.open(t)
	r := st.send(t, reqHeaders("/upload", false, "", "content-length", "7"))
	m := r.GetModeOverride()
	if m.GetRequestBodyMode() != filterv3.ProcessingMode_BUFFERED || m.GetResponseHeaderMode() != filterv3.ProcessingMode_SKIP || r.GetRequestHeaders().GetResponse() != nil {
		t.Fatalf("headers reply %v", r)
	}
	if fa.ncalls() != 0 {
		t.Fatal("the chain ran before its body arrived")
	}
	r = st.send(t, reqBody(`{"a":1}`))
	c := r.GetRequestBody().GetResponse()
	if string(c.GetBodyMutation().GetBody()) != `{"a":2}` || setHeadersOf(t, c.GetHeaderMutation())["x-checked"] != "1" {
		t.Fatalf("body reply %v", r)
	}
	if strings.Join(c.GetHeaderMutation().GetRemoveHeaders(), ",") != "content-length" {
		t.Fatalf("content-length must go when the body changes: %v", c.GetHeaderMutation().GetRemoveHeaders())
	}
	st.end(t)

	// A request without a body runs the chain on its headers.
	st = k.open(t)
	r = st.send(t, reqHeaders("/upload", true, ""))
	if r.GetRequestHeaders() == nil || fa.ncalls() != 2 {
		t.Fatalf("%v, calls %d", r, fa.ncalls())
	}
	st.end(t)
}

func TestBodyLimits(t *testing.T) {
	cfg := strings.Replace(baseConfig, "policy_kernel:\n", "policy_kernel:\n  server:\n    max_body_size_bytes: 4\n", 1)
	fa := &fakeAgent{}
	k := newTestKernel(t, cfg, fa)
	st := k.open(t)
	st.send(t, reqHeaders("/upload", false, ""))
	r := st.send(t, reqBody("12345"))
	if r.GetImmediateResponse().GetStatus().GetCode() != 413 {
		t.Fatalf("%v", r)
	}
	st.end(t)
	st = k.open(t)
	st.send(t, reqHeaders("/download", false, ""))
	st.send(t, respHeaders("200", false))
	r = st.send(t, respBody("12345"))
	if r.GetImmediateResponse().GetStatus().GetCode() != 500 || fa.ncalls() != 0 {
		t.Fatalf("%v", r)
	}
	st.end(t)
}

func TestResponseBodyPhase(t *testing.T) {
	fa := &fakeAgent{fn: func(_ context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		return ok(setBody(strings.ToUpper(string(req.GetResponse().GetBody())))), nil
	}}
	k := newTestKernel(t, baseConfig, fa)
	st := k.open(t)
	r := st.send(t, reqHeaders("/download", false, ""))
	if m := r.GetModeOverride(); m.GetResponseBodyMode() != filterv3.ProcessingMode_BUFFERED || m.GetRequestBodyMode() != filterv3.ProcessingMode_NONE || m.GetResponseHeaderMode() != filterv3.ProcessingMode_SEND {
		t.Fatalf("mode %v", m)
	}
	if r := st.send(t, respHeaders("200", false)); r.GetResponseHeaders().GetResponse() != nil {
		t.Fatalf("%v", r)
	}
	r = st.send(t, respBody("abc"))
	if string(r.GetResponseBody().GetResponse().GetBodyMutation().GetBody()) != "ABC" {
		t.Fatalf("%v", r)
	}
	st.end(t)
	// A body instruction in a headers reply cannot be applied: dropped and counted.
	st = k.open(t)
	st.send(t, reqHeaders("/download", false, ""))
	r = st.send(t, respHeaders("204", true))
	if r.GetResponseHeaders().GetResponse().GetBodyMutation() != nil {
		t.Fatal("body mutation on a headers reply")
	}
	st.end(t)
}

func TestUnrequestedBodiesAndTrailersPass(t *testing.T) {
	fa := &fakeAgent{}
	k := newTestKernel(t, baseConfig, fa)
	st := k.open(t)
	st.send(t, reqHeaders("/api/v1/users", false, ""))
	if r := st.send(t, reqBody("x")); r.GetRequestBody() == nil || r.GetRequestBody().GetResponse() != nil {
		t.Fatalf("%v", r)
	}
	tr := &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestTrailers{RequestTrailers: &extprocv3.HttpTrailers{}}}
	if r := st.send(t, tr); r.GetRequestTrailers() == nil {
		t.Fatalf("%v", r)
	}
	if r := st.send(t, respBody("x")); r.GetResponseBody() == nil {
		t.Fatalf("%v", r)
	}
	rtr := &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseTrailers{ResponseTrailers: &extprocv3.HttpTrailers{}}}
	if r := st.send(t, rtr); r.GetResponseTrailers() == nil {
		t.Fatalf("%v", r)
	}
	st.end(t)
}

func TestProtocolErrors(t *testing.T) {
	fa := &fakeAgent{}
	k := newTestKernel(t, baseConfig, fa)
	f := func(name string, msgs ...*extprocv3.ProcessingRequest) {
		t.Helper()
		st := k.open(t)
		for _, m := range msgs[:len(msgs)-1] {
			st.send(t, m)
		}
		err := st.sendErr(t, msgs[len(msgs)-1])
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: got %v, want InvalidArgument", name, err)
		}
	}
	f("empty message", &extprocv3.ProcessingRequest{})
	f("request headers twice", reqHeaders("/open", true, ""), reqHeaders("/open", true, ""))
	f("body before headers", reqBody("x"))
	f("response headers twice", reqHeaders("/api/v1/users", false, ""), respHeaders("200", false), respHeaders("200", false))
	if k.m.protocolErrors.Get() != 4 {
		t.Fatalf("protocol errors counted %d", k.m.protocolErrors.Get())
	}
}

func TestStreamEnds(t *testing.T) {
	fa := &fakeAgent{}
	k := newTestKernel(t, baseConfig, fa)
	// Cancellation, Envoy's normal end, is not an error.
	st := k.open(t)
	st.send(t, reqHeaders("/open", true, ""))
	if err := st.end(t); err != nil {
		t.Fatalf("cancel: %v", err)
	}
	// A half-close is not an error either.
	st = k.open(t)
	close(st.in)
	if err := <-st.done; err != nil {
		t.Fatalf("half-close: %v", err)
	}
	if n := k.s.streams.Load(); n != 0 {
		t.Fatalf("%d streams still counted open", n)
	}
	// No snapshot, or draining: refused.
	var empty Server
	if err := empty.Process(&fakeStream{ctx: context.Background()}); status.Code(err) != codes.Unavailable {
		t.Fatalf("no snapshot: %v", err)
	}
	k.s.draining.Store(true)
	if err := k.s.Process(&fakeStream{ctx: context.Background()}); status.Code(err) != codes.Unavailable {
		t.Fatalf("draining: %v", err)
	}
}

func TestRequestsCountedOncePerHTTPRequest(t *testing.T) {
	fa := &fakeAgent{fn: func(_ context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		if req.GetPhase() == agentv1.PolicyPhase_RESPONSE {
			return &agentv1.PolicyResponse{Status: &agentv1.ResponseStatus{Code: agentv1.StatusCode_POLICY_ERROR}}, nil
		}
		return ok(), nil
	}}
	k := newTestKernel(t, baseConfig, fa)
	st := k.open(t)
	st.send(t, reqHeaders("/api/v1/users", false, ""))
	r := st.send(t, respHeaders("200", true))
	st.end(t)
	if r.GetImmediateResponse().GetStatus().GetCode() != 500 {
		t.Fatalf("%v", r)
	}
	route, _ := k.s.Snapshot().routes.ByName("/api/v1/users")
	if route.metrics.requests[statusAllow].Get() != 1 || route.metrics.responses[statusError].Get() != 1 || route.metrics.requests[statusError].Get() != 0 {
		t.Fatalf("requests allow %d error %d; response phase error %d", route.metrics.requests[statusAllow].Get(), route.metrics.requests[statusError].Get(), route.metrics.responses[statusError].Get())
	}
}

func TestAgentReplyNotUTF8IsInvalid(t *testing.T) {
	for name, resp := range map[string]*agentv1.PolicyResponse{
		"header value": ok(setHeader("x-a", "\xff")),
		"header name":  ok(setHeader("x-\xc3\x28", "v")),
		"state":        ok(setState("k", "\xc3\x28")),
	} {
		fa := &fakeAgent{fn: func(context.Context, *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) { return resp, nil }}
		k := newTestKernel(t, baseConfig, fa)
		st := k.open(t)
		r := st.send(t, reqHeaders("/api/v1/users", true, ""))
		st.end(t)
		if ir := r.GetImmediateResponse(); ir.GetStatus().GetCode() != 500 || jsonErrorOf(t, ir) != "invalid_agent_response" {
			t.Errorf("%s: %v", name, r)
		}
	}
}

func TestCompileChainSendsTheRequestUnlessEveryPolicySaysSo(t *testing.T) {
	adv := map[string]*agentv1.PolicyInfo{}
	for _, p := range testInfo().GetSupportedPolicies() {
		adv[p.GetName()] = p
	}
	lean := []ChainEntry{{Policy: "lean"}}
	for _, c := range []struct {
		name    string
		entries []ChainEntry
		phase   agentv1.PolicyPhase
		adv     map[string]*agentv1.PolicyInfo
		want    bool
	}{
		{"all ignore it", lean, agentv1.PolicyPhase_RESPONSE, adv, true},
		{"agent not reached", lean, agentv1.PolicyPhase_RESPONSE, nil, false},
		{"unknown policy", []ChainEntry{{Policy: "lean"}, {Policy: "nope"}}, agentv1.PolicyPhase_RESPONSE, adv, false},
		{"request phase", []ChainEntry{{Policy: "allowAll"}}, agentv1.PolicyPhase_REQUEST, adv, false},
		{"empty chain", nil, agentv1.PolicyPhase_RESPONSE, adv, false},
	} {
		ch, _ := compileChain(c.entries, c.phase, "a", c.adv, "k", nil)
		if ch.noRequest != c.want {
			t.Errorf("%s: noRequest = %v, want %v", c.name, ch.noRequest, c.want)
		}
	}
}

func TestRequestDoneKeepsWhatTheResponsePhaseNeeds(t *testing.T) {
	f := func(r *Route, wantKept bool) {
		t.Helper()
		st := getStream(nil)
		defer putStream(st)
		st.route = r
		st.reqCtx = getRequestContext()
		st.reqCtx.Headers["x-request-id"] = "rid"
		st.requestID = st.reqCtx.Headers["x-request-id"]
		st.requestDone()
		if kept := st.reqCtx != nil; kept != wantKept {
			t.Errorf("request context kept = %v, want %v", kept, wantKept)
		}
		if st.requestID != "rid" {
			t.Errorf("request id %q", st.requestID)
		}
	}
	f(&Route{}, false) // no response chain
	f(&Route{response: chain{policies: []*agentv1.Policy{{Name: "lean"}}, noRequest: true}}, false)
	f(&Route{response: chain{policies: []*agentv1.Policy{{Name: "hdr"}}}}, true)
	f(nil, true) // no route: nothing is decided yet, nothing let go
}
