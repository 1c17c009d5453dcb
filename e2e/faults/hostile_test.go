package faults

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// hostileKernelYAML routes hostile input to the real and the test policies. The kernel's body
// cap is 64 KiB; "open" is fail-open, so that a fault that wrongly counts as "agent
// unavailable" shows as a request let through. The agent timeout is far above what the
// policies need, so that a busy machine does not turn into a timeout, which fail-open would let
// through too.
const hostileKernelYAML = `policy_kernel:
  server: {message_timeout_ms: 500, max_body_size_bytes: 65536}
  agents:
    - name: closed
      socket_path: "{{SOCK}}"
      timeout_ms: 400
      health_check_interval_ms: 2000
    - name: open
      socket_path: "{{SOCK}}"
      timeout_ms: 400
      health_check_interval_ms: 2000
      fail_open: true
  route_policies:
    - route_name: /key
      agent: open
      request_policy_chain: [{policy: apiKeyAuth}]
    - route_name: /echo
      agent: open
      request_policy_chain: [{policy: testEcho, metadata: {from: x-in, to: x-out}}]
    - route_name: /body
      agent: closed
      request_policy_chain: [{policy: testBody}]
    - route_name: /huge
      agent: open
      request_policy_chain: [{policy: testHugeReply, metadata: {size: 3000000}}]
    - route_name: /badutf8
      agent: open
      request_policy_chain: [{policy: testBadUTF8}]
    - route_name: /panic
      agent: open
      request_policy_chain: [{policy: testPanic}]
`

// TestHostileInput plays input that no well-behaved Envoy or agent produces, through the real
// processes, and checks each answer and that both keep serving.
func TestHostileInput(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: hostileKernelYAML, AgentBin: testenv.Build(t, testenv.TestAgentPackage)})
	c := e.Dial(t, envoyConfig)
	if s := play(c, "/key", keyed("/key")); !served(s) {
		t.Fatalf("warm-up: %s", s.outcome())
	}
	var shots []shot
	f := func(name string, req *envoytest.Request, want string, check func(shot) string) {
		t.Helper()
		s := play(c, req.Path, req)
		shots = append(shots, s)
		if got := s.outcome(); got != want {
			t.Errorf("%s: %s, want %s", name, got, want)
		} else if check != nil {
			if problem := check(s); problem != "" {
				t.Errorf("%s: %s", name, problem)
			}
		}
		if s.latency > 500*time.Millisecond+margin {
			t.Errorf("%s: answered after %v", name, s.latency)
		}
		t.Logf("reliability: hostile: %s → %s in %v", name, s.outcome(), s.latency.Round(time.Millisecond))
		// Still serving, every time.
		if s := play(c, "/key", keyed("/key")); !served(s) {
			t.Fatalf("after %s: %s", name, s.outcome())
		}
		alive(t, e)
	}
	noOut := func(s shot) string {
		if v := testenv.Header(s.res.Forwarded.Headers, "x-out"); v != "" {
			return fmt.Sprintf("x-out reached the upstream as %q", v)
		}
		if v := testenv.Header(s.res.Forwarded.Headers, "x-injected"); v != "" {
			return "a header was injected"
		}
		return ""
	}

	// Header values that are not UTF-8 are judged by the policies, never waved through by a
	// fail-open agent.
	f("API key that is not UTF-8", request("/key", [2]string{"x-api-key", "fault-key-1\xff"}), "403 forbidden", nil)
	f("other header not UTF-8", request("/key", [2]string{"x-api-key", "fault-key-1"}, [2]string{"x-note", "\xc3\x28"}), "upstream", func(s shot) string {
		if testenv.Header(s.res.Forwarded.Headers, "x-user-id") != "fault-user" {
			return "the key was not checked"
		}
		return ""
	})
	// CR, LF and NUL: an agent that copies them into a header gets its mutation dropped, not
	// sent to Envoy (which would answer 500) and never split into two headers.
	for _, v := range []string{"a\r\nx-injected: 1", "a\nb", "a\x00b", "a\rb"} {
		f(fmt.Sprintf("header value %q echoed by a policy", v), request("/echo", [2]string{"x-in", v}), "upstream", noOut)
		f(fmt.Sprintf("API key %q", v), request("/key", [2]string{"x-api-key", "fault-key-1" + v}), "403 forbidden", nil)
	}
	// Bodies: within the cap, over the kernel's cap (the kernel's 413).
	body := request("/body")
	body.Body = []byte(strings.Repeat("b", 1000))
	f("body within the cap", body, "upstream", func(s shot) string {
		if v := testenv.Header(s.res.Forwarded.Headers, "x-test-body-length"); v != "1000" {
			return "the policy saw a body of " + v
		}
		return ""
	})
	big := request("/body")
	big.Body = []byte(strings.Repeat("b", 100<<10))
	f("body over the kernel's cap", big, "413 payload_too_large", nil)
	// Agent replies that cannot be applied: 500, although the agent is fail-open.
	f("agent reply of 3 MB", request("/huge"), "500 invalid_agent_response", nil)
	f("agent reply that is not UTF-8", request("/badutf8"), "500 invalid_agent_response", nil)
	f("policy that panics", request("/panic"), "500 policy_error", nil)
	tl := count(shots)
	if tl.lost() != 0 {
		t.Errorf("%d requests lost", tl.lost())
	}
	tl.report(t, "hostile input through Envoy's filter")
}

