// Package loadtest drives an ext_proc server the way Envoy does and measures what each request
// costs it: latency (HDR histograms, open loop from the intended send time so that a stalled
// server cannot hide its stall), throughput (closed loop), CPU time and peak RSS of the server
// processes (from /proc), always next to the no-op baseline of loadtest/noop measured in the
// same run on the same traffic.
package loadtest

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/structpb"
)

// attributesKey is the map key under which Envoy's ext_proc filter sends its attributes.
const attributesKey = "envoy.filters.http.ext_proc"

// Traffic is the HTTP exchange every simulated request goes through.
type Traffic struct {
	// RouteName is sent as the xds.route_name attribute; empty leaves it out.
	RouteName string
	// SourceAddress is sent as the source.address attribute; empty leaves it out.
	SourceAddress string
	// RequestHeaders are the request's headers, pseudo-headers first, lowercase names. An
	// x-request-id header unique to each request is added.
	RequestHeaders [][2]string
	// ResponseHeaders are the upstream's response headers, :status first.
	ResponseHeaders [][2]string
}

// DefaultTraffic is a GET with the headers a browser or SDK behind Envoy typically sends, the
// API key of the load-test config, and a small JSON response.
func DefaultTraffic(routeName, apiKey string) *Traffic {
	return &Traffic{
		RouteName:     routeName,
		SourceAddress: "127.0.0.1:40000",
		RequestHeaders: [][2]string{
			{":authority", "api.example.com"},
			{":path", "/api/v1/users/42?fields=name,email"},
			{":method", "GET"},
			{":scheme", "https"},
			{"user-agent", "loadtest/1.0"},
			{"accept", "application/json"},
			{"accept-encoding", "gzip, deflate, br"},
			{"x-forwarded-proto", "https"},
			{"x-forwarded-for", "203.0.113.7"},
			{"x-api-key", apiKey},
		},
		ResponseHeaders: [][2]string{
			{":status", "200"},
			{"content-type", "application/json"},
			{"content-length", "512"},
			{"date", "Sat, 01 Nov 2025 12:00:00 GMT"},
			{"x-envoy-upstream-service-time", "3"},
		},
	}
}

// exchanger builds the messages of one request's stream.
type exchanger struct {
	tr         *Traffic
	reqHeaders []*corev3.HeaderValue
	respMsg    *extprocv3.ProcessingRequest
	attrs      map[string]*structpb.Struct
	seq        atomic.Uint64
}

func newExchanger(tr *Traffic) *exchanger {
	e := &exchanger{tr: tr}
	for _, h := range tr.RequestHeaders {
		e.reqHeaders = append(e.reqHeaders, &corev3.HeaderValue{Key: h[0], RawValue: []byte(h[1])})
	}
	fields := map[string]*structpb.Value{}
	if tr.RouteName != "" {
		fields["xds.route_name"] = structpb.NewStringValue(tr.RouteName)
	}
	if tr.SourceAddress != "" {
		fields["source.address"] = structpb.NewStringValue(tr.SourceAddress)
	}
	if len(fields) > 0 {
		e.attrs = map[string]*structpb.Struct{attributesKey: {Fields: fields}}
	}
	var resp []*corev3.HeaderValue
	for _, h := range tr.ResponseHeaders {
		resp = append(resp, &corev3.HeaderValue{Key: h[0], RawValue: []byte(h[1])})
	}
	e.respMsg = &extprocv3.ProcessingRequest{
		Request: &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: &extprocv3.HttpHeaders{
			Headers:     &corev3.HeaderMap{Headers: resp},
			EndOfStream: false, // the response has a body, which the filter does not send
		}},
		MetadataContext: &corev3.Metadata{},
	}
	return e
}

