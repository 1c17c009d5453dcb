package kernel

import (
	"context"
	"errors"
	"io"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// fakeAgent is an AgentClient whose answers a test chooses.
type fakeAgent struct {
	mu       sync.Mutex
	calls    []*agentv1.PolicyRequest
	fn       func(ctx context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error)
	info     *agentv1.GetAgentConfigResponse
	infoErr  error
	checkErr error
}

func (f *fakeAgent) Execute(ctx context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
	f.mu.Lock()
	f.calls = append(f.calls, cloneReq(req))
	fn := f.fn
	f.mu.Unlock()
	if fn == nil {
		return &agentv1.PolicyResponse{RequestId: req.GetRequestId(), Status: &agentv1.ResponseStatus{}}, nil
	}
	return fn(ctx, req)
}

func cloneReq(r *agentv1.PolicyRequest) *agentv1.PolicyRequest {
	c := &agentv1.PolicyRequest{RequestId: r.RequestId, Policies: r.Policies, Phase: r.Phase, RouteName: r.RouteName, DeadlineMs: r.DeadlineMs, Explain: r.Explain}
	if r.Context != nil {
		c.Context = &agentv1.RequestContext{Method: r.Context.Method, Path: r.Context.Path, Authority: r.Context.Authority, Scheme: r.Context.Scheme, ClientIp: r.Context.ClientIp, Body: append([]byte(nil), r.Context.Body...), Headers: map[string]string{}}
		for k, v := range r.Context.Headers {
			c.Context.Headers[k] = v
		}
	}
	if r.Response != nil {
		c.Response = &agentv1.ResponseContext{StatusCode: r.Response.StatusCode, Body: r.Response.Body, Headers: map[string]string{}}
		for k, v := range r.Response.Headers {
			c.Response.Headers[k] = v
		}
	}
	if r.State != nil {
		c.State = map[string]string{}
		for k, v := range r.State {
			c.State[k] = v
		}
	}
	return c
}

func (f *fakeAgent) GetAgentConfig(context.Context) (*agentv1.GetAgentConfigResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.info, f.infoErr
}

func (f *fakeAgent) Check(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.checkErr
}

func (f *fakeAgent) Close() error { return nil }

func (f *fakeAgent) ncalls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.calls)
}

func (f *fakeAgent) call(i int) *agentv1.PolicyRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[i]
}

var _ AgentClient = (*fakeAgent)(nil)

// testInfo advertises a policy set like the real agent's.
func testInfo() *agentv1.GetAgentConfigResponse {
	req := []agentv1.PolicyPhase{agentv1.PolicyPhase_REQUEST}
	resp := []agentv1.PolicyPhase{agentv1.PolicyPhase_RESPONSE}
	both := []agentv1.PolicyPhase{agentv1.PolicyPhase_REQUEST, agentv1.PolicyPhase_RESPONSE}
	return &agentv1.GetAgentConfigResponse{AgentName: "a", AgentVersion: "t", SupportedPolicies: []*agentv1.PolicyInfo{
		{Name: "auth", SupportedPhases: req},
		{Name: "allowAll", SupportedPhases: both},
		{Name: "hdr", SupportedPhases: resp},
		{Name: "reqBody", SupportedPhases: req, RequiresRequestBody: true},
		{Name: "respBody", SupportedPhases: resp, RequiresResponseBody: true},
		{Name: "lean", SupportedPhases: resp, ResponseIgnoresRequest: true},
	}}
}

const baseConfig = `policy_kernel:
  agents:
    - name: a
      socket_path: /unused.sock
      timeout_ms: 50
      retry: {max_attempts: 3, backoff_ms: 1}
  route_policies:
    - route_name: /api/v1/users
      request_policy_chain:
        - policy: auth
          metadata: {header_name: X-API-Key}
      response_policy_chain:
        - policy: hdr
    - route_name: named-route
      request_policy_chain:
        - policy: auth
          metadata: {header_name: X-Other}
    - route_name: /open
      request_policy_chain: []
    - route_name: /upload
      request_policy_chain:
        - policy: reqBody
    - route_name: /download
      response_policy_chain:
        - policy: respBody
    - route_name: /broken
      request_policy_chain:
        - policy: notThere
    - route_name: /lean
      request_policy_chain:
        - policy: auth
          metadata: {header_name: X-API-Key}
      response_policy_chain:
        - policy: lean
    - route_name: /mixed
      response_policy_chain:
        - policy: lean
        - policy: hdr
  default_policy:
    request_policy_chain:
      - policy: allowAll
`

