package agent_test

// BenchmarkExecuteChain runs the load test's chains in the agent's executor, without gRPC.
// Compare two versions with benchstat (golang.org/x/perf/cmd/benchstat):
//
//	go test -run '^$' -bench . -benchmem -count 10 ./agent/ > old.txt
//	# change the code
//	go test -run '^$' -bench . -benchmem -count 10 ./agent/ > new.txt
//	benchstat old.txt new.txt

import (
	"context"
	"io"
	"testing"

	"github.com/rs/zerolog"

	"github.com/policy-engine/policy-engine/agent"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	_ "github.com/policy-engine/policy-engine/policies/all"
)

func BenchmarkExecuteChain(b *testing.B) {
	cfg, err := agent.ParseConfig("bench.yaml", []byte(`agent_core:
  name: bench
  socket_path: unused.sock
  policies:
    config:
      apiKeyAuth:
        keys:
          - key: "bench-key-0123456789"
            user_id: "bench-user"
`))
	if err != nil {
		b.Fatal(err)
	}
	exec := agent.NewExecutor(logging.New(io.Discard, "agent", zerolog.ErrorLevel))
	if err := exec.Load(cfg.AgentCore, "bench"); err != nil {
		b.Fatal(err)
	}
	headers := map[string]string{
		"user-agent": "bench/1.0", "accept": "application/json", "accept-encoding": "gzip, deflate, br",
		"x-forwarded-proto": "https", "x-forwarded-for": "203.0.113.7", "x-api-key": "bench-key-0123456789",
		"x-request-id": "0f2c9a4e-7d1b-4b8e-9a3f-5c6d7e8f9a0b",
	}
	rc := &agentv1.RequestContext{Headers: headers, Method: "GET", Path: "/api/v1/users/42?fields=name", Scheme: "https", Authority: "api.example.com"}
	for _, c := range []struct {
		name string
		req  *agentv1.PolicyRequest
		want int // instructions; -1: not checked
	}{
		{"request", &agentv1.PolicyRequest{
			Phase:   agentv1.PolicyPhase_REQUEST,
			Context: rc,
			Policies: []*agentv1.Policy{
				{Name: "apiKeyAuth", Metadata: map[string]string{"header_name": "X-API-Key", "required": "true"}},
				{Name: "allowAll"},
			},
			DeadlineMs: 150,
		}, 3},
		// The same chain with apiKeyAuth in shadow: allowed, its header dropped.
		{"request_shadow_allow", &agentv1.PolicyRequest{
			Phase:   agentv1.PolicyPhase_REQUEST,
			Context: rc,
			Policies: []*agentv1.Policy{
				{Name: "apiKeyAuth", Metadata: map[string]string{"header_name": "X-API-Key", "required": "true"}, Shadow: true},
				{Name: "allowAll"},
			},
			DeadlineMs: 150,
		}, -1},
		// A shadow apiKeyAuth that would deny every request (it reads a header that is not
		// there): counted, logged at most shadowLogPerSecond times a second.
		{"request_shadow_deny", &agentv1.PolicyRequest{
			Phase:   agentv1.PolicyPhase_REQUEST,
			Context: rc,
			Policies: []*agentv1.Policy{
				{Name: "apiKeyAuth", Metadata: map[string]string{"header_name": "X-Missing-Key", "required": "true"}, Shadow: true},
				{Name: "allowAll"},
			},
			DeadlineMs: 150,
		}, -1},
		// The request chain with a when condition on apiKeyAuth: true (the entry runs; the
		// difference with "request" is the condition's cost), and false (the entry is skipped).
		{"request_when_true", &agentv1.PolicyRequest{
			Phase:   agentv1.PolicyPhase_REQUEST,
			Context: rc,
			Policies: []*agentv1.Policy{
				{Name: "apiKeyAuth", Metadata: map[string]string{"header_name": "X-API-Key", "required": "true"}, When: `request.method == "GET" && request.url_path.startsWith("/api/")`},
				{Name: "allowAll"},
			},
			DeadlineMs: 150,
		}, 3},
		{"request_when_false", &agentv1.PolicyRequest{
			Phase:   agentv1.PolicyPhase_REQUEST,
			Context: rc,
			Policies: []*agentv1.Policy{
				{Name: "apiKeyAuth", Metadata: map[string]string{"header_name": "X-API-Key", "required": "true"}, When: `request.method != "GET"`},
				{Name: "allowAll"},
			},
			DeadlineMs: 150,
		}, -1},
		{"response", &agentv1.PolicyRequest{
			Phase:      agentv1.PolicyPhase_RESPONSE,
			Context:    rc,
			Response:   &agentv1.ResponseContext{StatusCode: 200, Headers: map[string]string{"content-type": "application/json"}},
			Policies:   []*agentv1.Policy{{Name: "addSecurityHeaders"}},
			State:      map[string]string{"user_id": "bench-user"},
			DeadlineMs: 150,
		}, 3},
	} {
		b.Run(c.name, func(b *testing.B) {
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				// The executor applies instructions to the request it runs on; a request from
				// the kernel comes fresh, without the header apiKeyAuth set on the last one.
				delete(headers, "x-user-id")
				resp := exec.Execute(ctx, c.req)
				if resp.GetStatus().GetCode() != agentv1.StatusCode_OK || c.want >= 0 && len(resp.GetInstructions()) != c.want {
					b.Fatalf("reply %v", resp)
				}
			}
		})
	}
}
