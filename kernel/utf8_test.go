package kernel

import (
	"context"
	"maps"
	"strings"
	"testing"
	"unicode/utf8"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

const failOpenConfig = "timeout_ms: 50\n      fail_open: true"

// wireAgent is a fake agent that, like gRPC, must marshal the request before the agent can see
// it: a request that does not marshal fails the way grpc-go fails it.
func wireAgent(fn func(*agentv1.PolicyRequest) *agentv1.PolicyResponse) *fakeAgent {
	return &fakeAgent{fn: func(_ context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		if _, err := proto.Marshal(req); err != nil {
			return nil, status.Errorf(codes.Internal, "grpc: error while marshaling: %v", err)
		}
		return fn(req), nil
	}}
}

// TestInvalidUTF8HeadersReachTheAgent shows that header values holding bytes that are not UTF-8
// (legal obs-text in HTTP, and free for any client to send) still reach the agent: the agent
// API's strings must be UTF-8, so a raw value that is not would make the call fail before the
// agent sees it, and a fail-open agent would then let the request through unchecked.
func TestInvalidUTF8HeadersReachTheAgent(t *testing.T) {
	cfg := strings.Replace(baseConfig, "timeout_ms: 50", failOpenConfig, 1)
	var seen *agentv1.RequestContext
	fa := wireAgent(func(req *agentv1.PolicyRequest) *agentv1.PolicyResponse {
		seen = proto.Clone(req.GetContext()).(*agentv1.RequestContext) // the request is the stream's, reused
		return ok(immediateIns(403, nil, `{"error":"forbidden"}`))
	})
	k := newTestKernel(t, cfg, fa)
	st := k.open(t)
	r := st.send(t, reqHeaders("/api/v1/users/\xff", true, "", "x-api-key", "key-\xc3\x28-\xff", "x-ok", "caf\xc3\xa9"))
	st.end(t)
	if r.GetImmediateResponse().GetStatus().GetCode() != 403 {
		t.Fatalf("the agent's denial must apply, got %v", r)
	}
	if got := seen.GetHeaders()["x-api-key"]; got != "key-\uFFFD(-\uFFFD" {
		t.Fatalf("x-api-key reached the agent as %q", got)
	}
	if got := seen.GetHeaders()["x-ok"]; got != "café" {
		t.Fatalf("valid UTF-8 changed: %q", got)
	}
	if !utf8.ValidString(seen.GetPath()) {
		t.Fatalf("path %q", seen.GetPath())
	}
	// The response phase's headers take the same path to the agent.
	fa = wireAgent(func(req *agentv1.PolicyRequest) *agentv1.PolicyResponse {
		seen = &agentv1.RequestContext{Headers: maps.Clone(req.GetResponse().GetHeaders())}
		return ok()
	})
	k = newTestKernel(t, cfg, fa)
	st = k.open(t)
	st.send(t, reqHeaders("/api/v1/users", false, ""))
	r = st.send(t, respHeaders("200", true, "x-upstream", "\xfe\xff"))
	st.end(t)
	if r.GetResponseHeaders() == nil || seen.GetHeaders()["x-upstream"] != "\uFFFD" {
		t.Fatalf("response headers: %v, agent saw %v", r, seen.GetHeaders())
	}
}
