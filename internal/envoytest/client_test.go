package envoytest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"go.uber.org/goleak"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func httpStatus(code int) *typev3.HttpStatus {
	return &typev3.HttpStatus{Code: typev3.StatusCode(code)}
}

func okUpstream(fwd *Forwarded) *Response {
	return &Response{Status: 200, Headers: [][2]string{{"content-type", "text/plain"}}, Body: []byte("hello")}
}

const (
	none     = extprocfilterv3.ProcessingMode_NONE
	buffered = extprocfilterv3.ProcessingMode_BUFFERED
	streamed = extprocfilterv3.ProcessingMode_STREAMED
	send     = extprocfilterv3.ProcessingMode_SEND
	skip     = extprocfilterv3.ProcessingMode_SKIP
)

func TestAllowPath(t *testing.T) {
	f := newServer(t, continueAll)
	c := dial(t, f, FilterConfig{})
	var seen *Forwarded
	res := do(t, c, &Request{
		Method: "POST", Path: "/v1/things?x=1", Authority: "api.local",
		Headers: [][2]string{{"X-Trace", "abc"}},
	}, func(fwd *Forwarded) *Response {
		seen = fwd
		return okUpstream(fwd)
	})

	if res.Status != 200 || string(res.Body) != "hello" || res.LocalReply || res.Details != DetailsViaUpstream {
		t.Fatalf("result = %d %q local=%v details=%q", res.Status, res.Body, res.LocalReply, res.Details)
	}
	if got := lookup(res.Headers, "content-type"); !reflect.DeepEqual(got, []string{"text/plain"}) {
		t.Errorf("downstream content-type = %v", got)
	}
	if seen == nil || seen.Method != "POST" || seen.Path != "/v1/things?x=1" || seen.Authority != "api.local" || seen.Scheme != "http" {
		t.Fatalf("forwarded = %+v", seen)
	}
	if res.Forwarded != seen {
		t.Error("Result.Forwarded is not what the upstream saw")
	}
	if got := lookup(seen.Headers, "x-trace"); !reflect.DeepEqual(got, []string{"abc"}) {
		t.Errorf("x-trace forwarded as %v (keys must be lowercased)", got)
	}
	if got, want := kinds(res.Sent), []string{"request_headers", "response_headers"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("sent %v, want %v", got, want)
	}
	if len(res.Received) != 2 {
		t.Errorf("received %d replies", len(res.Received))
	}

	rh := res.Sent[0]
	if !rh.GetRequestHeaders().GetEndOfStream() {
		t.Error("request headers without a body must carry end_of_stream")
	}
	var keys []string
	for _, h := range headersOf(rh) {
		keys = append(keys, h.GetKey())
		if h.GetValue() != "" {
			t.Errorf("header %q has value %q; Envoy sends raw_value only", h.GetKey(), h.GetValue())
		}
	}
	if want := []string{":authority", ":path", ":method", ":scheme", "x-trace"}; !reflect.DeepEqual(keys, want) {
		t.Errorf("request header keys %v, want %v", keys, want)
	}
	if pc := rh.GetProtocolConfig(); pc == nil || pc.GetRequestBodyMode() != none || pc.GetResponseBodyMode() != none || pc.GetSendBodyWithoutWaitingForHeaderResponse() {
		t.Errorf("protocol_config on first message = %v", pc)
	}
	if rh.GetMetadataContext() == nil {
		t.Error("metadata_context missing")
	}
	sh := res.Sent[1]
	if sh.GetProtocolConfig() != nil {
		t.Error("protocol_config must be on the first message only")
	}
	if sh.GetResponseHeaders().GetEndOfStream() {
		t.Error("response headers with a body must not carry end_of_stream")
	}
	if got := headersOf(sh)[0]; got.GetKey() != ":status" || string(got.GetRawValue()) != "200" {
		t.Errorf("first response header = %v", got)
	}

	if err := f.waitEnd(t); !isCanceled(err) {
		t.Errorf("server saw the stream end with %v, want Canceled", err)
	}
}

func TestNoStreamWhenEverythingSkipped(t *testing.T) {
	f := newServer(t, continueAll)
	c := dial(t, f, FilterConfig{ProcessingMode: &extprocfilterv3.ProcessingMode{
		RequestHeaderMode: skip, ResponseHeaderMode: skip,
	}})
	res := do(t, c, &Request{Body: []byte("x")}, okUpstream)
	if res.Status != 200 || len(res.Sent) != 0 || f.streams.Load() != 0 {
		t.Fatalf("status %d, sent %d, streams %d", res.Status, len(res.Sent), f.streams.Load())
	}
}

func TestSetHeadersRawValue(t *testing.T) {
	f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
		if req.GetRequestHeaders() != nil {
			return []*extprocv3.ProcessingResponse{continueFor(req, &extprocv3.HeaderMutation{
				SetHeaders: []*corev3.HeaderValueOption{
					setRaw("x-route", "r1"),
					setRaw("X-Upper", "v"),
					setRaw("x-multi", "replaced"),
					appendRaw("x-added", "1"),
					appendRaw("x-added", "2"),
					setRaw(":path", "/rewritten"),
				},
				RemoveHeaders: []string{"x-remove-me"},
			})}
		}
		return []*extprocv3.ProcessingResponse{continueFor(req, &extprocv3.HeaderMutation{
			SetHeaders:    []*corev3.HeaderValueOption{setRaw("x-resp", "yes"), setRaw(":status", "201")},
			RemoveHeaders: []string{"content-type"},
		})}
	})
	c := dial(t, f, FilterConfig{})
	res := do(t, c, &Request{Headers: [][2]string{
		{"x-multi", "a"}, {"x-multi", "b"}, {"x-remove-me", "1"},
	}}, okUpstream)

	fwd := res.Forwarded
	if fwd.Path != "/rewritten" {
		t.Errorf(":path = %q", fwd.Path)
	}
	for key, want := range map[string][]string{
		"x-route": {"r1"}, "x-upper": {"v"}, "x-multi": {"replaced"}, "x-added": {"1", "2"}, "x-remove-me": nil,
	} {
		if got := lookup(fwd.Headers, key); !reflect.DeepEqual(got, want) {
			t.Errorf("forwarded %s = %v, want %v", key, got, want)
		}
	}
	if res.Status != 201 || !reflect.DeepEqual(lookup(res.Headers, "x-resp"), []string{"yes"}) || lookup(res.Headers, "content-type") != nil {
		t.Errorf("downstream %d %v", res.Status, res.Headers)
	}
}