// requestMsg is the first message of a stream: request headers with values in raw_value only,
// the request attributes and the protocol config, as Envoy sends them. The message is only
// read by the gRPC encoder, so the header values other than x-request-id are shared.
func (e *exchanger) requestMsg() *extprocv3.ProcessingRequest {
	hs := make([]*corev3.HeaderValue, 0, len(e.reqHeaders)+1)
	hs = append(hs, e.reqHeaders...)
	id := strconv.AppendUint([]byte("loadtest-"), e.seq.Add(1), 10)
	hs = append(hs, &corev3.HeaderValue{Key: "x-request-id", RawValue: id})
	return &extprocv3.ProcessingRequest{
		Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
			Headers:     &corev3.HeaderMap{Headers: hs},
			EndOfStream: true, // a GET: no body follows
		}},
		Attributes:      e.attrs,
		MetadataContext: &corev3.Metadata{},
		ProtocolConfig: &extprocv3.ProtocolConfiguration{
			RequestBodyMode:  filterv3.ProcessingMode_NONE,
			ResponseBodyMode: filterv3.ProcessingMode_NONE,
		},
	}
}

// errImmediate marks a request the server answered with an immediate response: the load-test
// traffic is always allowed, so that is an error.
var errImmediate = errors.New("immediate response")

// open starts a request's stream and completes its request phase. It returns whether Envoy
// would go on to send the response headers on this stream: not when the reply's mode_override
// skips them.
func (e *exchanger) open(ctx context.Context, c extprocv3.ExternalProcessorClient) (extprocv3.ExternalProcessor_ProcessClient, bool, error) {
	ps, err := c.Process(ctx)
	if err != nil {
		return nil, false, fmt.Errorf("open stream: %w", err)
	}
	if err := ps.Send(e.requestMsg()); err != nil {
		return nil, false, fmt.Errorf("send request_headers: %w", err)
	}
	resp, err := ps.Recv()
	if err != nil {
		return nil, false, fmt.Errorf("receive request_headers reply: %w", err)
	}
	switch r := resp.GetResponse().(type) {
	case *extprocv3.ProcessingResponse_RequestHeaders:
	case *extprocv3.ProcessingResponse_ImmediateResponse:
		return nil, false, fmt.Errorf("%w %d to request_headers", errImmediate, r.ImmediateResponse.GetStatus().GetCode())
	default:
		return nil, false, fmt.Errorf("reply of type %T to request_headers", r)
	}
	m := resp.GetModeOverride()
	return ps, m == nil || m.GetResponseHeaderMode() != filterv3.ProcessingMode_SKIP, nil
}

// exchange runs one HTTP request's whole stream: request headers, response headers unless the
// server skipped them, then the reset with which Envoy ends every stream.
func (e *exchanger) exchange(ctx context.Context, c extprocv3.ExternalProcessorClient) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // Envoy resets the stream when the HTTP exchange ends
	ps, more, err := e.open(ctx, c)
	if err != nil || !more {
		return err
	}
	if err := ps.Send(e.respMsg); err != nil {
		return fmt.Errorf("send response_headers: %w", err)
	}
	resp, err := ps.Recv()
	if err != nil {
		return fmt.Errorf("receive response_headers reply: %w", err)
	}
	switch r := resp.GetResponse().(type) {
	case *extprocv3.ProcessingResponse_ResponseHeaders:
		return nil
	case *extprocv3.ProcessingResponse_ImmediateResponse:
		return fmt.Errorf("%w %d to response_headers", errImmediate, r.ImmediateResponse.GetStatus().GetCode())
	default:
		return fmt.Errorf("reply of type %T to response_headers", r)
	}
}

// Conns is a set of HTTP/2 connections to one ext_proc server, used round-robin like Envoy's
// per-worker connections.
type Conns struct {
	conns   []*grpc.ClientConn
	clients []extprocv3.ExternalProcessorClient
	next    atomic.Uint32
}

// Dial opens n connections to addr.
func Dial(addr string, n int) (*Conns, error) {
	c := &Conns{}
	for range n {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("dial %q: %w", addr, err)
		}
		conn.Connect()
		c.conns = append(c.conns, conn)
		c.clients = append(c.clients, extprocv3.NewExternalProcessorClient(conn))
	}
	return c, nil
}

func (c *Conns) pick() extprocv3.ExternalProcessorClient {
	return c.clients[int(c.next.Add(1)%uint32(len(c.clients)))]
}

// Close closes every connection.
func (c *Conns) Close() {
	for _, conn := range c.conns {
		_ = conn.Close()
	}
}
