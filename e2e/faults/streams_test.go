package faults

import (
	"context"
	"fmt"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/structpb"
)

// Raw ext_proc messages, for streams that end where Envoy's filter never would on its own:
// the client below plays them one at a time and walks away at every step.

func reqHeadersMsg(path string, eos bool, kv ...string) *extprocv3.ProcessingRequest {
	hs := []*corev3.HeaderValue{
		{Key: ":method", RawValue: []byte("POST")},
		{Key: ":path", RawValue: []byte(path)},
		{Key: ":authority", RawValue: []byte("api.example.com")},
		{Key: ":scheme", RawValue: []byte("http")},
	}
	for i := 0; i+1 < len(kv); i += 2 {
		hs = append(hs, &corev3.HeaderValue{Key: kv[i], RawValue: []byte(kv[i+1])})
	}
	return &extprocv3.ProcessingRequest{
		Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{Headers: &corev3.HeaderMap{Headers: hs}, EndOfStream: eos}},
		Attributes: map[string]*structpb.Struct{"envoy.filters.http.ext_proc": {Fields: map[string]*structpb.Value{
			"source.address": structpb.NewStringValue("192.0.2.10:40000"),
		}}},
	}
}

func respHeadersMsg(eos bool) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: &extprocv3.HttpHeaders{
		Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{{Key: ":status", RawValue: []byte("200")}}}, EndOfStream: eos,
	}}}
}

func reqBodyMsg(b string) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: []byte(b), EndOfStream: true}}}
}

func respBodyMsg(b string) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{ResponseBody: &extprocv3.HttpBody{Body: []byte(b), EndOfStream: true}}}
}

// earlyEnd is a way for Envoy to leave a stream: after sending steps messages and reading
// replies replies, it cancels, optionally after a pause (to land inside the agent call) or
// after half-closing.
type earlyEnd struct {
	name     string
	msgs     []*extprocv3.ProcessingRequest
	replies  int
	pause    time.Duration
	halfDone bool
}

// earlyEnds covers every phase of a stream on the routes of leakKernelYAML.
var earlyEnds = []earlyEnd{
	{name: "before any message"},
	{name: "during the request-headers agent call", msgs: []*extprocv3.ProcessingRequest{reqHeadersMsg("/slow", true)}, pause: 20 * time.Millisecond},
	{name: "after the request-headers reply", msgs: []*extprocv3.ProcessingRequest{reqHeadersMsg("/both", true)}, replies: 1},
	{name: "during the request-body agent call", msgs: []*extprocv3.ProcessingRequest{reqHeadersMsg("/body", false), reqBodyMsg(`{"a":1}`)}, replies: 1, pause: time.Millisecond},
	{name: "after the request-body reply", msgs: []*extprocv3.ProcessingRequest{reqHeadersMsg("/body", false), reqBodyMsg(`{"a":1}`)}, replies: 2},
	{name: "during the response-headers agent call", msgs: []*extprocv3.ProcessingRequest{reqHeadersMsg("/both", true), respHeadersMsg(true)}, replies: 1},
	{name: "after the response-headers reply", msgs: []*extprocv3.ProcessingRequest{reqHeadersMsg("/both", true), respHeadersMsg(true)}, replies: 2},
	{name: "during the response-body agent call", msgs: []*extprocv3.ProcessingRequest{reqHeadersMsg("/body", false), reqBodyMsg("x"), respHeadersMsg(false), respBodyMsg("y")}, replies: 3},
	{name: "half-closed after request headers", msgs: []*extprocv3.ProcessingRequest{reqHeadersMsg("/both", true)}, replies: 1, halfDone: true},
	{name: "half-closed with a call in flight", msgs: []*extprocv3.ProcessingRequest{reqHeadersMsg("/slow", true)}, halfDone: true},
}

// leakKernelYAML has a slow route (the agent call outlives the cancellation), a route with both
// phases, and a route that reads both bodies.
const leakKernelYAML = `policy_kernel:
  server: {message_timeout_ms: 500}
  agents:
    - name: a
      socket_path: "{{SOCK}}"
      timeout_ms: 400
      health_check_interval_ms: 2000
  route_policies:
    - route_name: /slow
      request_policy_chain: [{policy: testSleep, metadata: {sleep_ms: 200}}]
    - route_name: /both
      request_policy_chain: [{policy: testTag, metadata: {tag: b}}]
      response_policy_chain: [{policy: testTag, metadata: {tag: b}}]
    - route_name: /body
      request_policy_chain: [{policy: testBody}]
      response_policy_chain: [{policy: testBody}]
`

// play runs the early end on a new stream of conn and reports what went differently than
// planned.
func (x earlyEnd) play(conn *grpc.ClientConn) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st, err := extprocv3.NewExternalProcessorClient(conn).Process(ctx)
	if err != nil {
		return fmt.Errorf("%s: open: %w", x.name, err)
	}
	read := 0
	for i, m := range x.msgs {
		if err := st.Send(m); err != nil {
			return fmt.Errorf("%s: send %d: %w", x.name, i, err)
		}
		// A reply is read after each message until the planned number has come.
		if read < x.replies {
			if _, err := st.Recv(); err != nil {
				return fmt.Errorf("%s: reply %d: %w", x.name, read, err)
			}
			read++
		}
	}
	if x.halfDone {
		if err := st.CloseSend(); err != nil {
			return fmt.Errorf("%s: half-close: %w", x.name, err)
		}
	}
	if x.pause > 0 {
		time.Sleep(x.pause)
	}
	return nil // the deferred cancel is Envoy's reset
}

// dropConnection opens streams that each wait in an agent call, then closes the whole
// connection under them, as an Envoy worker that goes away does.
func dropConnection(target string, streams int) error {
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	errs := make(chan error, streams)
	for range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := extprocv3.NewExternalProcessorClient(conn).Process(context.Background())
			if err != nil {
				errs <- err
				return
			}
			if err := st.Send(reqHeadersMsg("/slow", true)); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	time.Sleep(30 * time.Millisecond)
	close(errs)
	conn.Close()
	for err := range errs {
		return fmt.Errorf("drop connection: %w", err)
	}
	return nil
}

// earlyEndStorm plays every early end, rounds times, from workers goroutines on conns shared
// connections, with a dropped connection in every round.
func earlyEndStorm(target string, workers, rounds int) error {
	var conns []*grpc.ClientConn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range 2 {
		c, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return err
		}
		conns = append(conns, c)
	}
	var wg sync.WaitGroup
	errs := make(chan error, workers*rounds*len(earlyEnds)+rounds)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range rounds {
				for i, x := range earlyEnds {
					if err := x.play(conns[(w+r+i)%len(conns)]); err != nil {
						errs <- err
					}
				}
				if w == 0 {
					if err := dropConnection(target, 8); err != nil {
						errs <- err
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		return err
	}
	return nil
}
