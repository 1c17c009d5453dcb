package kernel

import (
	"bytes"
	"context"
	"io"
	"strconv"
	"strings"
	"testing"
	"time"

	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	"github.com/rs/zerolog"

	"github.com/policy-engine/policy-engine/agent"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/cond"
	"github.com/policy-engine/policy-engine/internal/logging"
)

// whenInfo is testInfo from an agent that evaluates when conditions.
func whenInfo() *agentv1.GetAgentConfigResponse {
	info := testInfo()
	info.AgentMetadata = map[string]string{"features": "cache,when"}
	return info
}

const whenConfig = `policy_kernel:
  agents: [{name: a, socket_path: /unused.sock}]
  route_policies:
    - route_name: /writes
      request_policy_chain:
        - policy: auth
          when: 'request.method != "GET"'
        - policy: reqBody
          when: 'request.headers["content-type"] == "application/json"'
    - route_name: /stateful
      request_policy_chain:
        - policy: auth
          when: '"user" in state'
    - route_name: /mixed
      request_policy_chain:
        - policy: auth
          when: 'request.method != "GET"'
        - policy: allowAll
    - route_name: /resp
      response_policy_chain:
        - policy: lean
          when: 'request.url_path.endsWith("/audit")'
        - policy: hdr
          when: 'response.code >= 500 || "x-debug" in response.headers'
`

func skippedCount(t *testing.T, k *testKernel, route, phase string) int {
	t.Helper()
	var b bytes.Buffer
	k.m.set.WritePrometheus(&b)
	prefix := `policy_kernel_chains_skipped_total{route="` + route + `",agent="a",phase="` + phase + `"} `
	for _, line := range strings.Split(b.String(), "\n") {
		if v, ok := strings.CutPrefix(line, prefix); ok {
			n, err := strconv.Atoi(v)
			if err != nil {
				t.Fatalf("%s: %v", line, err)
			}
			return n
		}
	}
	t.Fatalf("no series %s", prefix)
	return 0
}

