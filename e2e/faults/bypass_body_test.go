package faults

import (
	"context"
	"strings"
	"testing"
	"time"

	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// bodyKernelYAML has routes whose chains read a body: /body denies a request body holding
// "evil" after checking the API key, /resp sets security headers and removes a field of the
// response body. The body cap is 4 KiB.
const bodyKernelYAML = `policy_kernel:
  server: {message_timeout_ms: 500, max_body_size_bytes: 4096}
  agents:
    - name: closed
      socket_path: "{{SOCK}}"
      timeout_ms: 400
      health_check_interval_ms: 2000
  route_policies:
    - route_name: /body
      request_policy_chain:
        - {policy: apiKeyAuth}
        - {policy: testBodyDeny, metadata: {deny: evil}}
    - route_name: /resp
      response_policy_chain:
        - {policy: addSecurityHeaders, metadata: {headers: {X-Frame-Options: DENY}}}
        - {policy: responseBodyTransform, metadata: {remove_fields: [secret]}}
`

func startBodyEnv(t *testing.T) *testenv.Env {
	t.Helper()
	return testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: bodyKernelYAML, AgentBin: testenv.Build(t, testenv.TestAgentPackage)})
}

// bodyRequest is a keyed POST on /body with the given body.
func bodyRequest(body string) *envoytest.Request {
	r := request("/body", [2]string{"x-api-key", "fault-key-1"})
	r.Method = "POST"
	r.Body = []byte(body)
	return r
}

// reachedUpstream reports whether the request reached the upstream and its answer came back.
func reachedUpstream(s shot) bool {
	return s.err == nil && s.res != nil && s.res.Forwarded != nil && !s.res.LocalReply
}

// bodyMissing returns policy_kernel_body_missing_total of a route and phase.
func bodyMissing(t *testing.T, e *testenv.Env, route, phase string) float64 {
	t.Helper()
	_, body := e.Get(t, "/metrics")
	return testenv.Metric(body, `policy_kernel_body_missing_total{route="`+route+`",agent="closed",phase="`+phase+`"}`)
}

// TestBypassBodyOverrideRefused: Envoy does not let the kernel ask for the body
// (allow_mode_override: false, body mode NONE), so a chain that reads the request body never
// gets one. The request must not pass unjudged: the kernel refuses it at the first message that
// still arrives (the response headers), and counts it.
func TestBypassBodyOverrideRefused(t *testing.T) {
	e := startBodyEnv(t)
	cfg := envoyConfig
	cfg.AllowModeOverride = false
	c := e.Dial(t, cfg)
	s := play(c, "/body", bodyRequest("evil"))
	if reachedUpstream(s) {
		t.Fatalf("a request whose body the chain never saw was let through: %s", s.outcome())
	}
	if got := s.outcome(); got != "500 request_body_not_received" {
		t.Errorf("answer %s, want 500 request_body_not_received", got)
	}
	if n := bodyMissing(t, e, "/body", "request"); n < 1 {
		t.Errorf("policy_kernel_body_missing_total{phase=request} = %v, want ≥ 1", n)
	}
	t.Logf("reliability: bypass: request body never sent (allow_mode_override false) → %s", s.outcome())
}

// TestBypassBodyTrailersWithoutBody: a request with trailers and no body. Envoy sends no body
// message for it; the kernel must not wait for one while the request goes upstream.
func TestBypassBodyTrailersWithoutBody(t *testing.T) {
	e := startBodyEnv(t)
	f := func(name string, cfg envoytest.FilterConfig, key, want string) {
		t.Helper()
		c := e.Dial(t, cfg)
		r := request("/body")
		if key != "" {
			r.Headers = append(r.Headers, [2]string{"x-api-key", key})
		}
		r.Method = "POST"
		r.Trailers = [][2]string{{"x-checksum", "1"}}
		s := play(c, "/body", r)
		if got := s.outcome(); got != want {
			t.Errorf("%s: %s, want %s", name, got, want)
		}
		t.Logf("reliability: bypass: trailers without body, %s → %s", name, s.outcome())
	}
	// With the override the kernel asks for the trailers; it cannot tell an empty body from
	// one Envoy did not send, so it refuses.
	f("mode override, no key", envoyConfig, "", "500 request_body_not_received")
	f("mode override, valid key", envoyConfig, "fault-key-1", "500 request_body_not_received")
	// Envoy configured to buffer bodies and send trailers: the trailers say the body is
	// empty, and the chain judges it (the missing key is refused by apiKeyAuth).
	buffered := envoyConfig
	buffered.AllowModeOverride = false
	buffered.ProcessingMode = &extprocfilterv3.ProcessingMode{
		RequestBodyMode:    extprocfilterv3.ProcessingMode_BUFFERED,
		RequestTrailerMode: extprocfilterv3.ProcessingMode_SEND,
	}
	f("buffered, no key", buffered, "", "401 unauthorized")
	if n := bodyMissing(t, e, "/body", "request"); n < 2 {
		t.Errorf("policy_kernel_body_missing_total{phase=request} = %v, want ≥ 2", n)
	}
}