// rawCodec sends and receives messages as the bytes they are, so that a test can put on the wire
// what no proto library would marshal.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *v.(*[]byte), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	*v.(*[]byte) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

// sendRaw opens a Process stream, sends msg as it is, and returns the reply or the error the
// stream ends with.
func sendRaw(conn *grpc.ClientConn, msg []byte) (*extprocv3.ProcessingResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	st, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true},
		"/envoy.service.ext_proc.v3.ExternalProcessor/Process", grpc.ForceCodec(rawCodec{}))
	if err != nil {
		return nil, err
	}
	if err := st.SendMsg(&msg); err != nil {
		return nil, err
	}
	var out []byte
	if err := st.RecvMsg(&out); err != nil {
		return nil, err
	}
	resp := &extprocv3.ProcessingResponse{}
	if err := proto.Unmarshal(out, resp); err != nil {
		return nil, fmt.Errorf("reply does not unmarshal: %w", err)
	}
	return resp, nil
}

// TestHostileWire puts bytes on the wire that no Envoy sends: messages with unknown fields,
// garbage, messages over the size limit. Each gets a reply or a gRPC error (which Envoy turns
// into a 500, or a continue when fail-open), within the message timeout, and the kernel keeps
// serving.
func TestHostileWire(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: hostileKernelYAML, AgentBin: testenv.Build(t, testenv.TestAgentPackage)})
	conn, err := grpc.NewClient(e.KernelAddr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(64<<20)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := e.Dial(t, envoyConfig)
	check := func(name string) {
		t.Helper()
		if s := play(c, "/key", keyed("/key")); !served(s) {
			t.Fatalf("after %s: %s", name, s.outcome())
		}
		alive(t, e)
	}

	// Unknown fields, at the top and inside the headers, are ignored.
	good, _ := proto.Marshal(reqHeadersMsg("/key", true, "x-api-key", "fault-key-1"))
	withUnknown := protowire.AppendTag(append([]byte(nil), good...), 9999, protowire.BytesType)
	withUnknown = protowire.AppendBytes(withUnknown, []byte("surprise"))
	withUnknown = protowire.AppendTag(withUnknown, 10000, protowire.VarintType)
	withUnknown = protowire.AppendVarint(withUnknown, 42)
	r, err := sendRaw(conn, withUnknown)
	if err != nil || r.GetRequestHeaders() == nil {
		t.Fatalf("unknown fields: %v %v", r, err)
	}
	if got := string(r.GetRequestHeaders().GetResponse().GetHeaderMutation().GetSetHeaders()[0].GetHeader().GetRawValue()); got != "fault-user" {
		t.Fatalf("unknown fields changed the answer: %v", r)
	}
	t.Log("reliability: hostile: unknown fields → processed normally")
	check("unknown fields")

	// 10,000 headers, half of them repeats of one name (Envoy itself stops at 100 by default,
	// but anyone who reaches the kernel's port can send more).
	kv := []string{"x-api-key", "fault-key-1"}
	for i := range 5000 {
		kv = append(kv, fmt.Sprintf("x-h-%d", i), "v", "x-dup", "d")
	}
	many, _ := proto.Marshal(reqHeadersMsg("/key", true, kv...))
	start := time.Now()
	r, err = sendRaw(conn, many)
	took := time.Since(start)
	if err != nil || string(r.GetRequestHeaders().GetResponse().GetHeaderMutation().GetSetHeaders()[0].GetHeader().GetRawValue()) != "fault-user" {
		t.Fatalf("10,000 headers: %v %v", r, err)
	}
	if took > 500*time.Millisecond+margin {
		t.Errorf("10,000 headers: answered after %v", took)
	}
	t.Logf("reliability: hostile: 10,000 headers → processed normally in %v", took.Round(time.Millisecond))
	check("10,000 headers")

	// Garbage: random bytes, truncated messages, a field of the wrong wire type.
	rng := rand.New(rand.NewPCG(1, 2))
	kinds := map[string]int{}
	for i := range scale(300, 3000) {
		var msg []byte
		switch i % 3 {
		case 0:
			msg = make([]byte, rng.IntN(200))
			for j := range msg {
				msg[j] = byte(rng.UintN(256))
			}
		case 1:
			msg = good[:rng.IntN(len(good))]
		case 2:
			msg = protowire.AppendTag(nil, 2, protowire.VarintType) // request_headers as a number
			msg = protowire.AppendVarint(msg, rng.Uint64())
		}
		start := time.Now()
		r, err := sendRaw(conn, msg)
		if d := time.Since(start); d > 500*time.Millisecond+margin {
			t.Errorf("garbage %x: answered after %v", msg, d)
		}
		switch {
		case err != nil && status.Code(err) != codes.Unknown && status.Code(err) != codes.DeadlineExceeded:
			kinds["error "+status.Code(err).String()]++
		case err != nil:
			t.Errorf("garbage %x: %v", msg, err)
		default:
			kinds[fmt.Sprintf("reply %T", r.GetResponse())]++
		}
	}
	t.Logf("reliability: hostile: %d garbage messages → %v", scale(300, 3000), kinds)
	check("garbage")

	// A message over the kernel's limit (64 KiB body cap + 1 MiB) is refused by gRPC.
	huge, _ := proto.Marshal(reqBodyMsg(strings.Repeat("x", 2<<20)))
	if _, err := sendRaw(conn, huge); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("2 MiB message: %v, want ResourceExhausted", err)
	}
	t.Log("reliability: hostile: 2 MiB ext_proc message → ResourceExhausted")
	check("a message over the limit")
}

