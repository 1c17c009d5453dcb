package kernel

// Benchmarks of the kernel's hot path, one piece at a time and then whole. `make bench` runs
// them with -benchmem; allocs/op of BenchmarkHTTPRequestFakeAgent is what the kernel's own
// code allocates per HTTP request, without gRPC.
//
// To compare two versions, run each one ten times and compare with benchstat
// (golang.org/x/perf/cmd/benchstat):
//
//	go test -run '^$' -bench . -benchmem -count 10 ./kernel/ > old.txt
//	# change the code
//	go test -run '^$' -bench . -benchmem -count 10 ./kernel/ > new.txt
//	benchstat old.txt new.txt

import (
	"context"
	"fmt"
	"io"
	"syscall"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/rs/zerolog"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/policy-engine/policy-engine/agent"
	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	_ "github.com/policy-engine/policy-engine/policies/all"
)

// benchConfig is the load test's config: apiKeyAuth and allowAll on the request, security
// headers on the response, and a few other routes so that lookups are not trivial.
func benchConfig(socket string) string {
	cfg := fmt.Sprintf(`policy_kernel:
  agents:
    - name: "bench"
      socket_path: %q
      timeout_ms: 1000
  route_policies:
    - route_name: "/api/v1/users"
      request_policy_chain:
        - policy: "apiKeyAuth"
          metadata:
            header_name: "X-API-Key"
            required: true
        - policy: "allowAll"
      response_policy_chain:
        - policy: "addSecurityHeaders"
`, socket)
	for i := range 20 {
		cfg += fmt.Sprintf(`    - route_name: "/api/v%d/items"
      request_policy_chain:
        - policy: "allowAll"
`, i+2)
	}
	return cfg + `  default_policy:
    request_policy_chain: []
  observability:
    metrics_port: -1
`
}

const benchAPIKey = "bench-key-0123456789"

// cannedAgent answers like the real agent does for the bench config, without a network.
type cannedAgent struct{}

var (
	cannedRequest  = []*agentv1.Instruction{policy.SetHeader("x-user-id", "bench-user"), policy.SetState("user_id", "bench-user"), policy.SetState("auth_method", "api_key")}
	cannedResponse = []*agentv1.Instruction{policy.SetHeader("x-content-type-options", "nosniff"), policy.SetHeader("x-frame-options", "DENY"), policy.SetHeader("referrer-policy", "no-referrer")}
)

func (cannedAgent) Execute(_ context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
	ins := cannedRequest
	if req.GetPhase() == agentv1.PolicyPhase_RESPONSE {
		ins = cannedResponse
	}
	return &agentv1.PolicyResponse{RequestId: req.GetRequestId(), CallId: req.GetCallId(), Instructions: ins, Status: &agentv1.ResponseStatus{}}, nil
}

func (cannedAgent) GetAgentConfig(context.Context) (*agentv1.GetAgentConfigResponse, error) {
	return agent.NewExecutor(nil).Describe(), nil
}
func (cannedAgent) Check(context.Context) error { return nil }
func (cannedAgent) Close() error                { return nil }

var _ AgentClient = cannedAgent{}

// ValidateChains builds every entry, and reports the response chain's addSecurityHeaders as
// static, as the real agent does.
func (cannedAgent) ValidateChains(_ context.Context, entries []*agentv1.ChainEntry) (*agentv1.ValidateChainsResponse, error) {
	vr := &agentv1.ValidateChainsResponse{Errors: make([]string, len(entries))}
	for _, e := range entries {
		f := &agentv1.EntryFacts{}
		if e.GetPolicy().GetName() == "addSecurityHeaders" {
			f.StaticOutcome = &agentv1.StaticOutcome{Instructions: cannedResponse}
		}
		vr.Facts = append(vr.Facts, f)
	}
	return vr, nil
}

// benchServer returns a server whose snapshot uses client for the bench config's agent, with
// its chain entries checked by the agent (static chains applied by the kernel).
func benchServer(tb testing.TB, socket string, client AgentClient) *Server {
	return benchServerStatic(tb, socket, client, true)
}

