package kernel

import (
	"context"
	"encoding/binary"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unicode/utf8"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/rs/zerolog"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/headers"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/vtcodec"
)

// fuzzAgent is an AgentClient for fuzzing: it marshals every request, as gRPC must before the
// agent can see it, and answers with reply. It keeps nothing, so a long run does not grow.
type fuzzAgent struct {
	tb    testing.TB
	reply func(req *agentv1.PolicyRequest) *agentv1.PolicyResponse
}

func (a *fuzzAgent) Execute(_ context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
	if _, err := proto.Marshal(req); err != nil {
		a.tb.Fatalf("the kernel built a PolicyRequest that cannot be sent: %v", err)
	}
	return a.reply(req), nil
}
func (a *fuzzAgent) GetAgentConfig(context.Context) (*agentv1.GetAgentConfigResponse, error) {
	return testInfo(), nil
}
func (a *fuzzAgent) Check(context.Context) error { return nil }
func (a *fuzzAgent) Close() error                { return nil }

var _ AgentClient = (*fuzzAgent)(nil)

// fuzzServer is a server on baseConfig whose agent is a.
func fuzzServer(tb testing.TB, a AgentClient) *Server {
	tb.Helper()
	cfg, err := ParseConfig("kernel.yaml", []byte(baseConfig))
	if err != nil {
		tb.Fatal(err)
	}
	kc := cfg.PolicyKernel
	m := newKernelMetrics()
	st := &agentState{cfg: kc.Agents[0], client: a, metrics: m.forAgent(kc.Agents[0].Name)}
	st.info.Store(testInfo())
	st.healthy.Store(true)
	s := NewServer(logging.New(io.Discard, "kernel", zerolog.ErrorLevel), m)
	s.Store(buildSnapshot(kc, "v1", map[string]*agentState{kc.Agents[0].Name: st}, m))
	return s
}

// checkReply fails unless r is a reply Envoy accepts for a message of kind (the request oneof's
// field name), with mutations that Envoy's default rules allow and that survive the wire.
func checkReply(t *testing.T, kind string, r *extprocv3.ProcessingResponse) {
	t.Helper()
	if _, err := proto.Marshal(r); err != nil {
		t.Fatalf("reply does not marshal: %v", err)
	}
	var common *extprocv3.CommonResponse
	switch v := r.GetResponse().(type) {
	case *extprocv3.ProcessingResponse_ImmediateResponse:
		ir := v.ImmediateResponse
		if c := ir.GetStatus().GetCode(); c < 200 || c > 599 {
			t.Fatalf("immediate response status %d", c)
		}
		for _, h := range ir.GetHeaders().GetSetHeaders() {
			k := h.GetHeader().GetKey()
			if headers.ValidName(k) != nil || strings.HasPrefix(k, ":") || !headers.SetAllowed(k) || headers.ValidValue(string(h.GetHeader().GetRawValue())) != nil {
				t.Fatalf("immediate response header %q: %q", k, h.GetHeader().GetRawValue())
			}
		}
		if strings.ContainsAny(ir.GetDetails(), " \t\r\n") {
			t.Fatalf("details %q hold whitespace", ir.GetDetails())
		}
		return
	case *extprocv3.ProcessingResponse_RequestHeaders:
		if kind != "request_headers" {
			t.Fatalf("request_headers reply to %s", kind)
		}
		common = v.RequestHeaders.GetResponse()
	case *extprocv3.ProcessingResponse_ResponseHeaders:
		if kind != "response_headers" {
			t.Fatalf("response_headers reply to %s", kind)
		}
		common = v.ResponseHeaders.GetResponse()
	case *extprocv3.ProcessingResponse_RequestBody:
		if kind != "request_body" {
			t.Fatalf("request_body reply to %s", kind)
		}
		common = v.RequestBody.GetResponse()
	case *extprocv3.ProcessingResponse_ResponseBody:
		if kind != "response_body" {
			t.Fatalf("response_body reply to %s", kind)
		}
		common = v.ResponseBody.GetResponse()
	case *extprocv3.ProcessingResponse_RequestTrailers, *extprocv3.ProcessingResponse_ResponseTrailers:
		if !strings.HasSuffix(kind, "_trailers") {
			t.Fatalf("trailers reply to %s", kind)
		}
		return
	default:
		t.Fatalf("reply holds %T", v)
	}
	response := strings.HasPrefix(kind, "response_")
	for _, h := range common.GetHeaderMutation().GetSetHeaders() {
		k, v := h.GetHeader().GetKey(), string(h.GetHeader().GetRawValue())
		if h.GetHeader().GetValue() != "" || h.GetAppend() == nil {
			t.Fatalf("set %q: value field or append unset", k)
		}
		if headers.ValidName(k) != nil || headers.ValidValue(v) != nil || !headers.SetAllowed(k) {
			t.Fatalf("set %q = %q, which Envoy refuses", k, v)
		}
		if k == ":status" && (!response || !headers.ValidStatus(v)) || k == ":path" && (response || !strings.HasPrefix(v, "/")) {
			t.Fatalf("set %q = %q in the %s", k, v, kind)
		}
	}
	for _, k := range common.GetHeaderMutation().GetRemoveHeaders() {
		if headers.ValidName(k) != nil || !headers.RemoveAllowed(k) {
			t.Fatalf("remove %q, which Envoy refuses", k)
		}
	}
	if common.GetBodyMutation() != nil && !strings.HasSuffix(kind, "_body") {
		t.Fatalf("body mutation in a %s reply", kind)
	}
}