// TestBypassBodyStreamed: Envoy streams the request body in chunks (STREAMED). The chain must
// judge the whole body, never the first chunk alone, and no chunk may reach the upstream
// before the decision.
func TestBypassBodyStreamed(t *testing.T) {
	e := startBodyEnv(t)
	for _, override := range []bool{true, false} {
		cfg := envoyConfig
		cfg.AllowModeOverride = override
		cfg.ChunkBytes = 16
		cfg.ProcessingMode = &extprocfilterv3.ProcessingMode{RequestBodyMode: extprocfilterv3.ProcessingMode_STREAMED}
		c := e.Dial(t, cfg)
		// "evil" in the last chunk.
		bad := strings.Repeat("a", 100) + "evil"
		s := play(c, "/body", bodyRequest(bad))
		if got := s.outcome(); got != "403 forbidden" {
			t.Errorf("override %v: streamed body with the forbidden text in its last chunk: %s, want 403 forbidden", override, got)
		}
		t.Logf("reliability: bypass: streamed request body, forbidden text in the last chunk (override %v) → %s", override, s.outcome())
		// Split across two chunks.
		split := strings.Repeat("a", 14) + "evil"
		if got := play(c, "/body", bodyRequest(split)).outcome(); got != "403 forbidden" {
			t.Errorf("override %v: forbidden text split across chunks: %s, want 403 forbidden", override, got)
		}
		good := strings.Repeat("abcdefgh", 40)
		s = play(c, "/body", bodyRequest(good))
		if !reachedUpstream(s) {
			t.Errorf("override %v: good streamed body: %s, want upstream", override, s.outcome())
		} else if string(s.res.Forwarded.Body) != good {
			t.Errorf("override %v: upstream got %d bytes, want the %d sent", override, len(s.res.Forwarded.Body), len(good))
		}
		big := strings.Repeat("b", 5000)
		if got := play(c, "/body", bodyRequest(big)).outcome(); got != "413 payload_too_large" {
			t.Errorf("override %v: streamed body over the cap: %s, want 413 payload_too_large", override, got)
		}
	}
}

// respUpstream answers JSON with a field the response chain removes.
func respUpstream(*envoytest.Forwarded) *envoytest.Response {
	return &envoytest.Response{Status: 200, Headers: [][2]string{{"content-type", "application/json"}},
		Body: []byte(`{"id":1,"secret":"s3cr3t","pad":"` + strings.Repeat("p", 64) + `"}`)}
}