func TestValueOnlyYieldsEmptyHeader(t *testing.T) {
	f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
		return []*extprocv3.ProcessingResponse{continueFor(req, &extprocv3.HeaderMutation{
			SetHeaders: []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: "x-v", Value: "lost"}}},
		})}
	})
	c := dial(t, f, FilterConfig{})
	res := do(t, c, &Request{}, okUpstream)
	if got := lookup(res.Forwarded.Headers, "x-v"); !reflect.DeepEqual(got, []string{""}) {
		t.Fatalf("x-v = %q, want one empty value", got)
	}
}

func TestValueAndRawValueIsAnError(t *testing.T) {
	f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
		return []*extprocv3.ProcessingResponse{continueFor(req, &extprocv3.HeaderMutation{
			SetHeaders: []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: "x-v", Value: "a", RawValue: []byte("b")}}},
		})}
	})
	c := dial(t, f, FilterConfig{})
	called := false
	res := do(t, c, &Request{}, func(*Forwarded) *Response { called = true; return nil })
	if res.Status != 500 || !res.LocalReply || called || res.Forwarded != nil {
		t.Fatalf("status %d local %v upstream called %v", res.Status, res.LocalReply, called)
	}
	if res.Details != "Only_one_of_value_or_raw_value_in_the_HeaderValue_message_should_be_set." {
		t.Errorf("details %q", res.Details)
	}
	if got := kinds(res.Sent); !reflect.DeepEqual(got, []string{"request_headers"}) {
		t.Errorf("sent %v", got)
	}
	if err := f.waitEnd(t); !isCanceled(err) {
		t.Errorf("server saw %v, want Canceled", err)
	}
}

func TestStatusOnError(t *testing.T) {
	f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
		return []*extprocv3.ProcessingResponse{continueFor(req, &extprocv3.HeaderMutation{
			SetHeaders: []*corev3.HeaderValueOption{setRaw("x-bad", "a\r\nb")},
		})}
	})
	c := dial(t, f, FilterConfig{StatusOnError: 503})
	res := do(t, c, &Request{}, okUpstream)
	if res.Status != 503 || res.Details != "Invalid_character_in_set_headers_mutation." {
		t.Fatalf("status %d details %q", res.Status, res.Details)
	}
}

func disallowedMutation() *extprocv3.HeaderMutation {
	return &extprocv3.HeaderMutation{
		SetHeaders: []*corev3.HeaderValueOption{
			setRaw("host", "evil"), setRaw(":authority", "evil"), setRaw(":method", "DELETE"),
			setRaw(":scheme", "https"), setRaw("x-envoy-upstream-rq-timeout-ms", "1"), setRaw("x-ok", "1"),
		},
		RemoveHeaders: []string{":path", "host"},
	}
}

func TestDisallowedMutationsAreDropped(t *testing.T) {
	f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
		if req.GetRequestHeaders() != nil {
			return []*extprocv3.ProcessingResponse{continueFor(req, disallowedMutation())}
		}
		return []*extprocv3.ProcessingResponse{continueFor(req, &extprocv3.HeaderMutation{
			SetHeaders: []*corev3.HeaderValueOption{setRaw(":status", "99"), setRaw(":status", "abc")},
		})}
	})
	c := dial(t, f, FilterConfig{})
	res := do(t, c, &Request{Method: "GET", Path: "/p", Authority: "good"}, okUpstream)
	fwd := res.Forwarded
	if res.LocalReply || fwd.Authority != "good" || fwd.Method != "GET" || fwd.Scheme != "http" || fwd.Path != "/p" {
		t.Fatalf("local=%v forwarded %+v", res.LocalReply, fwd)
	}
	if lookup(fwd.Headers, "host") != nil || lookup(fwd.Headers, "x-envoy-upstream-rq-timeout-ms") != nil {
		t.Errorf("disallowed headers forwarded: %v", fwd.Headers)
	}
	if got := lookup(fwd.Headers, "x-ok"); !reflect.DeepEqual(got, []string{"1"}) {
		t.Errorf("allowed header lost: %v", fwd.Headers)
	}
	if res.Status != 200 {
		t.Errorf("an invalid :status must be dropped; got %d", res.Status)
	}
}

func TestDisallowIsError(t *testing.T) {
	for _, tc := range []struct {
		name    string
		hm      *extprocv3.HeaderMutation
		details string
	}{
		{"set host", &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{setRaw("host", "x")}}, "Invalid_attempt_to_modify_host"},
		{"set x-envoy", &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{setRaw("x-envoy-foo", "x")}}, "Invalid_attempt_to_modify_x-envoy-foo"},
		{"remove :path", &extprocv3.HeaderMutation{RemoveHeaders: []string{":path"}}, "Invalid_attempt_to_remove_:path"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
				return []*extprocv3.ProcessingResponse{continueFor(req, tc.hm)}
			})
			c := dial(t, f, FilterConfig{DisallowIsError: true})
			res := do(t, c, &Request{}, okUpstream)
			if res.Status != 500 || res.Details != tc.details || res.Forwarded != nil {
				t.Fatalf("status %d details %q", res.Status, res.Details)
			}
		})
	}
}

