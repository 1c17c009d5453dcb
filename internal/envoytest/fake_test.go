package envoytest

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// fakeServer is an ext_proc server on 127.0.0.1 whose per-stream behaviour each test
// supplies. It records how every stream ended as seen from the server's Recv.
type fakeServer struct {
	extprocv3.UnimplementedExternalProcessorServer
	handle  func(srv extprocv3.ExternalProcessor_ProcessServer) error
	addr    string
	streams atomic.Int32

	mu   sync.Mutex
	ends []error
	got  chan struct{}
}

func startServer(t *testing.T, handle func(srv extprocv3.ExternalProcessor_ProcessServer) error) *fakeServer {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeServer{handle: handle, addr: lis.Addr().String(), got: make(chan struct{}, 1024)}
	gs := grpc.NewServer()
	extprocv3.RegisterExternalProcessorServer(gs, f)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = gs.Serve(lis)
	}()
	t.Cleanup(func() {
		gs.Stop()
		<-done
	})
	return f
}

func (f *fakeServer) Process(srv extprocv3.ExternalProcessor_ProcessServer) error {
	f.streams.Add(1)
	return f.handle(srv)
}

// recordEnd notes the error that ended a stream's Recv loop.
func (f *fakeServer) recordEnd(err error) {
	f.mu.Lock()
	f.ends = append(f.ends, err)
	f.mu.Unlock()
	f.got <- struct{}{}
}

// waitEnd returns the way the next stream ended.
func (f *fakeServer) waitEnd(t *testing.T) error {
	t.Helper()
	select {
	case <-f.got:
	case <-time.After(5 * time.Second):
		t.Fatal("the server never saw the stream end")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ends[len(f.ends)-1]
}

// serve answers each request with what respond returns (nothing to leave it unanswered)
// until the stream ends.
func (f *fakeServer) serve(respond func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse) func(extprocv3.ExternalProcessor_ProcessServer) error {
	return func(srv extprocv3.ExternalProcessor_ProcessServer) error {
		for {
			req, err := srv.Recv()
			if err != nil {
				f.recordEnd(err)
				return nil
			}
			for _, r := range respond(req) {
				if err := srv.Send(r); err != nil {
					f.recordEnd(err)
					return nil
				}
			}
		}
	}
}

// newServer starts a server whose streams run serve(respond).
func newServer(t *testing.T, respond func(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse) *fakeServer {
	var f *fakeServer
	f = startServer(t, func(srv extprocv3.ExternalProcessor_ProcessServer) error {
		return f.serve(respond)(srv)
	})
	return f
}

// dial connects to f. Tests not about timing get a generous message timeout so that a
// loaded machine cannot turn them into 504s.
func dial(t *testing.T, f *fakeServer, cfg FilterConfig) *Client {
	t.Helper()
	if cfg.MessageTimeout == 0 {
		cfg.MessageTimeout = 5 * time.Second
	}
	c, err := Dial(f.addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func do(t *testing.T, c *Client, req *Request, up Upstream) *Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := c.Do(ctx, req, up)
	if err != nil {
		t.Fatalf("Do: %v", err)
	}
	return res
}

func isCanceled(err error) bool {
	return status.Code(err) == codes.Canceled && !errors.Is(err, io.EOF)
}

// --- reply builders ---

func common(hm *extprocv3.HeaderMutation) *extprocv3.CommonResponse {
	if hm == nil {
		return nil
	}
	return &extprocv3.CommonResponse{HeaderMutation: hm}
}

// continueFor answers req with CONTINUE of the matching type, carrying hm if given.
func continueFor(req *extprocv3.ProcessingRequest, hm *extprocv3.HeaderMutation) *extprocv3.ProcessingResponse {
	switch req.GetRequest().(type) {
	case *extprocv3.ProcessingRequest_RequestHeaders:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{
			RequestHeaders: &extprocv3.HeadersResponse{Response: common(hm)}}}
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{
			ResponseHeaders: &extprocv3.HeadersResponse{Response: common(hm)}}}
	case *extprocv3.ProcessingRequest_RequestBody:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{
			RequestBody: &extprocv3.BodyResponse{Response: common(hm)}}}
	case *extprocv3.ProcessingRequest_ResponseBody:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{
			ResponseBody: &extprocv3.BodyResponse{Response: common(hm)}}}
	case *extprocv3.ProcessingRequest_RequestTrailers:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestTrailers{
			RequestTrailers: &extprocv3.TrailersResponse{HeaderMutation: hm}}}
	case *extprocv3.ProcessingRequest_ResponseTrailers:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseTrailers{
			ResponseTrailers: &extprocv3.TrailersResponse{HeaderMutation: hm}}}
	}
	return &extprocv3.ProcessingResponse{}
}

func continueAll(req *extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
	return []*extprocv3.ProcessingResponse{continueFor(req, nil)}
}

func setRaw(key, value string) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: key, RawValue: []byte(value)}}
}

func appendRaw(key, value string) *corev3.HeaderValueOption {
	o := setRaw(key, value)
	o.Append = wrapperspb.Bool(true)
	return o
}

func immediate(code int, body string, hm *extprocv3.HeaderMutation) *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{
		ImmediateResponse: &extprocv3.ImmediateResponse{
			Status:  httpStatus(code),
			Headers: hm,
			Body:    []byte(body),
			Details: "denied by policy",
		}}}
}

// --- inspecting what was sent ---

func kind(m *extprocv3.ProcessingRequest) string {
	switch m.GetRequest().(type) {
	case *extprocv3.ProcessingRequest_RequestHeaders:
		return "request_headers"
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		return "response_headers"
	case *extprocv3.ProcessingRequest_RequestBody:
		return "request_body"
	case *extprocv3.ProcessingRequest_ResponseBody:
		return "response_body"
	case *extprocv3.ProcessingRequest_RequestTrailers:
		return "request_trailers"
	case *extprocv3.ProcessingRequest_ResponseTrailers:
		return "response_trailers"
	}
	return "none"
}

func kinds(ms []*extprocv3.ProcessingRequest) []string {
	var out []string
	for _, m := range ms {
		out = append(out, kind(m))
	}
	return out
}

func headersOf(m *extprocv3.ProcessingRequest) []*corev3.HeaderValue {
	if h := m.GetRequestHeaders(); h != nil {
		return h.GetHeaders().GetHeaders()
	}
	if h := m.GetResponseHeaders(); h != nil {
		return h.GetHeaders().GetHeaders()
	}
	if t := m.GetRequestTrailers(); t != nil {
		return t.GetTrailers().GetHeaders()
	}
	return m.GetResponseTrailers().GetTrailers().GetHeaders()
}

func lookup(pairs [][2]string, key string) []string {
	var out []string
	for _, p := range pairs {
		if p[0] == key {
			out = append(out, p[1])
		}
	}
	return out
}