// benchServerStatic is benchServer; static false makes the agent run every chain, as an agent
// that reports no static outcome does.
func benchServerStatic(tb testing.TB, socket string, client AgentClient, static bool) *Server {
	tb.Helper()
	return serverFor(tb, benchConfig(socket), client, static)
}

// serverFor is a kernel serving config with client as its agent, its chain entries checked by
// the agent; static false drops the static outcomes the agent reported.
func serverFor(tb testing.TB, config string, client AgentClient, static bool) *Server {
	tb.Helper()
	cfg, err := ParseConfig("bench.yaml", []byte(config))
	if err != nil {
		tb.Fatal(err)
	}
	kc := cfg.PolicyKernel
	m := newKernelMetrics()
	a := &agentState{cfg: kc.Agents[0], client: client, metrics: m.forAgent("bench")}
	info, err := client.GetAgentConfig(context.Background())
	if err != nil {
		tb.Fatal(err)
	}
	a.info.Store(info)
	a.healthy.Store(true)
	agents := map[string]*agentState{"bench": a}
	if errs := checkEntries(kc, agents, 5*time.Second); len(errs) > 0 {
		tb.Fatalf("chain entries not checked: %v", errs)
	}
	if v := a.verdicts.Load(); !static && v != nil {
		v.static = nil
	}
	snap := buildSnapshot(kc, "bench", agents, m)
	if len(snap.invalid) > 0 {
		tb.Fatalf("bench config invalid: %v", snap.invalid)
	}
	s := NewServer(logging.New(io.Discard, "kernel", zerolog.ErrorLevel), m)
	s.Store(snap)
	return s
}

func header(k, v string) *corev3.HeaderValue { return &corev3.HeaderValue{Key: k, RawValue: []byte(v)} }

// envoyRequest is a request_headers message as Envoy sends it.
func envoyRequest() *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{
		Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
			Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
				header(":authority", "api.example.com"), header(":path", "/api/v1/users/42?fields=name"),
				header(":method", "GET"), header(":scheme", "https"), header("user-agent", "bench/1.0"),
				header("accept", "application/json"), header("accept-encoding", "gzip, deflate, br"),
				header("x-forwarded-proto", "https"), header("x-forwarded-for", "203.0.113.7"),
				header("x-api-key", benchAPIKey), header("x-request-id", "0f2c9a4e-7d1b-4b8e-9a3f-5c6d7e8f9a0b"),
			}},
			EndOfStream: true,
		}},
		Attributes: map[string]*structpb.Struct{attributesKey: {Fields: map[string]*structpb.Value{
			"xds.route_name": structpb.NewStringValue("/api/v1/users"),
			"source.address": structpb.NewStringValue("127.0.0.1:40000"),
		}}},
	}
}

func envoyResponse() *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{
		Request: &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: &extprocv3.HttpHeaders{
			Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
				header(":status", "200"), header("content-type", "application/json"), header("content-length", "512"),
				header("date", "Sat, 01 Nov 2025 12:00:00 GMT"),
			}},
		}},
	}
}

// BenchmarkRouteLookup picks a route by name, by path prefix, and falls back to the default.
func BenchmarkRouteLookup(b *testing.B) {
	snap := benchServer(b, "unused.sock", cannedAgent{}).Snapshot()
	cases := []struct{ name, routeName, path string }{
		{"by-name", "/api/v1/users", "/api/v1/users/42"},
		{"by-path", "", "/api/v1/users/42/orders/7?x=1"},
		{"default", "", "/unknown/path/deep/below"},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if snap.route(c.routeName, c.path) == nil {
					b.Fatal("no route")
				}
			}
		})
	}
}

// BenchmarkRequestContext converts Envoy's request headers into the agent's RequestContext.
func BenchmarkRequestContext(b *testing.B) {
	h := envoyRequest().GetRequestHeaders()
	b.ReportAllocs()
	for b.Loop() {
		rc := getRequestContext()
		fillRequestContext(rc, h)
		putRequestContext(rc)
	}
}

