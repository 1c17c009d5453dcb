package kernel

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/policy-engine/policy-engine/agent"
)

// whenBenchConfig has one route whose chain runs apiKeyAuth on writes only, and the same chain
// without the condition.
func whenBenchConfig(socket string) string {
	// Long timeouts: a benchmark on a busy machine measures, it does not time out.
	return fmt.Sprintf(`policy_kernel:
  server:
    message_timeout_ms: 10000
  agents:
    - name: "bench"
      socket_path: %q
      timeout_ms: 5000
  route_policies:
    - route_name: "/api/v1/users"
      request_policy_chain:
        - policy: "apiKeyAuth"
          metadata: {header_name: "X-API-Key", required: true}
          when: 'request.method != "GET"'
    - route_name: "/api/v1/plain"
      request_policy_chain:
        - policy: "apiKeyAuth"
          metadata: {header_name: "X-API-Key", required: true}
  observability:
    metrics_port: -1
`, socket)
}

func whenBenchServer(tb testing.TB, socket string, client AgentClient) *Server {
	tb.Helper()
	return serverFor(tb, whenBenchConfig(socket), client, true)
}

// whenRequest is envoyRequest with another method and route.
func whenRequest(method, route string) *extprocv3.ProcessingRequest {
	r := envoyRequest()
	hs := r.GetRequestHeaders().GetHeaders().GetHeaders()
	for i, h := range hs {
		if h.GetKey() == ":method" {
			hs[i] = &corev3.HeaderValue{Key: ":method", RawValue: []byte(method)}
		}
	}
	r.GetAttributes()[attributesKey].GetFields()["xds.route_name"] = structpb.NewStringValue(route)
	return r
}

// requestPhase runs one request_headers message through the server; crossed says whether the
// chain ran (apiKeyAuth's x-user-id is set).
func requestPhase(b *testing.B, s *Server, msg *extprocv3.ProcessingRequest, crossed bool) {
	st := getStream(s.Snapshot())
	r, err := s.handle(context.Background(), st, msg)
	if err != nil || (r.GetRequestHeaders().GetResponse().GetHeaderMutation() != nil) != crossed {
		b.Fatalf("request_headers: %v, %v", r, err)
	}
	putStream(st)
}

// BenchmarkWhen is a request whose chain's only entry a when condition skips, decided in the
// kernel (skipped), against the same request crossing to the agent: a POST the condition
// lets through (crossing), and a GET on the same chain without a condition (no_when, the
// cost of a route that does not use the feature). fake is an agent that answers from memory
// (the kernel's own cost), uds a real agent in this process over a Unix socket.
func BenchmarkWhen(b *testing.B) {
	run := func(b *testing.B, s *Server) {
		for _, c := range []struct {
			name    string
			msg     *extprocv3.ProcessingRequest
			crossed bool
		}{
			{"skipped", whenRequest("GET", "/api/v1/users"), false},
			{"crossing", whenRequest("POST", "/api/v1/users"), true},
			{"no_when", whenRequest("GET", "/api/v1/plain"), true},
		} {
			b.Run(c.name, func(b *testing.B) {
				requestPhase(b, s, c.msg, c.crossed)
				b.ReportAllocs()
				for b.Loop() {
					requestPhase(b, s, c.msg, c.crossed)
				}
			})
		}
	}
	b.Run("fake", func(b *testing.B) { run(b, whenBenchServer(b, "unused.sock", cannedAgent{})) })
	b.Run("uds", func(b *testing.B) {
		client := startBenchAgent(b, false)
		run(b, whenBenchServer(b, client.socket, client))
	})
}

// benchAgentClient is a stream client of an agent running in the test's process.
type benchAgentClient struct {
	*streamAgentClient
	socket string
}

// startBenchAgent runs agent.Main with apiKeyAuth's bench key on a socket of its own until the
// benchmark ends, and returns a client whose connections have all answered. verify makes each
// stream learn the agent's config first (and so whether it keeps chain ids).
func startBenchAgent(b *testing.B, verify bool) benchAgentClient {
	b.Helper()
	dir := b.TempDir()
	socket := filepath.Join(dir, "agent.sock")
	cfgPath := filepath.Join(dir, "agent.yaml")
	cfg := fmt.Sprintf(`agent_core:
  name: "bench"
  socket_path: %q
  policies:
    config:
      apiKeyAuth:
        keys:
          - key: %q
            user_id: "bench-user"
  observability:
    log_level: "error"
`, socket, benchAPIKey)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- agent.Main(ctx, []string{"-config", cfgPath}, io.Discard) }()
	u, err := dialAgent(socket, 2, 4<<20)
	if err != nil {
		b.Fatal(err)
	}
	client := newStreamAgentClient(u, time.Second)
	client.verify = verify
	b.Cleanup(func() {
		client.Close()
		cancel()
		if err := <-done; err != nil {
			b.Error(err)
		}
	})
	// Calls go round-robin over the connections: wait until each one has answered, since a
	// connection that tried before the socket existed backs off for a moment.
	deadline := time.Now().Add(10 * time.Second)
	for ok := 0; ok < 4; {
		if _, err := client.GetAgentConfig(ctx); err == nil {
			ok++
			continue
		} else if time.Now().After(deadline) {
			b.Fatalf("agent did not start: %v", err)
		}
		ok = 0
		time.Sleep(20 * time.Millisecond)
	}
	return benchAgentClient{client, socket}
}