func TestInvalidCharactersAreAlwaysAnError(t *testing.T) {
	for _, tc := range []struct {
		name string
		hm   *extprocv3.HeaderMutation
	}{
		{"CR LF in value", &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{setRaw("x-a", "v\r\nx-injected: 1")}}},
		{"LF in value", &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{setRaw("x-a", "v\nw")}}},
		{"NUL in value", &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{setRaw("x-a", "v\x00")}}},
		{"space in name", &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{setRaw("x a", "v")}}},
		{"colon in name", &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{setRaw("x:a", "v")}}},
		{"uppercase pseudo-header", &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{setRaw(":Path", "/x")}}},
		{"empty name", &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{setRaw("", "v")}}},
		{"bad remove", &extprocv3.HeaderMutation{RemoveHeaders: []string{"x\r\n"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
				return []*extprocv3.ProcessingResponse{continueFor(req, tc.hm)}
			})
			// Not even failure_mode_allow lets a rejected mutation through.
			c := dial(t, f, FilterConfig{FailureModeAllow: true})
			res := do(t, c, &Request{}, okUpstream)
			if res.Status != 500 || !res.LocalReply || !strings.HasPrefix(res.Details, "Invalid_character_in_") {
				t.Fatalf("status %d details %q", res.Status, res.Details)
			}
		})
	}
}

func TestImmediateResponseInRequestPhase(t *testing.T) {
	f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
		return []*extprocv3.ProcessingResponse{immediate(403, "no", &extprocv3.HeaderMutation{
			SetHeaders: []*corev3.HeaderValueOption{setRaw("x-why", "policy"), setRaw("x-envoy-dropped", "1")},
		})}
	})
	c := dial(t, f, FilterConfig{})
	called := false
	res := do(t, c, &Request{}, func(*Forwarded) *Response { called = true; return nil })
	if called || res.Forwarded != nil {
		t.Fatal("the upstream must not be called")
	}
	if res.Status != 403 || string(res.Body) != "no" || !res.LocalReply || res.Details != "denied_by_policy" || res.ImmediateResponse == nil {
		t.Fatalf("result %d %q local=%v details=%q", res.Status, res.Body, res.LocalReply, res.Details)
	}
	if !reflect.DeepEqual(lookup(res.Headers, "x-why"), []string{"policy"}) || lookup(res.Headers, "x-envoy-dropped") != nil {
		t.Errorf("headers %v", res.Headers)
	}
	if !reflect.DeepEqual(lookup(res.Headers, "content-length"), []string{"2"}) || !reflect.DeepEqual(lookup(res.Headers, "content-type"), []string{"text/plain"}) {
		t.Errorf("local reply headers %v", res.Headers)
	}
	if got := kinds(res.Sent); !reflect.DeepEqual(got, []string{"request_headers"}) {
		t.Errorf("sent %v: no response_headers may follow an immediate response", got)
	}
	if err := f.waitEnd(t); !isCanceled(err) {
		t.Errorf("server saw %v, want Canceled", err)
	}
}

func TestImmediateResponseInResponsePhase(t *testing.T) {
	f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
		if req.GetResponseHeaders() != nil {
			return []*extprocv3.ProcessingResponse{immediate(502, "", nil)}
		}
		return continueAll(req)
	})
	c := dial(t, f, FilterConfig{})
	res := do(t, c, &Request{}, okUpstream)
	if res.Forwarded == nil || res.Status != 502 || len(res.Body) != 0 || !res.LocalReply {
		t.Fatalf("result %d %q forwarded=%v", res.Status, res.Body, res.Forwarded != nil)
	}
	if lookup(res.Headers, "content-type") != nil {
		t.Errorf("upstream headers leaked into the local reply: %v", res.Headers)
	}
}

func TestImmediateStatusBelow200Becomes200(t *testing.T) {
	f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
		return []*extprocv3.ProcessingResponse{immediate(100, "x", nil)}
	})
	res := do(t, dial(t, f, FilterConfig{}), &Request{}, okUpstream)
	if res.Status != 200 || !res.LocalReply {
		t.Fatalf("status %d", res.Status)
	}
}

func wrongPhase(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
	if req.GetRequestHeaders() != nil {
		return []*extprocv3.ProcessingResponse{{Response: &extprocv3.ProcessingResponse_ResponseHeaders{
			ResponseHeaders: &extprocv3.HeadersResponse{}}}}
	}
	return continueAll(req)
}

func TestSpuriousReply(t *testing.T) {
	f := newServer(t, wrongPhase)
	res := do(t, dial(t, f, FilterConfig{}), &Request{}, okUpstream)
	if res.Status != 500 || res.Details != DetailsSpurious || res.Forwarded != nil {
		t.Fatalf("status %d details %q", res.Status, res.Details)
	}
	if err := f.waitEnd(t); !isCanceled(err) {
		t.Errorf("server saw %v, want Canceled", err)
	}
}

func TestSpuriousReplyFailOpen(t *testing.T) {
	f := newServer(t, wrongPhase)
	res := do(t, dial(t, f, FilterConfig{FailureModeAllow: true}), &Request{}, okUpstream)
	if res.Status != 200 || res.LocalReply || string(res.Body) != "hello" {
		t.Fatalf("status %d local %v", res.Status, res.LocalReply)
	}
	// The stream is ignored from then on: no response_headers.
	if got := kinds(res.Sent); !reflect.DeepEqual(got, []string{"request_headers"}) {
		t.Errorf("sent %v", got)
	}
}

func TestBodyReplyToHeadersIsSpurious(t *testing.T) {
	f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
		return []*extprocv3.ProcessingResponse{{Response: &extprocv3.ProcessingResponse_RequestBody{
			RequestBody: &extprocv3.BodyResponse{}}}}
	})
	res := do(t, dial(t, f, FilterConfig{}), &Request{}, okUpstream)
	if res.Status != 500 || res.Details != DetailsSpurious {
		t.Fatalf("status %d details %q", res.Status, res.Details)
	}
}

