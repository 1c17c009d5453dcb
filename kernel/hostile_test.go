package kernel

import (
	"strconv"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// TestRepeatedHeadersJoinInLinearTime: a stream may carry tens of thousands of headers of one
// name (nothing but the gRPC message limit bounds them when the kernel's port is reachable);
// joining them must not cost time quadratic in their number.
func TestRepeatedHeadersJoinInLinearTime(t *testing.T) {
	var seen *agentv1.RequestContext
	fa := wireAgent(func(req *agentv1.PolicyRequest) *agentv1.PolicyResponse {
		seen = proto.Clone(req.GetContext()).(*agentv1.RequestContext) // the request is the stream's, reused
		return ok()
	})
	// A budget far above what linear work needs, so that only the join's cost can fail the test.
	cfg := strings.Replace(baseConfig, "policy_kernel:\n", "policy_kernel:\n  server: {message_timeout_ms: 5000}\n", 1)
	k := newTestKernel(t, strings.Replace(cfg, "timeout_ms: 50\n", "timeout_ms: 4000\n", 1), fa)
	const n = 30000
	value := strings.Repeat("v", 30)
	req := reqHeaders("/api/v1/users", true, "")
	hs := req.GetRequestHeaders().GetHeaders()
	for range n {
		hs.Headers = append(hs.Headers, &corev3.HeaderValue{Key: "x-dup", RawValue: []byte(value)})
	}
	hs.Headers = append(hs.Headers, &corev3.HeaderValue{Key: "x-single", RawValue: []byte("one")})
	st := k.open(t)
	start := time.Now()
	r := st.send(t, req)
	took := time.Since(start)
	st.end(t)
	if r.GetRequestHeaders() == nil {
		t.Fatalf("reply %v", r)
	}
	if took > 3*time.Second {
		t.Fatalf("%d repeated headers took %v", n, took)
	}
	want := strings.TrimSuffix(strings.Repeat(value+", ", n), ", ")
	if seen.GetHeaders()["x-dup"] != want || seen.GetHeaders()["x-single"] != "one" {
		t.Fatalf("joined value has %d bytes, want %d", len(seen.GetHeaders()["x-dup"]), len(want))
	}
}

// TestHostileMessagesGetAnAnswer plays messages Envoy would never send, each on its own stream,
// and checks the kernel's answer: a protocol error (which Envoy turns into a 500, or a continue
// when fail-open) or a harmless reply, and the server keeps serving.
func TestHostileMessagesGetAnAnswer(t *testing.T) {
	fa := &fakeAgent{}
	k := newTestKernel(t, baseConfig, fa)
	big := strings.Repeat("b", 2<<20)
	cases := []struct {
		name string
		msgs []*extprocv3.ProcessingRequest
		// want is "error" for an InvalidArgument stream error, else the reply type of the last
		// message.
		want string
	}{
		{"empty message", []*extprocv3.ProcessingRequest{{}}, "error"},
		{"request headers twice", []*extprocv3.ProcessingRequest{reqHeaders("/open", false, ""), reqHeaders("/open", false, "")}, "error"},
		{"body before headers", []*extprocv3.ProcessingRequest{reqBody("x")}, "error"},
		{"response headers twice", []*extprocv3.ProcessingRequest{reqHeaders("/api/v1/users", false, ""), respHeaders("200", false), respHeaders("200", false)}, "error"},
		{"response headers first", []*extprocv3.ProcessingRequest{respHeaders("200", true)}, "response_headers"},
		{"response body first", []*extprocv3.ProcessingRequest{respBody("x")}, "response_body"},
		{"trailers first", []*extprocv3.ProcessingRequest{{Request: &extprocv3.ProcessingRequest_RequestTrailers{RequestTrailers: &extprocv3.HttpTrailers{}}}}, "request_trailers"},
		{"headers without a header map", []*extprocv3.ProcessingRequest{{Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{}}}}, "request_headers"},
		{"unasked body twice", []*extprocv3.ProcessingRequest{reqHeaders("/api/v1/users", false, ""), reqBody("a"), reqBody("b")}, "request_body"},
		{"body over the cap", []*extprocv3.ProcessingRequest{reqHeaders("/upload", false, ""), reqBody(big)}, "immediate:413"},
		{"response body over the cap", []*extprocv3.ProcessingRequest{reqHeaders("/download", false, ""), respHeaders("200", false), respBody(big)}, "immediate:500"},
		{"status that is no number", []*extprocv3.ProcessingRequest{reqHeaders("/api/v1/users", false, ""), respHeaders("2x0", true)}, "response_headers"},
	}
	for _, c := range cases {
		st := k.open(t)
		for _, m := range c.msgs[:len(c.msgs)-1] {
			st.send(t, m)
		}
		last := c.msgs[len(c.msgs)-1]
		if c.want == "error" {
			if err := st.sendErr(t, last); status.Code(err) != codes.InvalidArgument {
				t.Errorf("%s: got %v, want InvalidArgument", c.name, err)
			}
			continue
		}
		r := st.send(t, last)
		st.end(t)
		if got := replyKind(r); got != c.want {
			t.Errorf("%s: reply %s, want %s", c.name, got, c.want)
		}
	}
	// Still serving.
	st := k.open(t)
	if r := st.send(t, reqHeaders("/open", true, "")); r.GetRequestHeaders() == nil {
		t.Fatalf("after hostile streams: %v", r)
	}
	st.end(t)
	if n := k.s.streams.Load(); n != 0 {
		t.Fatalf("%d streams still open", n)
	}
}

// replyKind names a reply's type, with the status of an immediate response.
func replyKind(r *extprocv3.ProcessingResponse) string {
	switch v := r.GetResponse().(type) {
	case *extprocv3.ProcessingResponse_RequestHeaders:
		return "request_headers"
	case *extprocv3.ProcessingResponse_RequestBody:
		return "request_body"
	case *extprocv3.ProcessingResponse_RequestTrailers:
		return "request_trailers"
	case *extprocv3.ProcessingResponse_ResponseHeaders:
		return "response_headers"
	case *extprocv3.ProcessingResponse_ResponseBody:
		return "response_body"
	case *extprocv3.ProcessingResponse_ResponseTrailers:
		return "response_trailers"
	case *extprocv3.ProcessingResponse_ImmediateResponse:
		return "immediate:" + strconv.Itoa(int(v.ImmediateResponse.GetStatus().GetCode()))
	}
	return "none"
}