// BenchmarkBuildMutation turns an agent's instructions into the ext_proc reply.
func BenchmarkBuildMutation(b *testing.B) {
	for _, c := range []struct {
		name  string
		phase agentv1.PolicyPhase
		ins   []*agentv1.Instruction
	}{
		{"request", agentv1.PolicyPhase_REQUEST, cannedRequest},
		{"response", agentv1.PolicyPhase_RESPONSE, cannedResponse},
	} {
		b.Run(c.name, func(b *testing.B) {
			st := &stream{}
			b.ReportAllocs()
			for b.Loop() {
				m, err := buildMutation(c.phase, c.ins, st.setState)
				if err != nil {
					b.Fatal(err)
				}
				if requestHeadersReply(m.common(false), nil) == nil {
					b.Fatal("no reply")
				}
				st.state = nil
			}
		})
	}
}

// httpRequest runs one HTTP request's two messages through the server.
func httpRequest(b *testing.B, s *Server, reqMsg, respMsg *extprocv3.ProcessingRequest) {
	ctx := context.Background()
	st := getStream(s.Snapshot())
	r1, err := s.handle(ctx, st, reqMsg)
	if err != nil || r1.GetRequestHeaders().GetResponse().GetHeaderMutation() == nil {
		b.Fatalf("request_headers: %v, %v", r1, err)
	}
	r2, err := s.handle(ctx, st, respMsg)
	if err != nil || len(r2.GetResponseHeaders().GetResponse().GetHeaderMutation().GetSetHeaders()) != 3 {
		b.Fatalf("response_headers: %v, %v", r2, err)
	}
	putStream(st)
}

// BenchmarkHTTPRequestFakeAgent runs one HTTP request (request and response headers) through
// the kernel with an agent that answers from memory: the kernel's own cost per request.
// In the static case the response chain (addSecurityHeaders) is answered by the kernel from
// the agent's static outcome; in the agent case it is called as every chain was before.
func BenchmarkHTTPRequestFakeAgent(b *testing.B) {
	for _, static := range []bool{true, false} {
		b.Run(map[bool]string{true: "static", false: "agent"}[static], func(b *testing.B) {
			s := benchServerStatic(b, "unused.sock", cannedAgent{}, static)
			reqMsg, respMsg := envoyRequest(), envoyResponse()
			b.ReportAllocs()
			for b.Loop() {
				httpRequest(b, s, reqMsg, respMsg)
			}
		})
	}
}

// BenchmarkHTTPRequestAgentUDS runs one HTTP request through the kernel and a real agent,
// in this process, over a real Unix socket: the kernel-agent hop included. 16 requests are in
// flight (8 per CPU), so that calls batch as they do under load; cpu-ns/op is the process's
// CPU time (user + system) per HTTP request, which unlike ns/op does not depend on how many
// cores the run got.
//
// static: the response chain is answered by the kernel (a static chain), and calls carry chain
// ids; static-full: the same with every call carrying its policies (an agent without chain
// ids); agent: every chain called, with chain ids. serial: one request at a time, as at a low
// rate, where nothing batches and every message wakes the other side: ns/op is then the
// latency the kernel and agent add to an HTTP request.
func BenchmarkHTTPRequestAgentUDS(b *testing.B) {
	for _, c := range []struct {
		name                string
		static, ids, serial bool
	}{{"static", true, true, false}, {"static-full", true, false, false}, {"agent", false, true, false}, {"serial", true, true, true}} {
		b.Run(c.name, func(b *testing.B) {
			benchHTTPRequestAgentUDS(b, c.static, c.ids, c.serial)
		})
	}
}

func benchHTTPRequestAgentUDS(b *testing.B, static, ids, serial bool) {
	client := startBenchAgent(b, ids)
	s := benchServerStatic(b, client.socket, client.streamAgentClient, static)
	reqMsg, respMsg := envoyRequest(), envoyResponse()
	httpRequest(b, s, reqMsg, respMsg) // opens the streams
	b.ReportAllocs()
	cpu0 := processCPU()
	b.ResetTimer()
	if serial {
		for range b.N {
			httpRequest(b, s, reqMsg, respMsg)
		}
	} else {
		b.SetParallelism(8)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				httpRequest(b, s, reqMsg, respMsg)
			}
		})
	}
	b.StopTimer()
	b.ReportMetric(float64(processCPU()-cpu0)/float64(b.N), "cpu-ns/op")
}

// processCPU is the user and system CPU time this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
