package loadtest

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/grpc"

	"github.com/policy-engine/policy-engine/loadtest/noop"
)

// scriptServer answers each message with what reply returns, and records what it saw.
type scriptServer struct {
	extprocv3.UnimplementedExternalProcessorServer
	reply    func(*extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse
	messages atomic.Int64
	respHdrs atomic.Int64
	last     atomic.Pointer[extprocv3.ProcessingRequest]
	open     atomic.Int64
}

func (s *scriptServer) Process(ps extprocv3.ExternalProcessor_ProcessServer) error {
	s.open.Add(1)
	defer s.open.Add(-1)
	for {
		req, err := ps.Recv()
		if err != nil {
			return nil
		}
		s.messages.Add(1)
		if req.GetResponseHeaders() != nil {
			s.respHdrs.Add(1)
		} else {
			s.last.Store(req)
		}
		if err := ps.Send(s.reply(req)); err != nil {
			return nil
		}
	}
}

func serveExtProc(t *testing.T, impl extprocv3.ExternalProcessorServer) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	extprocv3.RegisterExternalProcessorServer(srv, impl)
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(srv.Stop)
	return ln.Addr().String()
}

func dialTest(t *testing.T, addr string, n int) *Conns {
	t.Helper()
	c, err := Dial(addr, n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func noopReply(req *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
	r, _ := noop.Reply(req)
	return r
}

func TestExchangeIsEnvoyLike(t *testing.T) {
	s := &scriptServer{reply: noopReply}
	c := dialTest(t, serveExtProc(t, s), 2)
	res := ClosedLoop(context.Background(), c, DefaultTraffic("/api/v1/users", "k"), 4, 300*time.Millisecond)
	if res.Errors != 0 || res.Requests == 0 {
		t.Fatalf("requests %d, errors %d: %v", res.Requests, res.Errors, res.TopErrors())
	}
	// Two messages per request: request headers, then response headers.
	if got := s.respHdrs.Load(); got < res.Requests {
		t.Errorf("%d response_headers messages for %d requests", got, res.Requests)
	}
	req := s.last.Load()
	h := req.GetRequestHeaders()
	if !h.GetEndOfStream() || req.GetProtocolConfig() == nil {
		t.Errorf("request_headers: end_of_stream %v, protocol_config %v", h.GetEndOfStream(), req.GetProtocolConfig())
	}
	var sawID bool
	for _, hv := range h.GetHeaders().GetHeaders() {
		if hv.GetValue() != "" || len(hv.GetRawValue()) == 0 {
			t.Errorf("header %q: value %q, raw_value %q; Envoy sends raw_value only", hv.GetKey(), hv.GetValue(), hv.GetRawValue())
		}
		if hv.GetKey() == "x-request-id" && strings.HasPrefix(string(hv.GetRawValue()), "loadtest-") {
			sawID = true
		}
	}
	if !sawID {
		t.Error("no per-request x-request-id")
	}
	attrs := req.GetAttributes()[attributesKey].GetFields()
	if attrs["xds.route_name"].GetStringValue() != "/api/v1/users" || attrs["source.address"].GetStringValue() == "" {
		t.Errorf("attributes = %v", attrs)
	}
	// Every stream was reset at the end.
	deadline := time.Now().Add(5 * time.Second)
	for s.open.Load() != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := s.open.Load(); n != 0 {
		t.Errorf("%d streams still open on the server", n)
	}
}

func TestExchangeHonoursSkip(t *testing.T) {
	s := &scriptServer{reply: func(req *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
		r := noopReply(req)
		r.ModeOverride = &filterv3.ProcessingMode{ResponseHeaderMode: filterv3.ProcessingMode_SKIP}
		return r
	}}
	c := dialTest(t, serveExtProc(t, s), 1)
	res := OpenLoop(context.Background(), c, DefaultTraffic("", "k"), 200, 250*time.Millisecond, 100)
	if res.Errors != 0 || res.Requests != 50 {
		t.Fatalf("requests %d, errors %d, want 50 and 0: %v", res.Requests, res.Errors, res.TopErrors())
	}
	if n := s.respHdrs.Load(); n != 0 {
		t.Errorf("%d response_headers sent despite response_header_mode SKIP", n)
	}
	if _, ok := s.last.Load().GetAttributes()[attributesKey].GetFields()["xds.route_name"]; ok {
		t.Error("empty route name sent as an attribute")
	}
}

func TestExchangeErrors(t *testing.T) {
	immediate := &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{ImmediateResponse: &extprocv3.ImmediateResponse{
		Status: &typev3.HttpStatus{Code: typev3.StatusCode_Forbidden},
	}}}
	wrong := &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{}}}
	for _, c := range []struct {
		name  string
		reply func(*extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse
		want  string
	}{
		{"immediate on request", func(*extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse { return immediate }, "immediate response 403 to request_headers"},
		{"wrong type on request", func(*extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse { return wrong }, "reply of type *ext_procv3.ProcessingResponse_RequestBody to request_headers"},
		{"immediate on response", func(r *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
			if r.GetResponseHeaders() != nil {
				return immediate
			}
			return noopReply(r)
		}, "immediate response 403 to response_headers"},
		{"wrong type on response", func(r *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
			if r.GetResponseHeaders() != nil {
				return wrong
			}
			return noopReply(r)
		}, "to response_headers"},
	} {
		t.Run(c.name, func(t *testing.T) {
			conns := dialTest(t, serveExtProc(t, &scriptServer{reply: c.reply}), 1)
			res := ClosedLoop(context.Background(), conns, DefaultTraffic("r", "k"), 2, 100*time.Millisecond)
			if res.Requests != 0 || res.Errors == 0 {
				t.Fatalf("requests %d, errors %d", res.Requests, res.Errors)
			}
			if errs := res.TopErrors(); len(errs) != 1 || !strings.Contains(errs[0], c.want) {
				t.Fatalf("errors %v, want one kind mentioning %q", errs, c.want)
			}
		})
	}
}

// stallServer never answers.
type stallServer struct {
	extprocv3.UnimplementedExternalProcessorServer
}

func (stallServer) Process(ps extprocv3.ExternalProcessor_ProcessServer) error {
	<-ps.Context().Done()
	return nil
}

func TestOpenLoopDropsPastMaxInFlightAndStopsOnCancel(t *testing.T) {
	c := dialTest(t, serveExtProc(t, stallServer{}), 1)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(300*time.Millisecond, cancel)
	res := OpenLoop(ctx, c, DefaultTraffic("r", "k"), 100, time.Second, 5)
	if res.Requests != 0 {
		t.Fatalf("%d requests succeeded on a server that never answers", res.Requests)
	}
	if res.Dropped == 0 || res.Errors < res.Dropped {
		t.Fatalf("dropped %d, errors %d: want requests past the 5 in flight dropped and counted", res.Dropped, res.Errors)
	}
	if res.Elapsed > 900*time.Millisecond {
		t.Errorf("open loop ran %s after cancellation at 300ms", res.Elapsed)
	}
}

func TestHoldKeepsStreamsOpen(t *testing.T) {
	s := &scriptServer{reply: noopReply}
	c := dialTest(t, serveExtProc(t, s), 2)
	h := Hold(context.Background(), c, DefaultTraffic("r", "k"), 300, 32)
	if h.Opened != 300 || h.Errors != 0 {
		t.Fatalf("opened %d, errors %d (%v)", h.Opened, h.Errors, h.FirstError)
	}
	if n := s.open.Load(); n != 300 {
		t.Fatalf("server sees %d open streams, want 300", n)
	}
	h.Release()
	deadline := time.Now().Add(5 * time.Second)
	for s.open.Load() != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := s.open.Load(); n != 0 {
		t.Fatalf("%d streams open after Release", n)
	}
	// Against a server that refuses streams, every open fails.
	bad := &scriptServer{reply: func(*extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
		return &extprocv3.ProcessingResponse{}
	}}
	hb := Hold(context.Background(), dialTest(t, serveExtProc(t, bad), 1), DefaultTraffic("r", "k"), 10, 4)
	if hb.Opened != 0 || hb.Errors != 10 || hb.FirstError == nil {
		t.Fatalf("opened %d, errors %d, first %v", hb.Opened, hb.Errors, hb.FirstError)
	}
}

func TestResult(t *testing.T) {
	r := newRecorder()
	for i := range 100 {
		r.record(time.Duration(i+1)*time.Millisecond, nil)
	}
	for i := range 20 {
		r.record(0, errors.New("e"+string(rune('a'+i%10))))
	}
	r.record(0, io.EOF)
	res := r.result(2*time.Second, 3)
	if res.Requests != 100 || res.Errors != 24 || res.Dropped != 3 {
		t.Fatalf("result %+v", res)
	}
	if res.Rate() != 50 {
		t.Errorf("rate %g, want 50", res.Rate())
	}
	if q := res.Quantile(50); q < 49_000 || q > 51_000 {
		t.Errorf("p50 = %d µs, want about 50ms", q)
	}
	// Only the first few distinct messages are kept, most frequent first.
	errs := res.TopErrors()
	if len(errs) != maxErrorSamples || errs[0] != "ea" {
		t.Errorf("top errors %v", errs)
	}
	if (&Result{}).Rate() != 0 {
		t.Error("rate of an empty result")
	}
}