// kindOf names a message by its oneof field.
func kindOf(req *extprocv3.ProcessingRequest) string {
	switch req.GetRequest().(type) {
	case *extprocv3.ProcessingRequest_RequestHeaders:
		return "request_headers"
	case *extprocv3.ProcessingRequest_RequestBody:
		return "request_body"
	case *extprocv3.ProcessingRequest_RequestTrailers:
		return "request_trailers"
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		return "response_headers"
	case *extprocv3.ProcessingRequest_ResponseBody:
		return "response_body"
	case *extprocv3.ProcessingRequest_ResponseTrailers:
		return "response_trailers"
	}
	return "none"
}

func marshalSeed(f *testing.F, msgs ...*extprocv3.ProcessingRequest) [][]byte {
	var out [][]byte
	for _, m := range msgs {
		b, err := proto.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		out = append(out, b)
	}
	for len(out) < 3 {
		out = append(out, nil)
	}
	return out
}

// FuzzProcessingRequest plays up to three ext_proc messages, as the kernel receives them from
// the wire, on one stream: every PolicyRequest the kernel builds must be one gRPC can send,
// and every answer either a protocol error or a reply of the right kind that Envoy accepts.
func FuzzProcessingRequest(f *testing.F) {
	seeds := [][]*extprocv3.ProcessingRequest{
		{reqHeaders("/api/v1/users", true, "", "x-api-key", "k")},
		{reqHeaders("/api/v1/users", false, "named-route", "accept", "a", "accept", "b"), respHeaders("200", true, "x-up", "1")},
		{reqHeaders("/upload", false, ""), reqBody(`{"a":1}`), respHeaders("201", true)},
		{reqHeaders("/download", false, ""), respHeaders("200", false), respBody("data")},
		{reqHeaders("/broken", true, "")},
		{reqHeaders("/x", true, "", "x-bad", "\xff\xfe"), {Request: &extprocv3.ProcessingRequest_RequestTrailers{RequestTrailers: &extprocv3.HttpTrailers{}}}},
	}
	for _, s := range seeds {
		b := marshalSeed(f, s...)
		f.Add(b[0], b[1], b[2])
	}
	agent := &fuzzAgent{reply: func(req *agentv1.PolicyRequest) *agentv1.PolicyResponse {
		return ok(setHeader("x-seen", "1"), setState("k", "v"))
	}}
	s := fuzzServer(f, agent)
	f.Fuzz(func(t *testing.T, m1, m2, m3 []byte) {
		agent.tb = t
		st := getStream(s.Snapshot())
		defer putStream(st)
		for _, b := range [][]byte{m1, m2, m3} {
			req := &extprocv3.ProcessingRequest{}
			if proto.Unmarshal(b, req) != nil {
				return // gRPC refuses it before the kernel sees it
			}
			r, err := s.handle(context.Background(), st, req)
			if err != nil {
				if status.Code(err) != codes.InvalidArgument {
					t.Fatalf("%s: error %v", kindOf(req), err)
				}
				return // the stream ends here
			}
			checkReply(t, kindOf(req), r)
			if r.GetImmediateResponse() != nil {
				return // Envoy sends nothing more on this stream
			}
		}
	})
}