func TestSecondReplyIsSpurious(t *testing.T) {
	f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
		if req.GetRequestHeaders() != nil {
			return []*extprocv3.ProcessingResponse{continueFor(req, nil), continueFor(req, nil)}
		}
		return continueAll(req)
	})
	res := do(t, dial(t, f, FilterConfig{}), &Request{}, okUpstream)
	if res.Status != 500 || res.Details != DetailsSpurious {
		t.Fatalf("status %d details %q", res.Status, res.Details)
	}
}

func TestEmptyReply(t *testing.T) {
	f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
		return []*extprocv3.ProcessingResponse{{}}
	})
	res := do(t, dial(t, f, FilterConfig{}), &Request{}, okUpstream)
	if res.Status != 500 || res.Details != DetailsUnhandled {
		t.Fatalf("status %d details %q", res.Status, res.Details)
	}
}

func TestServerReturnsOKEarly(t *testing.T) {
	f := startServer(t, func(srv extprocv3.ExternalProcessor_ProcessServer) error {
		_, err := srv.Recv()
		return err
	})
	res := do(t, dial(t, f, FilterConfig{}), &Request{Headers: [][2]string{{"x-a", "1"}}}, okUpstream)
	if res.Status != 200 || res.LocalReply || string(res.Body) != "hello" {
		t.Fatalf("status %d local %v", res.Status, res.LocalReply)
	}
	if got := kinds(res.Sent); !reflect.DeepEqual(got, []string{"request_headers"}) {
		t.Errorf("sent %v: nothing goes to a closed stream", got)
	}
}

func TestServerError(t *testing.T) {
	handler := func(srv extprocv3.ExternalProcessor_ProcessServer) error {
		if _, err := srv.Recv(); err != nil {
			return err
		}
		return status.Error(codes.Internal, "policy store down")
	}
	t.Run("fail closed", func(t *testing.T) {
		f := startServer(t, handler)
		res := do(t, dial(t, f, FilterConfig{}), &Request{}, okUpstream)
		if res.Status != 500 || res.Details != "ext_proc_error_gRPC_error_13{policy_store_down}" || res.Forwarded != nil {
			t.Fatalf("status %d details %q", res.Status, res.Details)
		}
	})
	t.Run("fail open", func(t *testing.T) {
		f := startServer(t, handler)
		res := do(t, dial(t, f, FilterConfig{FailureModeAllow: true}), &Request{}, okUpstream)
		if res.Status != 200 || res.LocalReply {
			t.Fatalf("status %d local %v", res.Status, res.LocalReply)
		}
	})
}

func TestServerUnreachable(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	_ = lis.Close()
	for _, failOpen := range []bool{false, true} {
		c, err := Dial(addr, FilterConfig{FailureModeAllow: failOpen})
		if err != nil {
			t.Fatal(err)
		}
		res := do(t, c, &Request{}, okUpstream)
		_ = c.Close()
		if failOpen {
			if res.Status != 200 || res.LocalReply {
				t.Errorf("fail open: status %d", res.Status)
			}
			continue
		}
		if res.Status != 500 || !strings.HasPrefix(res.Details, DetailsGRPCErrorPrefix+"14{") || len(res.Sent) != 0 {
			t.Errorf("fail closed: status %d details %q", res.Status, res.Details)
		}
	}
}

func TestMessageTimeout(t *testing.T) {
	silent := func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse { return nil }
	t.Run("fail closed", func(t *testing.T) {
		f := newServer(t, silent)
		start := time.Now()
		res := do(t, dial(t, f, FilterConfig{MessageTimeout: 50 * time.Millisecond}), &Request{}, okUpstream)
		if res.Status != 504 || res.Details != DetailsMessageTimeout || res.Forwarded != nil {
			t.Fatalf("status %d details %q", res.Status, res.Details)
		}
		if d := time.Since(start); d < 50*time.Millisecond || d > 2*time.Second {
			t.Errorf("timed out after %v", d)
		}
		if err := f.waitEnd(t); !isCanceled(err) {
			t.Errorf("server saw %v, want Canceled", err)
		}
	})
	t.Run("fail open", func(t *testing.T) {
		f := newServer(t, silent)
		res := do(t, dial(t, f, FilterConfig{MessageTimeout: 50 * time.Millisecond, FailureModeAllow: true}), &Request{}, okUpstream)
		if res.Status != 200 || res.LocalReply || !reflect.DeepEqual(kinds(res.Sent), []string{"request_headers"}) {
			t.Fatalf("status %d sent %v", res.Status, kinds(res.Sent))
		}
	})
	t.Run("default is 200ms", func(t *testing.T) {
		f := newServer(t, silent)
		c, err := Dial(f.addr, FilterConfig{})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		start := time.Now()
		res := do(t, c, &Request{}, okUpstream)
		if d := time.Since(start); res.Status != 504 || d < 200*time.Millisecond {
			t.Fatalf("status %d after %v", res.Status, d)
		}
	})
}

func TestOverrideMessageTimeout(t *testing.T) {
	f := startServer(t, func(srv extprocv3.ExternalProcessor_ProcessServer) error {
		for {
			req, err := srv.Recv()
			if err != nil {
				return nil
			}
			if req.GetRequestHeaders() != nil {
				_ = srv.Send(&extprocv3.ProcessingResponse{OverrideMessageTimeout: durationpb.New(300 * time.Millisecond)})
				time.Sleep(100 * time.Millisecond)
			}
			_ = srv.Send(continueFor(req, nil))
		}
	})
	cfg := FilterConfig{MessageTimeout: 50 * time.Millisecond}
	if res := do(t, dial(t, f, cfg), &Request{}, okUpstream); res.Status != 504 {
		t.Fatalf("without max_message_timeout the override is ignored; got %d", res.Status)
	}
	cfg.MaxMessageTimeout = time.Second
	if res := do(t, dial(t, f, cfg), &Request{}, okUpstream); res.Status != 200 {
		t.Fatalf("with max_message_timeout the override applies; got %d %q", res.Status, res.Details)
	}
}