// TestOversizedReplyFailsClosed: calls share one stream to the agent, and a reply over the
// kernel's message limit breaks that stream. The calls waiting on it were sent and may have
// run, and a broken exchange is no outage that fail_open covers: every one of them is answered
// 500, never let through, and the next call opens a new stream.
func TestOversizedReplyFailsClosed(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, AgentBin: testenv.Build(t, testenv.TestAgentPackage), KernelYAML: `policy_kernel:
  server: {message_timeout_ms: 1000}
  agents:
    - name: open
      socket_path: "{{SOCK}}"
      timeout_ms: 800
      connections: 1
      fail_open: true
  route_policies:
    - route_name: /huge
      request_policy_chain: [{policy: testHugeReply, metadata: {size: 3000000}}]
    - route_name: /slow
      request_policy_chain: [{policy: testSleep, metadata: {sleep_ms: 400}}]
    - route_name: /tagged
      request_policy_chain: [{policy: testTag, metadata: {tag: t}}]
`})
	c := e.Dial(t, envoyConfig)
	const waiting = 5
	shots := make(chan shot, waiting)
	for range waiting {
		go func() { shots <- play(c, "/slow", request("/slow")) }()
	}
	// The slow calls are on the stream when the oversized reply comes.
	testenv.WaitFor(t, 5*time.Second, "the slow calls to reach the agent", func() bool {
		return agentMetric(t, e, `policy_testagent_sleep_total{outcome="started"}`) == waiting
	})
	if s := play(c, "/huge", request("/huge")); s.outcome() != "500 invalid_agent_response" {
		t.Errorf("/huge: %s", s.outcome())
	}
	all := []shot{}
	for range waiting {
		s := <-shots
		all = append(all, s)
		if s.outcome() != "500 invalid_agent_response" {
			t.Errorf("a call on the broken stream: %s, want 500 invalid_agent_response", s.outcome())
		}
	}
	if s := play(c, "/tagged", request("/tagged")); s.outcome() != "upstream" {
		t.Errorf("after the broken stream: %s", s.outcome())
	}
	alive(t, e)
	tl := count(all)
	tl.report(t, "calls on the stream an oversized agent reply broke")
	if tl.lost() != 0 {
		t.Errorf("%d requests lost", tl.lost())
	}
}