// FuzzAgentResponse feeds an arbitrary agent reply, decoded as the kernel's codec decodes it
// off the wire (without checking UTF-8), to each phase, and to both phases of one request:
// whatever the agent says, the kernel's answer is one Envoy accepts, what it sends the agent
// next is still a valid request, and a reply it cannot use is a 500, never a continue.
func FuzzAgentResponse(f *testing.F) {
	for _, r := range []*agentv1.PolicyResponse{
		ok(setHeader("x-user-id", "alice"), removeHeader("x-api-key"), setState("user", "alice")),
		ok(setHeader(":path", "/rewritten"), setHeader(":status", "201"), appendHeader("vary", "a")),
		ok(setBody(`{"b":2}`), setHeader("content-type", "application/json")),
		ok(immediateIns(401, map[string]string{"www-authenticate": "API-Key"}, `{"error":"unauthorized"}`)),
		{Status: &agentv1.ResponseStatus{Code: agentv1.StatusCode_POLICY_DENIED}},
		{Status: &agentv1.ResponseStatus{Code: agentv1.StatusCode_POLICY_ERROR}, Message: "boom"},
		{Status: &agentv1.ResponseStatus{Code: agentv1.StatusCode_TIMEOUT}},
		ok(&agentv1.Instruction{Type: agentv1.InstructionType(99)}),
		ok(setHeader("host", "evil"), setHeader("x-a", "1\r\n2"), removeHeader(":authority")),
		{},
	} {
		b, err := proto.Marshal(r)
		if err != nil {
			f.Fatal(err)
		}
		for phase := range byte(5) {
			f.Add(phase, b)
		}
	}
	var (
		reply  *agentv1.PolicyResponse
		fuzzed bool
		callID uint64
	)
	agent := &fuzzAgent{reply: func(req *agentv1.PolicyRequest) *agentv1.PolicyResponse {
		if fuzzed {
			callID = req.GetCallId()
			return reply
		}
		return ok()
	}}
	s := fuzzServer(f, agent)
	f.Fuzz(func(t *testing.T, phase byte, data []byte) {
		reply = &agentv1.PolicyResponse{}
		if reply.UnmarshalVT(data) != nil {
			return // the gRPC client fails the call: covered by the error classification
		}
		agent.tb = t
		st := getStream(s.Snapshot())
		defer putStream(st)
		var msgs []*extprocv3.ProcessingRequest
		both := false
		switch phase % 5 {
		case 0:
			msgs = []*extprocv3.ProcessingRequest{reqHeaders("/api/v1/users", true, "")}
		case 1:
			msgs = []*extprocv3.ProcessingRequest{reqHeaders("/api/v1/users", false, ""), respHeaders("200", true)}
		case 2:
			msgs = []*extprocv3.ProcessingRequest{reqHeaders("/upload", false, ""), reqBody("{}")}
		case 3:
			msgs = []*extprocv3.ProcessingRequest{reqHeaders("/download", false, ""), respHeaders("200", false), respBody("{}")}
		case 4:
			// The same reply to both phases: state it sets goes back to the agent.
			msgs = []*extprocv3.ProcessingRequest{reqHeaders("/api/v1/users", false, ""), respHeaders("200", true)}
			both = true
		}
		for i, m := range msgs {
			fuzzed = both || i == len(msgs)-1
			r, err := s.handle(context.Background(), st, m)
			if err != nil {
				t.Fatalf("%s: %v", kindOf(m), err)
			}
			checkReply(t, kindOf(m), r)
			if r.GetImmediateResponse() != nil {
				return // Envoy sends nothing more on this stream
			}
			if !fuzzed {
				continue
			}
			// The kernel lets the request go on only for a well-formed OK reply: a reply it
			// cannot use, a denial or a failure never passes as a continue.
			if reply.GetStatus() == nil || reply.GetStatus().GetCode() != agentv1.StatusCode_OK || reply.GetCallId() != callID {
				t.Fatalf("agent reply %v let the request go on: %v", reply, r)
			}
			for _, in := range reply.GetInstructions() {
				if in.GetType() == agentv1.InstructionType_IMMEDIATE_RESPONSE || in.GetType() > agentv1.InstructionType_SET_STATE {
					t.Fatalf("agent reply %v let the request go on: %v", reply, r)
				}
			}
		}
	})
}