func bufferOverride(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
	r := continueFor(req, nil)
	if req.GetRequestHeaders() != nil {
		r.ModeOverride = &extprocfilterv3.ProcessingMode{RequestBodyMode: buffered}
	}
	return []*extprocv3.ProcessingResponse{r}
}

func TestModeOverrideAsksForBody(t *testing.T) {
	body := []byte(`{"a":1}`)
	t.Run("allowed", func(t *testing.T) {
		f := newServer(t, bufferOverride)
		res := do(t, dial(t, f, FilterConfig{AllowModeOverride: true}), &Request{Method: "POST", Body: body}, okUpstream)
		if got, want := kinds(res.Sent), []string{"request_headers", "request_body", "response_headers"}; !reflect.DeepEqual(got, want) {
			t.Fatalf("sent %v, want %v", got, want)
		}
		if res.Sent[0].GetRequestHeaders().GetEndOfStream() {
			t.Error("headers followed by a body must not carry end_of_stream")
		}
		rb := res.Sent[1].GetRequestBody()
		if !bytes.Equal(rb.GetBody(), body) || !rb.GetEndOfStream() {
			t.Errorf("request_body %q eos=%v", rb.GetBody(), rb.GetEndOfStream())
		}
		if !bytes.Equal(res.Forwarded.Body, body) || res.Status != 200 {
			t.Errorf("forwarded %q status %d", res.Forwarded.Body, res.Status)
		}
	})
	t.Run("not allowed", func(t *testing.T) {
		f := newServer(t, bufferOverride)
		res := do(t, dial(t, f, FilterConfig{}), &Request{Method: "POST", Body: body}, okUpstream)
		if got, want := kinds(res.Sent), []string{"request_headers", "response_headers"}; !reflect.DeepEqual(got, want) {
			t.Fatalf("sent %v, want %v", got, want)
		}
	})
	t.Run("not on a body reply", func(t *testing.T) {
		f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
			r := continueFor(req, nil)
			if req.GetRequestBody() != nil {
				r.ModeOverride = &extprocfilterv3.ProcessingMode{ResponseHeaderMode: skip}
			}
			return []*extprocv3.ProcessingResponse{r}
		})
		cfg := FilterConfig{AllowModeOverride: true, ProcessingMode: &extprocfilterv3.ProcessingMode{RequestBodyMode: buffered}}
		res := do(t, dial(t, f, cfg), &Request{Method: "POST", Body: body}, okUpstream)
		if got, want := kinds(res.Sent), []string{"request_headers", "request_body", "response_headers"}; !reflect.DeepEqual(got, want) {
			t.Fatalf("sent %v, want %v", got, want)
		}
	})
	t.Run("omitted body mode means NONE", func(t *testing.T) {
		f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
			r := continueFor(req, nil)
			if req.GetRequestHeaders() != nil {
				r.ModeOverride = &extprocfilterv3.ProcessingMode{ResponseHeaderMode: skip}
			}
			return []*extprocv3.ProcessingResponse{r}
		})
		cfg := FilterConfig{AllowModeOverride: true, ProcessingMode: &extprocfilterv3.ProcessingMode{RequestBodyMode: buffered}}
		res := do(t, dial(t, f, cfg), &Request{Method: "POST", Body: body}, okUpstream)
		if got, want := kinds(res.Sent), []string{"request_headers"}; !reflect.DeepEqual(got, want) {
			t.Fatalf("sent %v, want %v", got, want)
		}
		if !bytes.Equal(res.Forwarded.Body, body) {
			t.Errorf("forwarded %q", res.Forwarded.Body)
		}
	})
	t.Run("allowed_override_modes", func(t *testing.T) {
		f := newServer(t, bufferOverride)
		cfg := FilterConfig{AllowModeOverride: true, AllowedOverrideModes: []*extprocfilterv3.ProcessingMode{{RequestBodyMode: streamed}}}
		res := do(t, dial(t, f, cfg), &Request{Method: "POST", Body: body}, okUpstream)
		if got, want := kinds(res.Sent), []string{"request_headers", "response_headers"}; !reflect.DeepEqual(got, want) {
			t.Fatalf("sent %v, want %v", got, want)
		}
	})
}