type testKernel struct {
	s     *Server
	agent *fakeAgent
	m     *kernelMetrics
	logs  *testenv.SyncBuffer
	state *agentState
}

func newTestKernel(t *testing.T, yaml string, fa *fakeAgent) *testKernel {
	t.Helper()
	cfg, err := ParseConfig("kernel.yaml", []byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	if fa.info == nil {
		fa.info = testInfo()
	}
	kc := cfg.PolicyKernel
	m := newKernelMetrics()
	agents := map[string]*agentState{}
	var first *agentState
	for _, ac := range kc.Agents {
		st := &agentState{cfg: ac, client: fa, metrics: m.forAgent(ac.Name)}
		st.info.Store(fa.info)
		st.healthy.Store(true)
		agents[ac.Name] = st
		if first == nil {
			first = st
		}
	}
	logs := &testenv.SyncBuffer{}
	s := NewServer(logging.New(logs, "kernel", zerolog.DebugLevel), m)
	s.Store(buildSnapshot(kc, "v1", agents, m))
	return &testKernel{s: s, agent: fa, m: m, logs: logs, state: first}
}

// fakeStream plays Envoy's side of one Process stream.
type fakeStream struct {
	grpc.ServerStream
	ctx    context.Context
	cancel context.CancelFunc
	in     chan *extprocv3.ProcessingRequest
	out    chan *extprocv3.ProcessingResponse
	done   chan error
}

func (f *fakeStream) Context() context.Context { return f.ctx }

func (f *fakeStream) Recv() (*extprocv3.ProcessingRequest, error) {
	select {
	case r, ok := <-f.in:
		if !ok {
			return nil, io.EOF
		}
		return r, nil
	case <-f.ctx.Done():
		return nil, status.Error(codes.Canceled, "context canceled")
	}
}

func (f *fakeStream) Send(r *extprocv3.ProcessingResponse) error {
	select {
	case f.out <- r:
		return nil
	case <-f.ctx.Done():
		return f.ctx.Err()
	}
}

func (k *testKernel) open(t *testing.T) *fakeStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	f := &fakeStream{ctx: ctx, cancel: cancel, in: make(chan *extprocv3.ProcessingRequest), out: make(chan *extprocv3.ProcessingResponse, 1), done: make(chan error, 1)}
	go func() { f.done <- k.s.Process(f) }()
	t.Cleanup(cancel)
	return f
}

// send sends one message and waits for the reply; it fails the test if the stream ends.
func (f *fakeStream) send(t *testing.T, r *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
	t.Helper()
	select {
	case f.in <- r:
	case err := <-f.done:
		t.Fatalf("stream ended before the message was read: %v", err)
	}
	select {
	case resp := <-f.out:
		return resp
	case err := <-f.done:
		t.Fatalf("stream ended instead of replying: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("no reply within 5s")
	}
	return nil
}

// sendErr sends a message and returns the error the stream ends with.
func (f *fakeStream) sendErr(t *testing.T, r *extprocv3.ProcessingRequest) error {
	t.Helper()
	select {
	case f.in <- r:
	case err := <-f.done:
		return err
	}
	select {
	case resp := <-f.out:
		t.Fatalf("want the stream to fail, got a reply %v", resp)
	case err := <-f.done:
		return err
	case <-time.After(5 * time.Second):
		t.Fatal("stream neither replied nor ended")
	}
	return nil
}

// end cancels the stream as Envoy does and returns Process's result.
func (f *fakeStream) end(t *testing.T) error {
	t.Helper()
	f.cancel()
	select {
	case err := <-f.done:
		return err
	case <-time.After(5 * time.Second):
		t.Fatal("Process did not return after cancellation")
	}
	return errors.New("unreachable")
}

// reqHeaders builds a request_headers message the way Envoy does: raw_value only.
func reqHeaders(path string, eos bool, route string, kv ...string) *extprocv3.ProcessingRequest {
	hs := []*corev3.HeaderValue{
		{Key: ":method", RawValue: []byte("GET")},
		{Key: ":path", RawValue: []byte(path)},
		{Key: ":authority", RawValue: []byte("example.com")},
		{Key: ":scheme", RawValue: []byte("http")},
	}
	for i := 0; i+1 < len(kv); i += 2 {
		hs = append(hs, &corev3.HeaderValue{Key: kv[i], RawValue: []byte(kv[i+1])})
	}
	r := &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
		Headers: &corev3.HeaderMap{Headers: hs}, EndOfStream: eos,
	}}}
	fields := map[string]*structpb.Value{"source.address": structpb.NewStringValue("10.0.0.7:5555")}
	if route != "" {
		fields["xds.route_name"] = structpb.NewStringValue(route)
	}
	r.Attributes = map[string]*structpb.Struct{attributesKey: {Fields: fields}}
	return r
}