// FuzzKernelConfig parses arbitrary kernel configs: a config is refused with an error that
// names the file, or it is accepted with every default filled in and within bounds, and
// compiles into a snapshot.
func FuzzKernelConfig(f *testing.F) {
	f.Add([]byte(baseConfig))
	f.Add([]byte(whenConfig))
	f.Add([]byte(cacheConfig))
	for _, dir := range []string{"testdata/config", "../config"} {
		files, _ := filepath.Glob(filepath.Join(dir, "*.yaml"))
		for _, p := range files {
			if b, err := os.ReadFile(p); err == nil {
				f.Add(b)
			}
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := ParseConfig("kernel.yaml", data)
		if err != nil {
			if !strings.Contains(err.Error(), "kernel.yaml") {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		kc := cfg.PolicyKernel
		s := kc.Server
		if s.Port < 0 || s.Port > 65535 || s.MaxConcurrentStreams == 0 || s.MessageTimeoutMS <= 0 || s.MaxBodySizeBytes <= 0 || s.StatusOnError < 200 || s.StatusOnError > 599 {
			t.Fatalf("server settings out of bounds: %+v", s)
		}
		if len(kc.Agents) == 0 {
			t.Fatal("no agent")
		}
		agents := map[string]*agentState{}
		m := newKernelMetrics()
		for _, a := range kc.Agents {
			if a.TimeoutMS <= 0 || a.TimeoutMS > MaxAgentTimeoutMS || a.Retry.MaxAttempts < 1 || a.Retry.MaxAttempts > 10 || a.Connections < 1 || a.HealthCheckIntervalMS <= 0 {
				t.Fatalf("agent settings out of bounds: %+v", a)
			}
			st := &agentState{cfg: a, client: &fuzzAgent{tb: t}, metrics: m.forAgent(a.Name)}
			st.info.Store(testInfo())
			agents[a.Name] = st
		}
		for _, rp := range kc.RoutePolicies {
			for _, e := range append(rp.RequestPolicyChain, rp.ResponsePolicyChain...) {
				if c := e.Cache; c != nil && (c.TTL < MinCacheTTL || c.TTL > MaxCacheTTL || len(c.Key) == 0 || len(c.Key) > MaxCacheKeyParts || c.MaxEntries < 0 || c.MaxBytes < 0) {
					t.Fatalf("cache settings out of bounds: %+v", c)
				}
			}
		}
		snap := buildSnapshot(kc, "v", agents, m)
		for _, rp := range kc.RoutePolicies {
			if r := snap.route(rp.RouteName, rp.RouteName); r == nil || r.Name != rp.RouteName {
				t.Fatalf("route %q not found by its name", rp.RouteName)
			}
		}
	})
}

// FuzzRequestHeaders turns arbitrary header lists into the agent's request context: names are
// lowercase, pseudo-headers become fields, repeated headers are joined in order, and every
// string is UTF-8, so that the request can be sent to the agent.
//
// The input is a sequence of entries: a 1-byte name length, the name, a 2-byte value length,
// the value.
func FuzzRequestHeaders(f *testing.F) {
	enc := func(kv ...string) []byte {
		var b []byte
		for i := 0; i+1 < len(kv); i += 2 {
			b = append(b, byte(len(kv[i])))
			b = append(b, kv[i]...)
			b = binary.BigEndian.AppendUint16(b, uint16(len(kv[i+1])))
			b = append(b, kv[i+1]...)
		}
		return b
	}
	f.Add(enc(":method", "GET", ":path", "/a?b=1", ":authority", "h", ":scheme", "https", "x-api-key", "k"))
	f.Add(enc("Accept", "a", "accept", "b", "ACCEPT", "c"))
	f.Add(enc("x-bin", "\xff\xfe\x00", ":path", "/\xc3\x28", "cookie", "a=1\r\nb"))
	f.Add(enc(":path", "/first", ":path", "/second", ":unknown", "x"))
	f.Fuzz(func(t *testing.T, data []byte) {
		var hs []*corev3.HeaderValue
		for len(data) > 0 {
			kl := int(data[0])
			data = data[1:]
			if len(data) < kl+2 {
				break
			}
			k := string(data[:kl])
			vl := int(binary.BigEndian.Uint16(data[kl:]))
			data = data[kl+2:]
			if len(data) < vl {
				vl = len(data)
			}
			v := data[:vl]
			data = data[vl:]
			if !utf8.ValidString(k) {
				continue // a proto string: gRPC refuses it before the kernel sees it
			}
			hs = append(hs, &corev3.HeaderValue{Key: k, RawValue: v})
		}
		rc := requestContext(&extprocv3.HttpHeaders{Headers: &corev3.HeaderMap{Headers: hs}})
		if _, err := proto.Marshal(rc); err != nil {
			t.Fatalf("request context cannot be sent: %v", err)
		}
		want := map[string][]string{}
		pseudo := map[string]string{}
		for _, h := range hs {
			v := headerValue(h.GetRawValue(), "")
			if !utf8.ValidString(v) {
				t.Fatalf("value %q is not UTF-8", v)
			}
			if strings.HasPrefix(h.GetKey(), ":") {
				pseudo[h.GetKey()] = v
				continue
			}
			k := strings.ToLower(h.GetKey())
			want[k] = append(want[k], v)
		}
		if len(rc.GetHeaders()) != len(want) {
			t.Fatalf("%d headers, want %d", len(rc.GetHeaders()), len(want))
		}
		for k, vs := range want {
			if got := rc.GetHeaders()[k]; got != strings.Join(vs, ", ") {
				t.Fatalf("header %q = %q, want %q", k, got, strings.Join(vs, ", "))
			}
		}
		if rc.GetMethod() != pseudo[":method"] || rc.GetPath() != pseudo[":path"] || rc.GetAuthority() != pseudo[":authority"] || rc.GetScheme() != pseudo[":scheme"] {
			t.Fatalf("pseudo-headers %v became %v %v %v %v", pseudo, rc.GetMethod(), rc.GetPath(), rc.GetAuthority(), rc.GetScheme())
		}
		_ = clientIP(pseudo[":authority"])
	})
}

// FuzzAgentReplyBatch decodes whatever an agent may send on ExecuteStream as the kernel does
// (in place, through the codec) and turns every reply into a mutation: no input panics, and a
// reply is either refused (invalid UTF-8, invalid instructions) or becomes a mutation.
func FuzzAgentReplyBatch(f *testing.F) {
	for _, b := range []*agentv1.PolicyResponseBatch{
		{Responses: []*agentv1.PolicyResponse{ok(setHeader("x-user-id", "alice")), ok(setBody(`{"b":2}`))}},
		{Responses: []*agentv1.PolicyResponse{{CallId: 3, Status: &agentv1.ResponseStatus{Code: agentv1.StatusCode_POLICY_DENIED}}}},
		{Responses: []*agentv1.PolicyResponse{ok(immediateIns(401, map[string]string{"a": "b"}, "x")), {}}},
		{},
	} {
		data, err := proto.Marshal(b)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	codec := vtcodec.New()
	f.Fuzz(func(t *testing.T, data []byte) {
		var b agentv1.PolicyResponseBatch
		if codec.Unmarshal(mem.BufferSlice{mem.SliceBuffer(data)}, &b) != nil {
			return
		}
		for _, r := range b.GetResponses() {
			if checkReplyUTF8(r) != nil {
				continue
			}
			for _, phase := range []agentv1.PolicyPhase{agentv1.PolicyPhase_REQUEST, agentv1.PolicyPhase_RESPONSE} {
				m, err := buildMutation(phase, r.GetInstructions(), func(string, string) {})
				if err == nil && m == nil {
					t.Fatal("no mutation and no error")
				}
			}
		}
	})
}

// FuzzExplainInput: whatever an admin POSTs to /debug/explain is refused with an error or
// parsed into a request the Envoy client can play: a path that starts with /, header names
// and values Envoy would accept, an HTTP status for the upstream.
func FuzzExplainInput(f *testing.F) {
	f.Add([]byte(`{"method":"GET","path":"/api/v1/users","headers":[["x-api-key","k"]],"attributes":{"xds.route_name":"/r"}}`))
	f.Add([]byte(`{"path":"/","upstream":{"status":404,"headers":[["content-type","text/plain"]],"body":"x"},"message_timeout_ms":50}`))
	f.Add([]byte(`{"path":"/","headers":[[":authority","x"]]}`))
	f.Add([]byte(`{"path":"/"} {}`))
	f.Add([]byte(`{"path":"/\u0000"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		in, err := ParseExplainInput(data)
		if err != nil {
			if in != nil {
				t.Fatal("an error with a request")
			}
			return
		}
		if !strings.HasPrefix(in.Path, "/") || in.Method == "" || in.Upstream.Status < 100 || in.Upstream.Status > 599 {
			t.Fatalf("accepted %+v", in)
		}
		for _, h := range append(in.Headers, in.Upstream.Headers...) {
			if headers.ValidName(strings.ToLower(h[0])) != nil || headers.ValidValue(h[1]) != nil || strings.HasPrefix(h[0], ":") {
				t.Fatalf("accepted header %q", h)
			}
		}
	})
}