func TestBufferedBodyMutations(t *testing.T) {
	mode := &extprocfilterv3.ProcessingMode{RequestBodyMode: buffered, ResponseBodyMode: buffered}
	body := []byte("original")
	bodyReply := func(req *extprocv3.ProcessingRequest, bm *extprocv3.BodyMutation, hm *extprocv3.HeaderMutation) *extprocv3.ProcessingResponse {
		r := continueFor(req, hm)
		cr := &extprocv3.CommonResponse{HeaderMutation: hm, BodyMutation: bm}
		if b := r.GetRequestBody(); b != nil {
			b.Response = cr
		} else {
			r.GetResponseBody().Response = cr
		}
		return r
	}
	newBody := &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: []byte("rewritten!")}}

	t.Run("replace and clear", func(t *testing.T) {
		f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
			switch {
			case req.GetRequestBody() != nil:
				return []*extprocv3.ProcessingResponse{bodyReply(req, newBody, &extprocv3.HeaderMutation{
					SetHeaders: []*corev3.HeaderValueOption{setRaw("x-from-body-reply", "1")}})}
			case req.GetResponseBody() != nil:
				return []*extprocv3.ProcessingResponse{bodyReply(req, &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_ClearBody{ClearBody: true}}, nil)}
			}
			return continueAll(req)
		})
		res := do(t, dial(t, f, FilterConfig{ProcessingMode: mode}), &Request{Method: "POST", Body: body}, okUpstream)
		if string(res.Forwarded.Body) != "rewritten!" || len(res.Body) != 0 || res.Status != 200 {
			t.Fatalf("forwarded %q downstream %q status %d %q", res.Forwarded.Body, res.Body, res.Status, res.Details)
		}
		if !reflect.DeepEqual(lookup(res.Forwarded.Headers, "x-from-body-reply"), []string{"1"}) {
			t.Error("a header mutation in a buffered body reply applies while the headers are held")
		}
		if got, want := kinds(res.Sent), []string{"request_headers", "request_body", "response_headers", "response_body"}; !reflect.DeepEqual(got, want) {
			t.Errorf("sent %v", got)
		}
	})
	t.Run("content-length mismatch", func(t *testing.T) {
		f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
			if req.GetRequestBody() != nil {
				return []*extprocv3.ProcessingResponse{bodyReply(req, newBody, nil)}
			}
			return continueAll(req)
		})
		res := do(t, dial(t, f, FilterConfig{ProcessingMode: mode}), &Request{
			Method: "POST", Body: body, Headers: [][2]string{{"content-length", "8"}},
		}, okUpstream)
		if res.Status != 500 || res.Details != "mismatch_between_content_length_and_the_length_of_the_mutated_body" {
			t.Fatalf("status %d details %q", res.Status, res.Details)
		}
	})
	t.Run("content-length fixed in the same reply", func(t *testing.T) {
		f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
			if req.GetRequestBody() != nil {
				return []*extprocv3.ProcessingResponse{bodyReply(req, newBody, &extprocv3.HeaderMutation{
					SetHeaders: []*corev3.HeaderValueOption{setRaw("content-length", "10")}})}
			}
			return continueAll(req)
		})
		res := do(t, dial(t, f, FilterConfig{ProcessingMode: mode}), &Request{
			Method: "POST", Body: body, Headers: [][2]string{{"content-length", "8"}},
		}, okUpstream)
		if res.Status != 200 || !reflect.DeepEqual(lookup(res.Forwarded.Headers, "content-length"), []string{"10"}) {
			t.Fatalf("status %d %q headers %v", res.Status, res.Details, res.Forwarded.Headers)
		}
	})
	t.Run("header mutation dropped when headers were skipped", func(t *testing.T) {
		f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
			if req.GetRequestBody() != nil {
				return []*extprocv3.ProcessingResponse{bodyReply(req, newBody, &extprocv3.HeaderMutation{
					SetHeaders: []*corev3.HeaderValueOption{setRaw("x-late", "1")}})}
			}
			return continueAll(req)
		})
		cfg := FilterConfig{ProcessingMode: &extprocfilterv3.ProcessingMode{RequestHeaderMode: skip, RequestBodyMode: buffered, ResponseHeaderMode: skip}}
		res := do(t, dial(t, f, cfg), &Request{
			Method: "POST", Body: body, Headers: [][2]string{{"content-length", "8"}},
		}, okUpstream)
		if res.Status != 200 || string(res.Forwarded.Body) != "rewritten!" {
			t.Fatalf("status %d %q body %q", res.Status, res.Details, res.Forwarded.Body)
		}
		if lookup(res.Forwarded.Headers, "x-late") != nil {
			t.Error("a header mutation after the headers went on must be dropped")
		}
		if lookup(res.Forwarded.Headers, "content-length") != nil {
			t.Error("BUFFERED with skipped headers drops content-length")
		}
		if got := kinds(res.Sent); !reflect.DeepEqual(got, []string{"request_body"}) || res.Sent[0].GetProtocolConfig() == nil {
			t.Errorf("sent %v", got)
		}
	})
}

func TestContinueAndReplace(t *testing.T) {
	f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
		if req.GetRequestHeaders() != nil {
			return []*extprocv3.ProcessingResponse{{Response: &extprocv3.ProcessingResponse_RequestHeaders{
				RequestHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{
					Status:         extprocv3.CommonResponse_CONTINUE_AND_REPLACE,
					HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{setRaw(":method", "PUT")}},
					BodyMutation:   &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: []byte("new")}},
				}}}}}
		}
		return continueAll(req)
	})
	cfg := FilterConfig{ProcessingMode: &extprocfilterv3.ProcessingMode{RequestBodyMode: buffered}}
	res := do(t, dial(t, f, cfg), &Request{
		Method: "POST", Body: []byte("old body"), Headers: [][2]string{{"content-length", "8"}},
	}, okUpstream)
	if res.Forwarded.Method != "PUT" || string(res.Forwarded.Body) != "new" || lookup(res.Forwarded.Headers, "content-length") != nil {
		t.Fatalf("forwarded %+v", res.Forwarded)
	}
	if got := kinds(res.Sent); !reflect.DeepEqual(got, []string{"request_headers", "response_headers"}) {
		t.Errorf("sent %v: nothing more of a replaced request goes out", got)
	}
}

func TestBodyOverLimit(t *testing.T) {
	mode := &extprocfilterv3.ProcessingMode{RequestBodyMode: buffered, ResponseBodyMode: buffered}
	t.Run("request", func(t *testing.T) {
		f := newServer(t, continueAll)
		res := do(t, dial(t, f, FilterConfig{ProcessingMode: mode, MaxBufferBytes: 16}), &Request{Method: "POST", Body: bytes.Repeat([]byte("a"), 17)}, okUpstream)
		if res.Status != 413 || res.Details != DetailsRequestTooLarge || res.Forwarded != nil || string(res.Body) != "Payload Too Large" {
			t.Fatalf("status %d details %q", res.Status, res.Details)
		}
		if got := kinds(res.Sent); !reflect.DeepEqual(got, []string{"request_headers"}) {
			t.Errorf("sent %v", got)
		}
	})
	t.Run("request at the limit", func(t *testing.T) {
		f := newServer(t, continueAll)
		res := do(t, dial(t, f, FilterConfig{ProcessingMode: mode, MaxBufferBytes: 16}), &Request{Method: "POST", Body: bytes.Repeat([]byte("a"), 16)}, okUpstream)
		if res.Status != 200 {
			t.Fatalf("status %d details %q", res.Status, res.Details)
		}
	})
	t.Run("response", func(t *testing.T) {
		f := newServer(t, continueAll)
		res := do(t, dial(t, f, FilterConfig{ProcessingMode: mode, MaxBufferBytes: 16}), &Request{}, func(*Forwarded) *Response {
			return &Response{Body: bytes.Repeat([]byte("b"), 100)}
		})
		if res.Status != 500 || res.Details != DetailsResponseTooLarge || res.Forwarded == nil {
			t.Fatalf("status %d details %q", res.Status, res.Details)
		}
		if got := kinds(res.Sent); !reflect.DeepEqual(got, []string{"request_headers", "response_headers"}) {
			t.Errorf("sent %v", got)
		}
	})
}