// TestWhenConfigErrors: a condition that does not compile is a config error at its entry's
// when key, with file, line and the compiler's message; every such problem is reported.
func TestWhenConfigErrors(t *testing.T) {
	_, err := ParseConfig("kernel.yaml", []byte(`policy_kernel:
  agents: [{name: a, socket_path: /unused.sock}]
  route_policies:
    - route_name: /a
      request_policy_chain:
        - policy: auth
          when: 'request.methd == "GET"'
      response_policy_chain:
        - policy: hdr
          when: 'request.method'
        - policy: hdr
          when: 'response.code >= 500'
    - route_name: /b
      request_policy_chain:
        - policy: auth
          when: 'response.code >= 500'
  default_policy:
    request_policy_chain:
      - policy: allowAll
        when: 'request.method =='
`))
	if err == nil {
		t.Fatal("bad conditions accepted")
	}
	for _, want := range []string{
		"kernel.yaml:7: policy_kernel.route_policies[0].request_policy_chain[0].when: invalid condition: ",
		"undeclared reference to 'request'",
		"kernel.yaml:10: policy_kernel.route_policies[0].response_policy_chain[0].when: invalid condition: a condition must be a bool, got string",
		"kernel.yaml:16: policy_kernel.route_policies[1].request_policy_chain[0].when: invalid condition: response.code and response.headers are only known in a response_policy_chain",
		"kernel.yaml:20: policy_kernel.default_policy.request_policy_chain[0].when: invalid condition: ",
		"Syntax error",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
}

// TestWhenNeedsTheFeature: a route whose entries have conditions is refused on an agent that
// does not advertise the when feature (it would run them on every request); the other routes
// serve.
func TestWhenNeedsTheFeature(t *testing.T) {
	fa := &fakeAgent{info: testInfo()}
	k := newTestKernel(t, whenConfig+`    - route_name: /plain
      request_policy_chain:
        - policy: auth
`, fa)
	snap := k.s.Snapshot()
	if len(snap.invalid) != 4 || !strings.Contains(snap.invalid[0], `does not evaluate when conditions (it does not advertise the "when" feature)`) {
		t.Fatalf("invalid routes: %q", snap.invalid)
	}
	if snap.problems[0].key != "policy_kernel.route_policies[0].request_policy_chain[0].when" {
		t.Errorf("problem key %q", snap.problems[0].key)
	}
	st := k.open(t)
	r := st.send(t, reqHeaders("/writes", true, ""))
	if ir := r.GetImmediateResponse(); jsonErrorOf(t, ir) != "invalid_route" || fa.ncalls() != 0 {
		t.Fatalf("reply %v, %d calls", r, fa.ncalls())
	}
	st = k.open(t)
	if r := st.send(t, reqHeaders("/plain", true, "")); r.GetImmediateResponse() != nil || fa.ncalls() != 1 {
		t.Fatalf("a route without conditions: %v", r)
	}

	// An agent replaced by a build without the feature refuses the route until a rebuild.
	k2 := newTestKernel(t, whenConfig, &fakeAgent{info: whenInfo()})
	r2, _ := k2.s.Snapshot().routes.ByName("/mixed")
	if msg := r2.checkFeatures(testInfo()); !strings.Contains(msg, "no longer evaluates when conditions") {
		t.Errorf("checkFeatures: %q", msg)
	}
	if msg := r2.checkFeatures(whenInfo()); msg != "" {
		t.Errorf("checkFeatures with the feature: %q", msg)
	}
}

// TestWhenKernelSkip: a chain whose every entry has a condition that does not read state,
// none true, is not sent to the agent, and the body it would read is not asked for; a true
// condition sends the chain, conditions included, as usual.
func TestWhenKernelSkip(t *testing.T) {
	fa := &fakeAgent{info: whenInfo()}
	k := newTestKernel(t, whenConfig, fa)
	st := k.open(t)
	r := st.send(t, reqHeaders("/writes", false, "", "content-type", "text/plain"))
	if r.GetRequestHeaders() == nil || r.GetRequestHeaders().GetResponse().GetHeaderMutation() != nil || fa.ncalls() != 0 {
		t.Fatalf("GET: reply %v, %d calls", r, fa.ncalls())
	}
	if m := r.GetModeOverride(); m.GetRequestBodyMode() != filterv3.ProcessingMode_NONE {
		t.Fatalf("GET: the body was asked for: %v", m)
	}
	// A body Envoy sends anyway gets an empty reply.
	if r := st.send(t, reqBody("{}")); r.GetRequestBody() == nil || fa.ncalls() != 0 {
		t.Fatalf("unasked body: %v", r)
	}
	if n := skippedCount(t, k, "/writes", "request"); n != 1 {
		t.Fatalf("skipped counted %d", n)
	}

	// POST: the first condition is true: the chain goes to the agent, which evaluates them.
	st = k.open(t)
	r = st.send(t, reqHeaders("/writes", false, "", ":method", "POST", "content-type", "application/json"))
	if r.GetModeOverride().GetRequestBodyMode() != filterv3.ProcessingMode_BUFFERED || fa.ncalls() != 0 {
		t.Fatalf("POST: reply %v", r)
	}
	st.send(t, reqBody("{}"))
	if fa.ncalls() != 1 || fa.call(0).GetPolicies()[0].GetWhen() != `request.method != "GET"` {
		t.Fatalf("POST: calls %d %v", fa.ncalls(), fa.call(0).GetPolicies())
	}

	// A condition on state, an entry without one: always sent.
	for _, route := range []string{"/stateful", "/mixed"} {
		before := fa.ncalls()
		k.open(t).send(t, reqHeaders(route, true, ""))
		if fa.ncalls() != before+1 {
			t.Errorf("%s: not sent to the agent", route)
		}
	}

	// A condition the kernel cannot evaluate (a missing key): the agent decides, with the
	// entry's on_failure.
	before := fa.ncalls()
	k.open(t).send(t, reqHeaders("/writes", true, "", ":method", "GET"))
	if fa.ncalls() != before+1 {
		t.Error("an evaluation error did not go to the agent")
	}

	// A request that carries a header a policy of the chain owns goes to the agent, which
	// strips it before it evaluates the conditions.
	rt, _ := k.s.Snapshot().routes.ByName("/writes")
	rt.request.owned = []string{"x-user-id"}
	before = fa.ncalls()
	k.open(t).send(t, reqHeaders("/writes", true, "", "X_User-Id", "admin", "content-type", "text/plain"))
	if fa.ncalls() != before+1 {
		t.Error("a request with an owned header did not go to the agent")
	}
	k.open(t).send(t, reqHeaders("/writes", true, "", "content-type", "text/plain"))
	if fa.ncalls() != before+1 {
		t.Error("a request without an owned header went to the agent")
	}
}

// TestWhenKernelSkipResponse: a response chain whose conditions are all false is not sent;
// one with a true condition is, with the request it reads.
func TestWhenKernelSkipResponse(t *testing.T) {
	fa := &fakeAgent{info: whenInfo()}
	k := newTestKernel(t, whenConfig, fa)
	rt, _ := k.s.Snapshot().routes.ByName("/resp")
	if rt.response.noRequest {
		t.Fatal("a response chain with conditions is sent without the request")
	}
	st := k.open(t)
	st.send(t, reqHeaders("/resp/items", true, ""))
	if r := st.send(t, respHeaders("200", true)); r.GetResponseHeaders() == nil || fa.ncalls() != 0 {
		t.Fatalf("reply %v, %d calls", r, fa.ncalls())
	}
	if n := skippedCount(t, k, "/resp", "response"); n != 1 {
		t.Fatalf("skipped counted %d", n)
	}
	st = k.open(t)
	st.send(t, reqHeaders("/resp/audit", true, ""))
	st.send(t, respHeaders("200", true))
	if fa.ncalls() != 1 || fa.call(0).GetContext().GetPath() != "/resp/audit" {
		t.Fatalf("%d calls", fa.ncalls())
	}
	// The response's status and headers.
	for i, resp := range [][]string{{"502"}, {"200", "x-debug", "1"}} {
		st = k.open(t)
		st.send(t, reqHeaders("/resp/items", true, ""))
		st.send(t, respHeaders(resp[0], true, resp[1:]...))
		if fa.ncalls() != 2+i {
			t.Fatalf("response %v: not sent to the agent", resp)
		}
	}
}

// TestWhenEntryKey: entries that differ only by their condition are checked apart.
func TestWhenEntryKey(t *testing.T) {
	a := &agentv1.Policy{Name: "auth", When: `request.method == "GET"`}
	b := &agentv1.Policy{Name: "auth"}
	if entryKey(a, agentv1.PolicyPhase_REQUEST) == entryKey(b, agentv1.PolicyPhase_REQUEST) {
		t.Fatal("same key")
	}
}

// FuzzWhenKernelAgrees checks the kernel's skip against the agent's on arbitrary requests: when
// the kernel lets a chain go without the agent, the agent, given the same request, skips every
// entry too.
func FuzzWhenKernelAgrees(f *testing.F) {
	conds := []string{
		`request.method != "GET"`,
		`"x-api-key" in request.headers`,
		`request.query["a"] == "1"`,
		`"a" in request.query && request.url_path.startsWith("/admin")`,
		`request.headers.exists(k, k.startsWith("x-d")) || request.host == "h"`,
		`source.address.startsWith("10.") && request.scheme == "https"`,
		`route.name == "other" || request.path.contains("%2F")`,
		`size(request.headers) > 3`,
	}
	f.Add("GET", "/admin?a=1", "x-api-key", "k", "10.0.0.1", uint8(0), uint8(1))
	f.Add("POST", "/x?a=2&a=1", "x-d", "", "192.0.2.1", uint8(2), uint8(3))
	f.Add("GET", "/%2F?a", "host", "h", "", uint8(4), uint8(7))
	cfg, err := agent.ParseConfig("agent.yaml", []byte("agent_core:\n  name: a\n  socket_path: /unused.sock\n"))
	if err != nil {
		f.Fatal(err)
	}
	exec := agent.NewExecutor(logging.New(io.Discard, "agent", zerolog.ErrorLevel))
	if err := exec.Load(cfg.AgentCore, "v"); err != nil {
		f.Fatal(err)
	}
	var outcomes []string
	exec.SetEntryHook(func(tr agent.EntryTrace) { outcomes = append(outcomes, tr.Outcome) })
	m := newKernelMetrics()
	s := NewServer(logging.New(io.Discard, "kernel", zerolog.ErrorLevel), m)
	f.Fuzz(func(t *testing.T, method, path, hk, hv, src string, i, j uint8) {
		var ch chain
		for _, c := range []string{conds[int(i)%len(conds)], conds[int(j)%len(conds)]} {
			x, err := cond.CompileCondition(c)
			if err != nil {
				t.Fatal(err)
			}
			ch.policies = append(ch.policies, &agentv1.Policy{Name: "allowAll", When: c})
			ch.conds = append(ch.conds, x)
		}
		ch.kernelConds = true
		rc := func() *agentv1.RequestContext {
			return &agentv1.RequestContext{Method: method, Path: path, Scheme: "https", Authority: "api", ClientIp: src,
				Headers: map[string]string{strings.ToLower(hk): hv, "accept": "*/*"}}
		}
		st := &stream{route: &Route{Name: "r", request: ch, metrics: m.forRoute("r", "a")}, reqCtx: rc(), phase: agentv1.PolicyPhase_REQUEST}
		if !s.skipByConditions(st, &ch) {
			return
		}
		outcomes = outcomes[:0]
		resp := exec.Execute(context.Background(), &agentv1.PolicyRequest{Phase: agentv1.PolicyPhase_REQUEST, RouteName: "r", Policies: ch.policies, Context: rc(), DeadlineMs: 1000})
		if resp.GetStatus().GetCode() != agentv1.StatusCode_OK || len(resp.GetInstructions()) != 0 || len(outcomes) != 2 || outcomes[0] != "skipped" || outcomes[1] != "skipped" {
			t.Fatalf("the kernel skipped the chain, the agent: %v %v", resp, outcomes)
		}
	})
}

// TestWhenKernelSkipStreamed: a request chain that reads the body and that the kernel skips
// by its conditions does not ask for the request body whatever Envoy's filter config sends
// (buffered or streamed), while the response body the response chain reads is still asked
// for in the filter's own send mode.
func TestWhenKernelSkipStreamed(t *testing.T) {
	fa := &fakeAgent{info: whenInfo()}
	k := newTestKernel(t, `policy_kernel:
  agents: [{name: a, socket_path: /unused.sock}]
  route_policies:
    - route_name: /both
      request_policy_chain:
        - policy: reqBody
          when: 'request.method != "GET"'
      response_policy_chain:
        - policy: respBody
`, fa)
	for _, c := range []struct {
		req, resp, wantResp filterv3.ProcessingMode_BodySendMode
	}{
		{filterv3.ProcessingMode_BUFFERED, filterv3.ProcessingMode_BUFFERED, filterv3.ProcessingMode_BUFFERED},
		{filterv3.ProcessingMode_STREAMED, filterv3.ProcessingMode_BUFFERED, filterv3.ProcessingMode_BUFFERED},
		{filterv3.ProcessingMode_BUFFERED, filterv3.ProcessingMode_STREAMED, filterv3.ProcessingMode_STREAMED},
		{filterv3.ProcessingMode_STREAMED, filterv3.ProcessingMode_STREAMED, filterv3.ProcessingMode_STREAMED},
	} {
		r := k.open(t).send(t, withModes(reqHeaders("/both", false, ""), c.req, c.resp))
		m := r.GetModeOverride()
		if r.GetRequestHeaders() == nil || m.GetRequestBodyMode() != filterv3.ProcessingMode_NONE || m.GetResponseBodyMode() != c.wantResp {
			t.Errorf("%v/%v: mode %v", c.req, c.resp, m)
		}
	}
	if fa.ncalls() != 0 || skippedCount(t, k, "/both", "request") != 4 {
		t.Fatalf("%d agent calls", fa.ncalls())
	}
}

// TestAgentCallDuration: every call to the agent is one observation of
// policy_kernel_agent_call_duration_seconds, as long as the call took; a chain the kernel
// answers itself (every entry skipped) is none.
func TestAgentCallDuration(t *testing.T) {
	fa := &fakeAgent{info: whenInfo()}
	fa.fn = func(ctx context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		time.Sleep(3 * time.Millisecond)
		return &agentv1.PolicyResponse{RequestId: req.GetRequestId(), Status: &agentv1.ResponseStatus{}}, nil
	}
	k := newTestKernel(t, whenConfig, fa)
	calls := func() (count int, sum float64, fast int) {
		t.Helper()
		var b bytes.Buffer
		k.m.set.WritePrometheus(&b)
		const name = `policy_kernel_agent_call_duration_seconds`
		for _, line := range strings.Split(b.String(), "\n") {
			var err error
			if v, ok := strings.CutPrefix(line, name+`_count{agent="a"} `); ok {
				count, err = strconv.Atoi(v)
			} else if v, ok := strings.CutPrefix(line, name+`_sum{agent="a"} `); ok {
				sum, err = strconv.ParseFloat(v, 64)
			} else if v, ok := strings.CutPrefix(line, name+`_bucket{agent="a",le="0.0025"} `); ok {
				fast, err = strconv.Atoi(v)
			}
			if err != nil {
				t.Fatalf("%s: %v", line, err)
			}
		}
		return count, sum, fast
	}
	k.open(t).send(t, reqHeaders("/writes", true, "", "content-type", "text/plain"))
	if n, _, _ := calls(); n != 0 || fa.ncalls() != 0 {
		t.Fatalf("a skipped chain: %d observations, %d calls", n, fa.ncalls())
	}
	for range 3 {
		k.open(t).send(t, reqHeaders("/mixed", true, ""))
	}
	n, sum, fast := calls()
	if n != 3 || fa.ncalls() != 3 {
		t.Fatalf("three calls: %d observations, %d calls", n, fa.ncalls())
	}
	if sum < 0.009 || fast != 0 {
		t.Errorf("three calls of 3 ms each: sum %.4f s, %d observed under 2.5 ms", sum, fast)
	}
}