func respHeaders(status string, eos bool, kv ...string) *extprocv3.ProcessingRequest {
	hs := []*corev3.HeaderValue{{Key: ":status", RawValue: []byte(status)}}
	for i := 0; i+1 < len(kv); i += 2 {
		hs = append(hs, &corev3.HeaderValue{Key: kv[i], RawValue: []byte(kv[i+1])})
	}
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: &extprocv3.HttpHeaders{
		Headers: &corev3.HeaderMap{Headers: hs}, EndOfStream: eos,
	}}}
}

func reqBody(b string) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: []byte(b), EndOfStream: true}}}
}

func respBody(b string) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{ResponseBody: &extprocv3.HttpBody{Body: []byte(b), EndOfStream: true}}}
}

func ok(ins ...*agentv1.Instruction) *agentv1.PolicyResponse {
	return &agentv1.PolicyResponse{Status: &agentv1.ResponseStatus{Code: agentv1.StatusCode_OK}, Instructions: ins}
}

func setHeader(k, v string) *agentv1.Instruction {
	return &agentv1.Instruction{Type: agentv1.InstructionType_SET_HEADER, Payload: &agentv1.Instruction_Header{Header: &agentv1.HeaderInstruction{Key: k, Value: v}}}
}

func appendHeader(k, v string) *agentv1.Instruction {
	return &agentv1.Instruction{Type: agentv1.InstructionType_SET_HEADER, Payload: &agentv1.Instruction_Header{Header: &agentv1.HeaderInstruction{Key: k, Value: v, Append: true}}}
}

func removeHeader(k string) *agentv1.Instruction {
	return &agentv1.Instruction{Type: agentv1.InstructionType_REMOVE_HEADER, Payload: &agentv1.Instruction_Header{Header: &agentv1.HeaderInstruction{Key: k}}}
}

func setState(k, v string) *agentv1.Instruction {
	return &agentv1.Instruction{Type: agentv1.InstructionType_SET_STATE, Payload: &agentv1.Instruction_State{State: &agentv1.StateInstruction{Key: k, Value: v}}}
}

func setBody(b string) *agentv1.Instruction {
	return &agentv1.Instruction{Type: agentv1.InstructionType_SET_BODY, Payload: &agentv1.Instruction_Body{Body: &agentv1.BodyInstruction{Body: []byte(b)}}}
}

func immediateIns(code int32, headers map[string]string, body string) *agentv1.Instruction {
	return &agentv1.Instruction{Type: agentv1.InstructionType_IMMEDIATE_RESPONSE, Payload: &agentv1.Instruction_ImmediateResponse{ImmediateResponse: &agentv1.ImmediateResponse{StatusCode: code, Headers: headers, Body: []byte(body), Details: "unauthorized by policy"}}}
}

// setHeadersOf returns a reply's set_headers as name → value, failing if any uses value
// instead of raw_value or leaves append unset.
func setHeadersOf(t *testing.T, hm *extprocv3.HeaderMutation) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, o := range hm.GetSetHeaders() {
		if o.GetHeader().GetValue() != "" {
			t.Fatalf("header %q sent in value; Envoy reads raw_value only", o.GetHeader().GetKey())
		}
		if o.GetAppend() == nil {
			t.Fatalf("header %q has no append BoolValue; Envoy ignores append_action", o.GetHeader().GetKey())
		}
		v := string(o.GetHeader().GetRawValue())
		if o.GetAppend().GetValue() {
			v = "+" + v
		}
		out[o.GetHeader().GetKey()] = v
	}
	return out
}

type typeStatusCode = typev3.StatusCode