func TestAttributes(t *testing.T) {
	f := newServer(t, continueAll)
	cfg := FilterConfig{
		ProcessingMode:     &extprocfilterv3.ProcessingMode{RequestBodyMode: buffered, ResponseBodyMode: buffered},
		RequestAttributes:  []string{"xds.route_name", "request.id"},
		ResponseAttributes: []string{"response.code"},
	}
	res := do(t, dial(t, f, cfg), &Request{
		Method: "POST", Body: []byte("b"),
		Attributes: map[string]string{"xds.route_name": "r1", "response.code": "200"},
	}, okUpstream)
	if got, want := kinds(res.Sent), []string{"request_headers", "request_body", "response_headers", "response_body"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("sent %v", got)
	}
	reqAttrs := res.Sent[0].GetAttributes()[attributesKey]
	if reqAttrs == nil || len(reqAttrs.GetFields()) != 1 || reqAttrs.GetFields()["xds.route_name"].GetStringValue() != "r1" {
		t.Errorf("request attributes %v", res.Sent[0].GetAttributes())
	}
	respAttrs := res.Sent[2].GetAttributes()[attributesKey]
	if respAttrs == nil || len(respAttrs.GetFields()) != 1 || respAttrs.GetFields()["response.code"].GetStringValue() != "200" {
		t.Errorf("response attributes %v", res.Sent[2].GetAttributes())
	}
	for _, i := range []int{1, 3} {
		if res.Sent[i].GetAttributes() != nil {
			t.Errorf("message %d (%s) carries attributes again", i, kind(res.Sent[i]))
		}
	}
	if res.Sent[0].GetRequestHeaders().GetAttributes() != nil {
		t.Error("attributes belong on ProcessingRequest, not HttpHeaders")
	}
}

func TestRepeatedHeadersSentSeparately(t *testing.T) {
	f := newServer(t, continueAll)
	res := do(t, dial(t, f, FilterConfig{}), &Request{Headers: [][2]string{
		{"Accept", "a"}, {"x-other", "o"}, {"accept", "b"}, {"host", "from-host"},
	}}, func(*Forwarded) *Response {
		return &Response{Headers: [][2]string{{"Set-Cookie", "a=1"}, {"set-cookie", "b=2"}}}
	})
	var got []string
	for _, h := range headersOf(res.Sent[0]) {
		got = append(got, h.GetKey()+"="+string(h.GetRawValue()))
	}
	want := []string{":authority=from-host", ":path=/", ":method=GET", ":scheme=http", "accept=a", "x-other=o", "accept=b"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("request headers %v, want %v", got, want)
	}
	got = nil
	for _, h := range headersOf(res.Sent[1]) {
		got = append(got, h.GetKey()+"="+string(h.GetRawValue()))
	}
	if want := []string{":status=200", "set-cookie=a=1", "set-cookie=b=2"}; !reflect.DeepEqual(got, want) {
		t.Errorf("response headers %v, want %v", got, want)
	}
}

func TestTrailersAndEndOfStream(t *testing.T) {
	f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
		if req.GetRequestTrailers() != nil {
			return []*extprocv3.ProcessingResponse{continueFor(req, &extprocv3.HeaderMutation{
				SetHeaders: []*corev3.HeaderValueOption{setRaw("x-checksum", "ok")}})}
		}
		return continueAll(req)
	})
	cfg := FilterConfig{ProcessingMode: &extprocfilterv3.ProcessingMode{
		RequestBodyMode: buffered, RequestTrailerMode: send, ResponseTrailerMode: send,
	}}
	res := do(t, dial(t, f, cfg), &Request{
		Method: "POST", Body: []byte("data"), Trailers: [][2]string{{"grpc-status", "0"}},
	}, func(*Forwarded) *Response {
		return &Response{Body: []byte("r"), Trailers: [][2]string{{"x-t", "1"}}}
	})
	if got, want := kinds(res.Sent), []string{"request_headers", "request_body", "request_trailers", "response_headers", "response_trailers"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("sent %v, want %v", got, want)
	}
	if res.Sent[0].GetRequestHeaders().GetEndOfStream() || res.Sent[1].GetRequestBody().GetEndOfStream() {
		t.Error("end_of_stream must be false when trailers follow")
	}
	if !reflect.DeepEqual(lookup(res.Forwarded.Trailers, "x-checksum"), []string{"ok"}) || string(res.Forwarded.Body) != "data" {
		t.Errorf("forwarded trailers %v body %q", res.Forwarded.Trailers, res.Forwarded.Body)
	}
	if !reflect.DeepEqual(res.Trailers, [][2]string{{"x-t", "1"}}) || string(res.Body) != "r" {
		t.Errorf("downstream trailers %v body %q", res.Trailers, res.Body)
	}
}

