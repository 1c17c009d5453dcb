package agent

import (
	"context"
	"testing"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// TestStreamChains: a request with a chain_id and policies keeps them for the stream; one with
// the id alone runs them; an id the stream does not keep is refused (CHAIN_UNKNOWN, nothing
// run), also on the unary path, where no chain is kept: an empty chain would allow.
func TestStreamChains(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	s := &service{exec: e, sem: make(chan struct{}, 4)}
	var sc streamChains
	deny := []*agentv1.Policy{p("t.denyBare")}
	full := &agentv1.PolicyRequest{ChainId: 7, Policies: deny, Context: &agentv1.RequestContext{}}
	if !sc.resolve(full, nil) {
		t.Fatal("a request with its policies refused")
	}
	short := &agentv1.PolicyRequest{ChainId: 7, Context: &agentv1.RequestContext{}}
	if !sc.resolve(short, nil) || len(short.GetPolicies()) != 1 || short.GetPolicies()[0].GetName() != "t.denyBare" {
		t.Fatalf("the kept chain not found: %v", short.GetPolicies())
	}
	if r := s.run(context.Background(), short); r.GetStatus().GetCode() != agentv1.StatusCode_POLICY_DENIED {
		t.Fatalf("the kept chain did not run: %v", r)
	}
	other := &agentv1.PolicyRequest{ChainId: 8, CallId: 3, Context: &agentv1.RequestContext{}}
	if sc.resolve(other, e.metrics) {
		t.Fatal("an unknown chain_id resolved")
	}
	for _, r := range []*agentv1.PolicyResponse{s.run(context.Background(), other), s.run(context.Background(), &agentv1.PolicyRequest{ChainId: 9})} {
		if r.GetStatus().GetCode() != agentv1.StatusCode_CHAIN_UNKNOWN || len(r.GetInstructions()) != 0 {
			t.Fatalf("unknown chain_id answered %v, want CHAIN_UNKNOWN", r)
		}
	}
	// Bounded: past maxStreamChains, the kept chains are dropped and learned again.
	for i := range maxStreamChains {
		sc.resolve(&agentv1.PolicyRequest{ChainId: uint64(100 + i), Policies: deny}, nil)
	}
	if len(sc) > maxStreamChains {
		t.Fatalf("%d chains kept", len(sc))
	}
	if d, _ := s.GetAgentConfig(context.Background(), nil); !d.GetChainIds() {
		t.Fatal("chain_ids not advertised")
	}
}

// BenchmarkStreamRequest is the agent's work for one request of the load test's request chain
// (apiKeyAuth + rateLimit) read from ExecuteStream: decoding the batch, the stream's chain
// lookup, the chain, encoding the reply. full: the request carries its policies and their
// metadata, as to an agent without chain ids; id: it carries the chain id alone.
func BenchmarkStreamRequest(b *testing.B) {
	cfg, err := ParseConfig("bench.yaml", []byte(`agent_core:
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
	exec := NewExecutor(nil)
	if err := exec.Load(cfg.AgentCore, "bench"); err != nil {
		b.Fatal(err)
	}
	defer exec.Close()
	s := &service{exec: exec, sem: make(chan struct{}, 4)}
	policies := []*agentv1.Policy{
		{Name: "apiKeyAuth", Metadata: map[string]string{"header_name": "X-API-Key", "required": "true"}},
		{Name: "rateLimit", Metadata: map[string]string{"requests_per_second": "100000000", "burst": "100000000"}},
	}
	req := &agentv1.PolicyRequest{
		RequestId: "0f2c9a4e-7d1b-4b8e-9a3f-5c6d7e8f9a0b", Phase: agentv1.PolicyPhase_REQUEST, RouteName: "/api/v1/users",
		ChainId: 1, Policies: policies, DeadlineMs: 150, CallId: 1,
		Context: &agentv1.RequestContext{Method: "GET", Path: "/api/v1/users/42?fields=name", Scheme: "https", Authority: "api.example.com", ClientIp: "127.0.0.1",
			Headers: map[string]string{
				"user-agent": "bench/1.0", "accept": "application/json", "accept-encoding": "gzip, deflate, br",
				"x-forwarded-proto": "https", "x-forwarded-for": "203.0.113.7", "x-api-key": "bench-key-0123456789",
				"x-request-id": "0f2c9a4e-7d1b-4b8e-9a3f-5c6d7e8f9a0b",
			}},
	}
	wire := func(r *agentv1.PolicyRequest) []byte {
		data, err := (&agentv1.PolicyRequestBatch{Requests: []*agentv1.PolicyRequest{r}}).MarshalVT()
		if err != nil {
			b.Fatal(err)
		}
		return data
	}
	fullWire := wire(req)
	req.Policies = nil
	idWire := wire(req)
	for _, c := range []struct {
		name string
		data []byte
	}{{"full", fullWire}, {"id", idWire}} {
		b.Run(c.name, func(b *testing.B) {
			var sc streamChains
			sc.resolve(&agentv1.PolicyRequest{ChainId: 1, Policies: policies}, exec.metrics)
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				var batch agentv1.PolicyRequestBatch
				if err := batch.UnmarshalVT(c.data); err != nil {
					b.Fatal(err)
				}
				r := batch.Requests[0]
				if !sc.resolve(r, exec.metrics) {
					b.Fatal("chain not kept")
				}
				resp := s.run(ctx, r)
				if resp.GetStatus().GetCode() != agentv1.StatusCode_OK {
					b.Fatalf("reply %v", resp)
				}
				if _, err := resp.MarshalVT(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