// TestBypassBodyResponse: a response chain that reads the body, under Envoy settings where the
// body does not come (override refused), comes with trailers only, or comes in chunks. The
// header-only entries still apply; a body the chain does not get is counted and, where a
// message still arrives, refused.
func TestBypassBodyResponse(t *testing.T) {
	e := startBodyEnv(t)
	do := func(cfg envoytest.FilterConfig, up envoytest.Upstream) shot {
		c := e.Dial(t, cfg)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s := shot{route: "/resp", start: time.Now()}
		s.res, s.err = c.Do(ctx, request("/resp"), up)
		s.latency = time.Since(s.start)
		return s
	}
	// The override is refused: no body comes. The security headers are still set, and the
	// missing body is counted.
	noOverride := envoyConfig
	noOverride.AllowModeOverride = false
	before := bodyMissing(t, e, "/resp", "response")
	s := do(noOverride, respUpstream)
	if s.err != nil {
		t.Fatal(s.err)
	}
	if v := testenv.Header(s.res.Headers, "x-frame-options"); v != "DENY" {
		t.Errorf("no body sent: X-Frame-Options %q, want DENY (the header-only entry was skipped)", v)
	}
	testenv.WaitFor(t, 5*time.Second, "the missing response body to be counted", func() bool {
		return bodyMissing(t, e, "/resp", "response") > before
	})
	t.Logf("reliability: bypass: response body never sent → %d, X-Frame-Options %q, counted", s.res.Status, testenv.Header(s.res.Headers, "x-frame-options"))

	// The response has trailers and Envoy sends them, but no body: refused.
	trailers := noOverride
	trailers.ProcessingMode = &extprocfilterv3.ProcessingMode{ResponseTrailerMode: extprocfilterv3.ProcessingMode_SEND}
	s = do(trailers, func(f *envoytest.Forwarded) *envoytest.Response {
		r := respUpstream(f)
		r.Trailers = [][2]string{{"grpc-status", "0"}}
		return r
	})
	if got := s.outcome(); got != "500 response_body_not_received" {
		t.Errorf("response trailers without the body: %s, want 500 response_body_not_received", got)
	}
	t.Logf("reliability: bypass: response trailers, body never sent → %s", s.outcome())

	// STREAMED: the field is removed from the whole body, not judged on its first chunk.
	streamed := envoyConfig
	streamed.ChunkBytes = 8
	streamed.ProcessingMode = &extprocfilterv3.ProcessingMode{ResponseBodyMode: extprocfilterv3.ProcessingMode_STREAMED}
	s = do(streamed, respUpstream)
	if s.err != nil {
		t.Fatal(s.err)
	}
	if strings.Contains(string(s.res.Body), "secret") || !strings.Contains(string(s.res.Body), `"id":1`) {
		t.Errorf("streamed response body %q: want it without the secret field", s.res.Body)
	}
	if v := testenv.Header(s.res.Headers, "x-frame-options"); v != "DENY" {
		t.Errorf("streamed response: X-Frame-Options %q, want DENY", v)
	}
	t.Logf("reliability: bypass: streamed response body → %d %q", s.res.Status, s.res.Body)
}

// TestBypassBodyStreamedTrailers: a STREAMED body followed by trailers. Envoy holds the trailers
// until every chunk is answered, and the kernel holds the chunks' replies until the body ends,
// so the end never comes; when Envoy's message timeout passes, a failure_mode_allow filter
// would let the body through unjudged. The kernel refuses first.
func TestBypassBodyStreamedTrailers(t *testing.T) {
	e := startBodyEnv(t)
	cfg := envoyConfig
	cfg.FailureModeAllow = true
	cfg.ChunkBytes = 16
	cfg.ProcessingMode = &extprocfilterv3.ProcessingMode{
		RequestBodyMode:    extprocfilterv3.ProcessingMode_STREAMED,
		RequestTrailerMode: extprocfilterv3.ProcessingMode_SEND,
	}
	c := e.Dial(t, cfg)
	r := bodyRequest(strings.Repeat("a", 40) + "evil")
	r.Trailers = [][2]string{{"x-checksum", "1"}}
	s := play(c, "/body", r)
	if got := s.outcome(); got != "500 request_body_incomplete" {
		t.Errorf("streamed body with trailers, failure_mode_allow: %s, want 500 request_body_incomplete", got)
	}
	if s.latency > 450*time.Millisecond+margin {
		t.Errorf("answered after %v", s.latency)
	}
	// The kernel counts the missing body when the stream ends, just after Envoy has the answer.
	testenv.WaitFor(t, 5*time.Second, "policy_kernel_body_missing_total{phase=request} to count the streamed body", func() bool {
		return bodyMissing(t, e, "/body", "request") >= 1
	})
	t.Logf("reliability: bypass: streamed request body with trailers, failure_mode_allow → %s in %v", s.outcome(), s.latency.Round(time.Millisecond))
}