func TestStreamedBody(t *testing.T) {
	var mu sync.Mutex
	var chunks []string
	f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
		if b := req.GetRequestBody(); b != nil {
			mu.Lock()
			chunks = append(chunks, fmt.Sprintf("%s:%v", b.GetBody(), b.GetEndOfStream()))
			mu.Unlock()
			return []*extprocv3.ProcessingResponse{{Response: &extprocv3.ProcessingResponse_RequestBody{
				RequestBody: &extprocv3.BodyResponse{Response: &extprocv3.CommonResponse{
					BodyMutation: &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: bytes.ToUpper(b.GetBody())}},
				}}}}}
		}
		return continueAll(req)
	})
	cfg := FilterConfig{ChunkBytes: 3, ProcessingMode: &extprocfilterv3.ProcessingMode{RequestBodyMode: streamed}}
	res := do(t, dial(t, f, cfg), &Request{
		Method: "POST", Body: []byte("abcdefgh"), Headers: [][2]string{{"content-length", "8"}},
	}, okUpstream)
	if want := []string{"abc:false", "def:false", "gh:true"}; !reflect.DeepEqual(chunks, want) {
		t.Errorf("chunks %v, want %v", chunks, want)
	}
	if string(res.Forwarded.Body) != "ABCDEFGH" || lookup(res.Forwarded.Headers, "content-length") != nil {
		t.Errorf("forwarded %q headers %v", res.Forwarded.Body, res.Forwarded.Headers)
	}
	if !reflect.DeepEqual(lookup(headersPairs(res.Sent[0]), "content-length"), []string{"8"}) {
		t.Error("the server still sees the original content-length")
	}
}

func headersPairs(m *extprocv3.ProcessingRequest) [][2]string {
	var out [][2]string
	for _, h := range headersOf(m) {
		out = append(out, [2]string{h.GetKey(), string(h.GetRawValue())})
	}
	return out
}

func TestConcurrentRequests(t *testing.T) {
	f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
		if h := req.GetRequestHeaders(); h != nil {
			var id string
			for _, hv := range h.GetHeaders().GetHeaders() {
				if hv.GetKey() == "x-id" {
					id = string(hv.GetRawValue())
				}
			}
			return []*extprocv3.ProcessingResponse{continueFor(req, &extprocv3.HeaderMutation{
				SetHeaders: []*corev3.HeaderValueOption{setRaw("x-echo", id)}})}
		}
		return continueAll(req)
	})
	c := dial(t, f, FilterConfig{Connections: 3})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	var failures atomic.Int32
	for i := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprint(i)
			res, err := c.Do(ctx, &Request{Headers: [][2]string{{"x-id", id}}}, okUpstream)
			if err != nil || res.Status != 200 || !reflect.DeepEqual(lookup(res.Forwarded.Headers, "x-echo"), []string{id}) {
				if failures.Add(1) == 1 {
					t.Logf("first failure: err %v, result %+v", err, res)
				}
			}
		}()
	}
	wg.Wait()
	if n := failures.Load(); n != 0 {
		t.Fatalf("%d of 64 requests failed", n)
	}
}

func TestContextCancel(t *testing.T) {
	f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse { return nil })
	c := dial(t, f, FilterConfig{MessageTimeout: 10 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if res, err := c.Do(ctx, &Request{}, okUpstream); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, result %+v", err, res)
	}
}

func TestUnsupportedMode(t *testing.T) {
	_, err := Dial("127.0.0.1:1", FilterConfig{ProcessingMode: &extprocfilterv3.ProcessingMode{
		RequestBodyMode: extprocfilterv3.ProcessingMode_FULL_DUPLEX_STREAMED,
	}})
	if !errors.Is(err, errUnsupported) {
		t.Fatalf("err = %v", err)
	}
}

func TestBufferedPartialBody(t *testing.T) {
	var mu sync.Mutex
	var sent []string
	f := newServer(t, func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
		if b := req.GetRequestBody(); b != nil {
			mu.Lock()
			sent = append(sent, fmt.Sprintf("%s:%v", b.GetBody(), b.GetEndOfStream()))
			mu.Unlock()
			return []*extprocv3.ProcessingResponse{{Response: &extprocv3.ProcessingResponse_RequestBody{
				RequestBody: &extprocv3.BodyResponse{Response: &extprocv3.CommonResponse{
					BodyMutation: &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: bytes.ToUpper(b.GetBody())}},
				}}}}}
		}
		return continueAll(req)
	})
	cfg := FilterConfig{ChunkBytes: 4, MaxBufferBytes: 8, ProcessingMode: &extprocfilterv3.ProcessingMode{
		RequestBodyMode: extprocfilterv3.ProcessingMode_BUFFERED_PARTIAL,
	}}
	c := dial(t, f, cfg)

	// Over the limit: what was queued when it was crossed goes out; the rest passes.
	res := do(t, c, &Request{Method: "POST", Body: []byte("abcdefghijklmnopqrst")}, okUpstream)
	if string(res.Forwarded.Body) != "ABCDEFGHIJKLmnopqrst" {
		t.Errorf("forwarded %q", res.Forwarded.Body)
	}
	// Under the limit: the whole body in one message, like BUFFERED.
	res = do(t, c, &Request{Method: "POST", Body: []byte("abcdef")}, okUpstream)
	if string(res.Forwarded.Body) != "ABCDEF" {
		t.Errorf("forwarded %q", res.Forwarded.Body)
	}
	if want := []string{"abcdefghijkl:false", "abcdef:true"}; !reflect.DeepEqual(sent, want) {
		t.Errorf("bodies sent %v, want %v", sent, want)
	}
}

func TestStreamedBodyWithTrailers(t *testing.T) {
	f := newServer(t, continueAll)
	cfg := FilterConfig{ChunkBytes: 2, ProcessingMode: &extprocfilterv3.ProcessingMode{
		RequestBodyMode: streamed, RequestTrailerMode: send, ResponseHeaderMode: skip,
	}}
	res := do(t, dial(t, f, cfg), &Request{Method: "POST", Body: []byte("abcd"), Trailers: [][2]string{{"x-t", "1"}}}, okUpstream)
	if got, want := kinds(res.Sent), []string{"request_headers", "request_body", "request_body", "request_trailers"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("sent %v, want %v", got, want)
	}
	for _, m := range res.Sent[1:3] {
		if m.GetRequestBody().GetEndOfStream() {
			t.Error("no chunk ends the stream when trailers follow")
		}
	}
	if string(res.Forwarded.Body) != "abcd" || res.Status != 200 {
		t.Errorf("forwarded %q status %d", res.Forwarded.Body, res.Status)
	}
}
