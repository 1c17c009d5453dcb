package agent

import (
	"bytes"
	"context"
	"errors"
	"maps"
	"reflect"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/testenv"
	"github.com/policy-engine/policy-engine/internal/yamlconf"
	"github.com/rs/zerolog"
)

// Test policies, registered once for the package's tests.
var builds atomic.Int64

type testSettings struct {
	Key   string        `json:"key"`
	Value string        `json:"value"`
	Sleep time.Duration `json:"sleep"`
	Want  string        `json:"want"`
}

type funcPolicy func(ctx context.Context, c *policy.Context) (policy.Result, error)

func (f funcPolicy) Execute(ctx context.Context, c *policy.Context) (policy.Result, error) {
	return f(ctx, c)
}

func register(name string, phases policy.Phases, run func(s testSettings) funcPolicy) {
	registerModule(policy.Module{Name: name, Version: "0.0.1", Phases: phases}, run)
}

func registerModule(m policy.Module, run func(s testSettings) funcPolicy) {
	m.New = func(c policy.Config) (policy.Factory, error) {
		var cfg struct {
			Fail bool `json:"fail"`
		}
		if err := c.Decode(&cfg); err != nil {
			return nil, err
		}
		if cfg.Fail {
			return nil, errors.New("configured to fail")
		}
		return policy.FactoryFunc(func(md map[string]string) (policy.Policy, error) {
			builds.Add(1)
			var s testSettings
			if err := policy.DecodeMetadata(md, &s); err != nil {
				return nil, err
			}
			return run(s), nil
		}), nil
	}
	policy.Register(m)
}

func init() {
	register("t.setHeader", policy.Both, func(s testSettings) funcPolicy {
		return func(_ context.Context, c *policy.Context) (policy.Result, error) {
			return policy.Allow(policy.SetHeader(s.Key, s.Value)), nil
		}
	})
	register("t.appendHeader", policy.Both, func(s testSettings) funcPolicy {
		return func(_ context.Context, c *policy.Context) (policy.Result, error) {
			return policy.Allow(policy.AppendHeader(s.Key, s.Value)), nil
		}
	})
	register("t.removeHeader", policy.Both, func(s testSettings) funcPolicy {
		return func(_ context.Context, c *policy.Context) (policy.Result, error) {
			return policy.Allow(policy.RemoveHeader(s.Key)), nil
		}
	})
	// t.requireHeader denies unless the header holds the wanted value: it sees what earlier
	// policies set.
	register("t.requireHeader", policy.Both, func(s testSettings) funcPolicy {
		return func(_ context.Context, c *policy.Context) (policy.Result, error) {
			h := c.Headers
			if c.Response != nil {
				h = c.Response.Headers
			}
			if h[s.Key] != s.Want {
				return policy.Deny(403, "forbidden", "want "+s.Want+" got "+h[s.Key], nil), nil
			}
			return policy.Result{}, nil
		}
	})
	register("t.state", policy.Both, func(s testSettings) funcPolicy {
		return func(_ context.Context, c *policy.Context) (policy.Result, error) {
			return policy.Allow(policy.SetState(s.Key, s.Value+c.State[s.Key])), nil
		}
	})
	register("t.body", policy.Both, func(s testSettings) funcPolicy {
		return func(_ context.Context, c *policy.Context) (policy.Result, error) {
			return policy.Allow(policy.SetBody([]byte(s.Value))), nil
		}
	})
	register("t.fail", policy.Both, func(s testSettings) funcPolicy {
		return func(context.Context, *policy.Context) (policy.Result, error) {
			return policy.Result{}, errors.New("boom")
		}
	})
	register("t.panic", policy.Both, func(s testSettings) funcPolicy {
		return func(context.Context, *policy.Context) (policy.Result, error) { panic("policy bug") }
	})
	register("t.sleep", policy.Both, func(s testSettings) funcPolicy {
		return func(ctx context.Context, _ *policy.Context) (policy.Result, error) {
			select {
			case <-time.After(s.Sleep):
				return policy.Result{}, nil
			case <-ctx.Done():
				return policy.Result{}, ctx.Err()
			}
		}
	})
	register("t.denyBare", policy.Request, func(s testSettings) funcPolicy {
		return func(context.Context, *policy.Context) (policy.Result, error) {
			return policy.Result{Status: agentv1.StatusCode_POLICY_DENIED, Message: "no"}, nil
		}
	})
	register("t.badInstruction", policy.Request, func(s testSettings) funcPolicy {
		return func(context.Context, *policy.Context) (policy.Result, error) {
			return policy.Allow(&agentv1.Instruction{Type: agentv1.InstructionType(99)}), nil
		}
	})
	register("t.responseOnly", policy.Response, func(s testSettings) funcPolicy {
		return func(context.Context, *policy.Context) (policy.Result, error) { return policy.Result{}, nil }
	})
	// t.status returns the status named by value (or its number) with no error.
	register("t.status", policy.Both, func(s testSettings) funcPolicy {
		code, ok := agentv1.StatusCode_value[s.Value]
		if !ok {
			n, _ := strconv.Atoi(s.Value)
			code = int32(n)
		}
		return func(context.Context, *policy.Context) (policy.Result, error) {
			return policy.Result{Status: agentv1.StatusCode(code), Message: "status " + s.Value,
				Instructions: []*agentv1.Instruction{policy.SetHeader("x-status", s.Value)}}, nil
		}
	})
	// t.deaf sleeps whatever its context says, then allows with a header, or denies when
	// want is "deny".
	register("t.deaf", policy.Both, func(s testSettings) funcPolicy {
		return func(context.Context, *policy.Context) (policy.Result, error) {
			time.Sleep(s.Sleep)
			if s.Want == "deny" {
				return policy.Deny(403, "forbidden", "late", nil), nil
			}
			return policy.Allow(policy.SetHeader("x-late", "1")), nil
		}
	})
	// t.guard enforces: it fails when want is "fail", else denies unless the header key
	// holds want.
	registerModule(policy.Module{Name: "t.guard", Version: "0.0.1", Phases: policy.Both, Enforces: true}, func(s testSettings) funcPolicy {
		return func(_ context.Context, c *policy.Context) (policy.Result, error) {
			if s.Want == "fail" {
				return policy.Result{}, errors.New("guard broken")
			}
			if c.Headers[s.Key] != s.Want {
				return policy.Deny(401, "unauthorized", "no", nil), nil
			}
			return policy.Allow(policy.SetHeader("x-guard", "passed")), nil
		}
	})
	register("t.query", policy.Request, func(s testSettings) funcPolicy {
		return func(_ context.Context, c *policy.Context) (policy.Result, error) {
			return policy.Allow(policy.SetHeader("x-q", c.QueryParams()[s.Key])), nil
		}
	})
}

func testCore() *CoreConfig {
	return &CoreConfig{
		Name: "test", SocketPath: "unused",
		Server:         ServerConfig{MaxConcurrentRequests: 10, RequestTimeoutMS: 1000},
		ResourceLimits: ResourceLimits{MaxBodySizeBytes: 100, MaxStateSizeBytes: 50},
	}
}

func newTestExecutor(t *testing.T, core *CoreConfig) (*Executor, *bytes.Buffer) {
	t.Helper()
	var buf bytes.Buffer
	e := NewExecutor(logging.New(&buf, "agent", zerolog.DebugLevel))
	if err := e.Load(core, "v1"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return e, &buf
}

func p(name string, kv ...string) *agentv1.Policy {
	md := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		md[kv[i]] = kv[i+1]
	}
	return &agentv1.Policy{Name: name, Metadata: md}
}

func onFailure(pol *agentv1.Policy, v string) *agentv1.Policy { pol.OnFailure = v; return pol }

func req(policies ...*agentv1.Policy) *agentv1.PolicyRequest {
	return &agentv1.PolicyRequest{
		RequestId: "r1", Policies: policies, Phase: agentv1.PolicyPhase_REQUEST,
		Context: &agentv1.RequestContext{Headers: map[string]string{"a": "1"}, Path: "/x?q=v&q=w&e="},
	}
}

func immediate(r *agentv1.PolicyResponse) *agentv1.ImmediateResponse {
	for _, in := range r.GetInstructions() {
		if ir := in.GetImmediateResponse(); ir != nil {
			return ir
		}
	}
	return nil
}

func TestContextUpdatesReachLaterPolicies(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	r := e.Execute(context.Background(), req(
		p("t.setHeader", "key", "X-Who", "value", "alice"),
		p("t.requireHeader", "key", "x-who", "want", "alice"),
		p("t.appendHeader", "key", "x-who", "value", "bob"),
		p("t.requireHeader", "key", "x-who", "want", "alice, bob"),
		p("t.removeHeader", "key", "x-who"),
		p("t.requireHeader", "key", "x-who", "want", ""),
		p("t.appendHeader", "key", "x-new", "value", "first"),
		p("t.requireHeader", "key", "x-new", "want", "first"),
	))
	if r.GetStatus().GetCode() != agentv1.StatusCode_OK {
		t.Fatalf("status %v: %s", r.GetStatus(), r.GetMessage())
	}
	if len(r.GetInstructions()) != 4 {
		t.Fatalf("want the 4 header instructions, got %d", len(r.GetInstructions()))
	}
}

func TestDenialStopsChain(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	r := e.Execute(context.Background(), req(
		p("t.setHeader", "key", "x-a", "value", "1"),
		p("t.requireHeader", "key", "x-b", "want", "never"),
		p("t.setHeader", "key", "x-after", "value", "1"),
	))
	if r.GetStatus().GetCode() != agentv1.StatusCode_POLICY_DENIED || r.GetStatus().GetPolicyName() != "t.requireHeader" {
		t.Fatalf("status %v", r.GetStatus())
	}
	for _, in := range r.GetInstructions() {
		if in.GetHeader().GetKey() == "x-after" {
			t.Fatal("a policy after the denial ran")
		}
	}
	if ir := immediate(r); ir.GetStatusCode() != 403 {
		t.Fatalf("immediate %v", ir)
	}
}

func TestBareDenialGets403(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	r := e.Execute(context.Background(), req(p("t.denyBare")))
	if r.GetStatus().GetCode() != agentv1.StatusCode_POLICY_DENIED || immediate(r).GetStatusCode() != 403 || r.GetMessage() != "no" {
		t.Fatalf("%v", r)
	}
}

func TestOnFailure(t *testing.T) {
	e, logs := newTestExecutor(t, testCore())
	f := func(name, mode string, wantCode agentv1.StatusCode, wantAfter bool) {
		t.Helper()
		r := e.Execute(context.Background(), req(
			p("t.setHeader", "key", "x-before", "value", "1"),
			onFailure(p(name), mode),
			p("t.setHeader", "key", "x-after", "value", "1"),
		))
		if r.GetStatus().GetCode() != wantCode {
			t.Fatalf("%s/%s: status %v (%s)", name, mode, r.GetStatus(), r.GetMessage())
		}
		after := false
		for _, in := range r.GetInstructions() {
			after = after || in.GetHeader().GetKey() == "x-after"
		}
		if after != wantAfter {
			t.Fatalf("%s/%s: later policy ran = %v", name, mode, after)
		}
	}
	for _, name := range []string{"t.fail", "t.panic"} {
		f(name, "", agentv1.StatusCode_POLICY_ERROR, false)
		f(name, "deny", agentv1.StatusCode_POLICY_ERROR, false)
		f(name, "continue", agentv1.StatusCode_OK, true)
		f(name, "skip_remaining", agentv1.StatusCode_OK, false)
	}
	r := e.Execute(context.Background(), req(p("t.fail")))
	if r.GetInstructions() != nil || r.GetStatus().GetPolicyName() != "t.fail" || !strings.Contains(r.GetMessage(), "boom") {
		t.Fatalf("deny must drop instructions and name the policy: %v", r)
	}
	if !strings.Contains(logs.String(), `"policy panicked"`) {
		t.Fatal("a panic was not logged")
	}
}

// TestUnknownPolicy: a chain naming a policy the agent does not have fails with POLICY_ERROR,
// dropping what earlier policies did, whatever fail_on_unknown and on_failure say; the failure
// is counted and logged once per interval, and a config that sets fail_on_unknown loads with a
// warning.
func TestUnknownPolicy(t *testing.T) {
	f := func(failOnUnknown *bool, onFail string) {
		t.Helper()
		core := testCore()
		core.Policies.FailOnUnknown = failOnUnknown
		e, logs := newTestExecutor(t, core)
		if warned := strings.Contains(logs.String(), "fail_on_unknown is deprecated and ignored"); warned != (failOnUnknown != nil) {
			t.Fatalf("fail_on_unknown %v: warned %v:\n%s", failOnUnknown, warned, logs)
		}
		for range 3 {
			r := e.Execute(context.Background(), req(p("t.setHeader", "key", "x", "value", "1"), onFailure(p("nope"), onFail), p("t.setHeader", "key", "y", "value", "1")))
			if r.GetStatus().GetCode() != agentv1.StatusCode_POLICY_ERROR || r.GetStatus().GetPolicyName() != "nope" ||
				!strings.Contains(r.GetMessage(), `unknown policy "nope"`) || r.GetInstructions() != nil {
				t.Fatalf("fail_on_unknown %v, on_failure %q: %v", failOnUnknown, onFail, r)
			}
		}
		if n := strings.Count(logs.String(), "does not have; request failed"); n != 1 {
			t.Fatalf("logged %d times, want once (throttled):\n%s", n, logs)
		}
		var buf bytes.Buffer
		e.metrics.Set().WritePrometheus(&buf)
		if got := testenv.Metric(buf.String(), `policy_agent_policy_failures_total{policy="nope",reason="unknown_policy"}`); got != 3 {
			t.Fatalf("unknown_policy failures counted %v, want 3", got)
		}
	}
	yes, no := true, false
	for _, fou := range []*bool{nil, &no, &yes} {
		for _, of := range []string{"", "deny", "continue", "skip_remaining"} {
			f(fou, of)
		}
	}
}

// TestValidateChains: each entry is checked as Execute will run it: an unknown policy, a
// phase the policy does not run in, metadata its factory refuses; good entries get "".
func TestValidateChains(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	entry := func(pol *agentv1.Policy, phase agentv1.PolicyPhase) *agentv1.ChainEntry {
		return &agentv1.ChainEntry{Policy: pol, Phase: phase}
	}
	got := e.ValidateChains([]*agentv1.ChainEntry{
		entry(p("t.setHeader", "key", "x", "value", "1"), agentv1.PolicyPhase_REQUEST),
		entry(p("nope"), agentv1.PolicyPhase_REQUEST),
		entry(p("t.setHeader", "bogus", "1"), agentv1.PolicyPhase_RESPONSE),
		entry(p("t.responseOnly"), agentv1.PolicyPhase_REQUEST),
	})
	want := []string{"", `unknown policy "nope"`, `policy "t.setHeader": invalid metadata: metadata key "bogus": unknown key`,
		`policy "t.responseOnly" does not run in the request phase`}
	if len(got) != len(want) {
		t.Fatalf("got %q", got)
	}
	for i := range want {
		if !strings.Contains(got[i], want[i]) || (want[i] == "") != (got[i] == "") {
			t.Errorf("entry %d: got %q, want %q", i, got[i], want[i])
		}
	}
	e.Close()
	for _, msg := range e.ValidateChains([]*agentv1.ChainEntry{entry(p("t.setHeader"), agentv1.PolicyPhase_REQUEST)}) {
		if msg != "agent has no config loaded" {
			t.Errorf("no config: %q", msg)
		}
	}
}

func TestLimits(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	big := bytes.Repeat([]byte("x"), 101)
	rq := req(p("t.setHeader", "key", "x", "value", "1"))
	rq.Context.Body = big
	r := e.Execute(context.Background(), rq)
	if ir := immediate(r); ir.GetStatusCode() != 413 || r.GetStatus().GetCode() != agentv1.StatusCode_POLICY_DENIED {
		t.Fatalf("request body over the limit: %v", r)
	}
	if !strings.Contains(r.GetMessage(), "request body of 101 bytes exceeds the limit of 100 bytes") {
		t.Fatalf("message %q", r.GetMessage())
	}
	rs := req(p("t.setHeader", "key", "x", "value", "1"))
	rs.Phase = agentv1.PolicyPhase_RESPONSE
	rs.Response = &agentv1.ResponseContext{Body: big, StatusCode: 200}
	r = e.Execute(context.Background(), rs)
	if r.GetStatus().GetCode() != agentv1.StatusCode_POLICY_ERROR || !strings.Contains(r.GetMessage(), "response body of 101 bytes") {
		t.Fatalf("response body over the limit: %v", r)
	}
	st := req(p("t.setHeader", "key", "x", "value", "1"))
	st.State = map[string]string{"k": strings.Repeat("v", 60)}
	if r = e.Execute(context.Background(), st); r.GetStatus().GetCode() != agentv1.StatusCode_POLICY_ERROR || r.GetMessage() != errStateTooLarge.Error() {
		t.Fatalf("incoming state over the limit: %v", r)
	}
	r = e.Execute(context.Background(), req(p("t.state", "key", "k", "value", strings.Repeat("v", 60))))
	if r.GetStatus().GetCode() != agentv1.StatusCode_POLICY_ERROR || !strings.Contains(r.GetMessage(), "max_state_size_bytes") {
		t.Fatalf("state set over the limit: %v", r)
	}
}

func TestStateAndBody(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	rq := req(p("t.state", "key", "user", "value", "u1"), p("t.body", "value", "new"))
	rq.State = map[string]string{"user": "-old"}
	r := e.Execute(context.Background(), rq)
	var gotState, gotBody bool
	for _, in := range r.GetInstructions() {
		gotState = gotState || (in.GetState().GetKey() == "user" && in.GetState().GetValue() == "u1-old")
		gotBody = gotBody || string(in.GetBody().GetBody()) == "new"
	}
	if !gotState || !gotBody {
		t.Fatalf("%v", r)
	}
	rs := req(p("t.body", "value", "resp"), p("t.setHeader", "key", "x-r", "value", "1"), p("t.requireHeader", "key", "x-r", "want", "1"))
	rs.Phase = agentv1.PolicyPhase_RESPONSE
	rs.Response = &agentv1.ResponseContext{StatusCode: 200}
	if r := e.Execute(context.Background(), rs); r.GetStatus().GetCode() != agentv1.StatusCode_OK {
		t.Fatalf("response phase header update: %v", r)
	}
}

func TestQueryParams(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	r := e.Execute(context.Background(), req(p("t.query", "key", "q")))
	if r.GetInstructions()[0].GetHeader().GetValue() != "v" {
		t.Fatalf("%v", r)
	}
}

func TestDeadline(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	rq := req(p("t.sleep", "sleep", "5s"), p("t.setHeader", "key", "x", "value", "1"))
	rq.DeadlineMs = 30
	start := time.Now()
	r := e.Execute(context.Background(), rq)
	if el := time.Since(start); el > time.Second {
		t.Fatalf("deadline not honoured: %v", el)
	}
	if r.GetStatus().GetCode() != agentv1.StatusCode_TIMEOUT {
		t.Fatalf("%v", r)
	}
	// A deadline that passed before a policy starts stops the chain there.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if r := e.Execute(ctx, req(p("t.setHeader", "key", "x", "value", "1"))); r.GetStatus().GetCode() != agentv1.StatusCode_TIMEOUT {
		t.Fatalf("%v", r)
	}
}

func TestBadInputs(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	rq := req(p("t.setHeader"))
	rq.Phase = agentv1.PolicyPhase(7)
	if r := e.Execute(context.Background(), rq); r.GetStatus().GetCode() != agentv1.StatusCode_POLICY_ERROR || !strings.Contains(r.GetMessage(), "unknown phase") {
		t.Fatalf("%v", r)
	}
	if r := e.Execute(context.Background(), req(p("t.badInstruction"))); r.GetStatus().GetCode() != agentv1.StatusCode_POLICY_ERROR || !strings.Contains(r.GetMessage(), "unknown instruction type") {
		t.Fatalf("%v", r)
	}
	if r := e.Execute(context.Background(), req(p("t.responseOnly"))); r.GetStatus().GetCode() != agentv1.StatusCode_POLICY_ERROR || !strings.Contains(r.GetMessage(), "does not run in the request phase") {
		t.Fatalf("%v", r)
	}
	if r := e.Execute(context.Background(), req(p("t.setHeader", "bogus", "1"))); r.GetStatus().GetCode() != agentv1.StatusCode_POLICY_ERROR || !strings.Contains(r.GetMessage(), `invalid metadata: metadata key "bogus": unknown key`) {
		t.Fatalf("%v", r)
	}
	// Nil context and nil maps are survivable.
	if r := e.Execute(context.Background(), &agentv1.PolicyRequest{Policies: []*agentv1.Policy{p("t.setHeader", "key", "x", "value", "1")}}); r.GetStatus().GetCode() != agentv1.StatusCode_OK {
		t.Fatalf("%v", r)
	}
	rs := &agentv1.PolicyRequest{Phase: agentv1.PolicyPhase_RESPONSE, Policies: []*agentv1.Policy{p("t.setHeader", "key", "x", "value", "1")}}
	if r := e.Execute(context.Background(), rs); r.GetStatus().GetCode() != agentv1.StatusCode_OK {
		t.Fatalf("%v", r)
	}
	var none Executor
	none.log = e.log
	if r := none.Execute(context.Background(), req()); r.GetStatus().GetCode() != agentv1.StatusCode_POLICY_ERROR {
		t.Fatalf("no config: %v", r)
	}
}

func TestPoliciesCompiledOncePerMetadata(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	before := builds.Load()
	for i := 0; i < 50; i++ {
		e.Execute(context.Background(), req(
			p("t.setHeader", "key", "x-a", "value", "1"),
			p("t.setHeader", "key", "x-a", "value", "2"),
			p("t.setHeader", "value", "1", "key", "x-a"),
		))
	}
	if n := builds.Load() - before; n != 2 {
		t.Fatalf("want 2 builds for 2 distinct metadata maps, got %d", n)
	}
	if e.snap.Load().cached.Load() != 2 {
		t.Fatalf("cache holds %d", e.snap.Load().cached.Load())
	}
	// An invalid metadata map is cached as its error too.
	before = builds.Load()
	for i := 0; i < 5; i++ {
		e.Execute(context.Background(), req(p("t.setHeader", "bad", "1")))
	}
	if n := builds.Load() - before; n != 1 {
		t.Fatalf("invalid metadata built %d times", n)
	}
}

func TestLoadErrorsKeepPreviousSnapshot(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	bad := testCore()
	bad.Policies.Config = map[string]yamlconf.Raw{"nope": yamlconf.Raw(`{}`), "t.setHeader": yamlconf.Raw(`{"fail":true}`)}
	err := e.Load(bad, "v2")
	if err == nil || !strings.Contains(err.Error(), "agent_core.policies.config.nope: no such policy is compiled in") ||
		!strings.Contains(err.Error(), "agent_core.policies.config.t.setHeader: configured to fail") {
		t.Fatalf("got %v", err)
	}
	if e.snap.Load().version != "v1" {
		t.Fatal("a failed load replaced the snapshot")
	}
	d := e.Describe()
	if d.GetAgentName() != "test" || d.GetConfigVersion() != "v1" {
		t.Fatalf("%v", d)
	}
	found := false
	for _, pi := range d.GetSupportedPolicies() {
		if pi.GetName() == "t.responseOnly" {
			found = len(pi.GetSupportedPhases()) == 1 && pi.GetSupportedPhases()[0] == agentv1.PolicyPhase_RESPONSE
		}
	}
	if !found {
		t.Fatal("Describe misses phases")
	}
}

func TestHealthCheck(t *testing.T) {
	var none Executor
	if err := none.HealthCheck(context.Background()); err == nil {
		t.Fatal("no config must be unhealthy")
	}
	e, _ := newTestExecutor(t, testCore())
	if err := e.HealthCheck(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestConcurrencyBound(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	s := newService(e, 1)
	t.Cleanup(s.stop)
	started := make(chan struct{})
	done := make(chan *agentv1.PolicyResponse)
	go func() {
		close(started)
		done <- s.run(context.Background(), req(p("t.sleep", "sleep", "300ms")))
	}()
	<-started
	time.Sleep(50 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	r := s.run(ctx, req(p("t.setHeader", "key", "x", "value", "1")))
	if r.GetStatus().GetCode() != agentv1.StatusCode_TIMEOUT || !strings.Contains(r.GetMessage(), "max_concurrent_requests") {
		t.Fatalf("second call while the only slot is taken: %v", r)
	}
	if r := <-done; r.GetStatus().GetCode() != agentv1.StatusCode_OK {
		t.Fatalf("first call: %v", r)
	}
	if r := s.run(context.Background(), req(p("t.setHeader", "key", "x", "value", "1"))); r.GetStatus().GetCode() != agentv1.StatusCode_OK {
		t.Fatalf("slot not released: %v", r)
	}
}

// observerPolicy records the outcomes it observes.
type observerPolicy struct{ seen chan policy.Outcome }

func (o *observerPolicy) Execute(context.Context, *policy.Context) (policy.Result, error) {
	return policy.Result{}, nil
}

func (o *observerPolicy) ObserveChain(_ *policy.Context, out policy.Outcome) { o.seen <- out }

var observed = &observerPolicy{seen: make(chan policy.Outcome, 16)}

func init() {
	policy.Register(policy.Module{
		Name: "t.observer", Phases: policy.Both,
		New: func(policy.Config) (policy.Factory, error) {
			return policy.FactoryFunc(func(map[string]string) (policy.Policy, error) { return observed, nil }), nil
		},
	})
}

func TestChainObserver(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	f := func(chain []*agentv1.Policy, want policy.Outcome) {
		t.Helper()
		e.Execute(context.Background(), req(chain...))
		select {
		case got := <-observed.seen:
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("outcome %+v, want %+v", got, want)
			}
		default:
			t.Fatal("observer not called")
		}
		if len(observed.seen) != 0 {
			t.Fatal("observer called more than once")
		}
	}
	f([]*agentv1.Policy{p("t.observer"), p("t.setHeader", "key", "x", "value", "1")}, policy.Outcome{Status: agentv1.StatusCode_OK})
	// The denying policy comes before the observer: the observer still learns of the denial.
	f([]*agentv1.Policy{p("t.requireHeader", "key", "x-no", "want", "y"), p("t.observer")},
		policy.Outcome{Status: agentv1.StatusCode_POLICY_DENIED, DecidedBy: "t.requireHeader", Message: "want y got ", HTTPStatus: 403})
	f([]*agentv1.Policy{p("t.observer"), p("t.fail")}, policy.Outcome{Status: agentv1.StatusCode_POLICY_ERROR, DecidedBy: "t.fail", Message: "boom"})
}

// closeCounter is a factory that records when it is closed.
type closeCounter struct{ closed atomic.Bool }

func (c *closeCounter) Build(map[string]string) (policy.Policy, error) {
	return funcPolicy(func(ctx context.Context, _ *policy.Context) (policy.Result, error) {
		if c.closed.Load() {
			return policy.Result{}, errors.New("ran on a closed factory")
		}
		<-ctx.Done() // hold the chain until the test lets it go
		if c.closed.Load() {
			return policy.Result{}, errors.New("factory closed under a running policy")
		}
		return policy.Result{}, nil
	}), nil
}

func (c *closeCounter) Close() error { c.closed.Store(true); return nil }

var closers = make(chan *closeCounter, 8)

func init() {
	policy.Register(policy.Module{
		Name: "t.closer", Phases: policy.Request,
		New: func(policy.Config) (policy.Factory, error) {
			c := &closeCounter{}
			select {
			case closers <- c:
			default: // other tests load configs too; only TestReloadWaitsForRunningChains reads these
			}
			return c, nil
		},
	})
}

// TestReloadWaitsForRunningChains: a reload closes the old factories only after the chains
// running on them end.
func TestReloadWaitsForRunningChains(t *testing.T) {
	for len(closers) > 0 {
		<-closers
	}
	e, _ := newTestExecutor(t, testCore())
	first := <-closers
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan *agentv1.PolicyResponse)
	go func() { done <- e.Execute(ctx, req(p("t.closer"))) }()
	time.Sleep(50 * time.Millisecond) // the chain is running
	if err := e.Load(testCore(), "v2"); err != nil {
		t.Fatal(err)
	}
	<-closers
	if first.closed.Load() {
		t.Fatal("the old factory was closed under a running chain")
	}
	cancel()
	r := <-done
	if strings.Contains(r.GetMessage(), "closed") {
		t.Fatalf("%v", r)
	}
	if !first.closed.Load() {
		t.Fatal("the old factory was not closed once its last chain ended")
	}
}

// metricValue reads one series of the executor's metrics; 0 when it is absent.
func metricValue(t *testing.T, e *Executor, series string) float64 {
	t.Helper()
	var buf bytes.Buffer
	e.metrics.set.WritePrometheus(&buf)
	for _, line := range strings.Split(buf.String(), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	return 0
}

func headersOf(r *agentv1.PolicyResponse) map[string]string {
	h := map[string]string{}
	for _, in := range r.GetInstructions() {
		if in.GetType() == agentv1.InstructionType_SET_HEADER {
			h[in.GetHeader().GetKey()] = in.GetHeader().GetValue()
		}
	}
	return h
}

func TestEnforcingEntriesFailClosed(t *testing.T) {
	e, logs := newTestExecutor(t, testCore())
	// A failing enforcing entry denies whatever its on_failure says.
	for _, mode := range []string{"", "deny", "continue", "skip_remaining"} {
		r := e.Execute(context.Background(), req(
			onFailure(p("t.guard", "want", "fail"), mode),
			p("t.setHeader", "key", "x-after", "value", "1"),
		))
		if r.GetStatus().GetCode() != agentv1.StatusCode_POLICY_ERROR || r.GetStatus().GetPolicyName() != "t.guard" || len(r.GetInstructions()) != 0 {
			t.Errorf("on_failure %q on a failing enforcing entry: %v", mode, r)
		}
	}
	if got := e.Describe().GetAgentMetadata()["enforcing_policies"]; !strings.Contains(","+got+",", ",t.guard,") || strings.Contains(got, "t.fail") {
		t.Errorf("enforcing_policies advertised: %q", got)
	}
	if got := metricValue(t, e, `policy_agent_fail_closed_total{policy="t.guard"}`); got != 2 {
		t.Errorf("fail_closed counted %v, want 2 (continue and skip_remaining)", got)
	}
	e.Execute(context.Background(), req(onFailure(p("t.guard", "want", "fail"), "continue")))
	for _, mode := range []string{"continue", "skip_remaining"} {
		n := 0
		for _, line := range strings.Split(logs.String(), "\n") {
			if strings.Contains(line, `"on_failure":"`+mode+`"`) && strings.Contains(line, "is ignored") {
				n++
			}
		}
		if n != 1 {
			t.Errorf("the warning that %s is ignored was logged %d times, want once:\n%s", mode, n, logs)
		}
	}

	// skip_remaining skips what does not enforce, never what does.
	f := func(key string, chain []*agentv1.Policy, wantCode agentv1.StatusCode, wantPolicy string, wantHeaders map[string]string) {
		t.Helper()
		rq := req(chain...)
		rq.Context.Headers["x-key"] = key
		r := e.Execute(context.Background(), rq)
		if r.GetStatus().GetCode() != wantCode || r.GetStatus().GetPolicyName() != wantPolicy {
			t.Fatalf("key %q: %v (%s), want %v by %q", key, r.GetStatus(), r.GetMessage(), wantCode, wantPolicy)
		}
		if got := headersOf(r); wantHeaders != nil && !maps.Equal(got, wantHeaders) {
			t.Fatalf("key %q: headers %v, want %v", key, got, wantHeaders)
		}
	}
	skipThenGuard := []*agentv1.Policy{
		p("t.setHeader", "key", "x-before", "value", "1"),
		onFailure(p("t.fail"), "skip_remaining"),
		p("t.setHeader", "key", "x-skipped", "value", "1"),
		p("t.guard", "key", "x-key", "want", "good"),
		p("t.setHeader", "key", "x-skipped-too", "value", "1"),
	}
	f("bad", skipThenGuard, agentv1.StatusCode_POLICY_DENIED, "t.guard", nil)
	f("good", skipThenGuard, agentv1.StatusCode_OK, "t.fail", map[string]string{"x-before": "1", "x-guard": "passed"})
	f("good", []*agentv1.Policy{
		onFailure(p("t.panic"), "skip_remaining"),
		onFailure(p("t.guard", "want", "fail"), "continue"),
	}, agentv1.StatusCode_POLICY_ERROR, "t.guard", nil)
}

func TestFailingStatuses(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	f := func(status, mode string, wantCode agentv1.StatusCode, wantHeaders map[string]string) {
		t.Helper()
		r := e.Execute(context.Background(), req(
			onFailure(p("t.status", "value", status), mode),
			p("t.setHeader", "key", "x-after", "value", "1"),
		))
		if r.GetStatus().GetCode() != wantCode {
			t.Fatalf("%s/%s: %v (%s), want %v", status, mode, r.GetStatus(), r.GetMessage(), wantCode)
		}
		if wantCode != agentv1.StatusCode_OK && r.GetStatus().GetPolicyName() != "t.status" {
			t.Fatalf("%s/%s: the status names %q", status, mode, r.GetStatus().GetPolicyName())
		}
		if got := headersOf(r); !maps.Equal(got, wantHeaders) {
			t.Fatalf("%s/%s: headers %v, want %v", status, mode, got, wantHeaders)
		}
	}
	// A failing status is a failure: the entry's on_failure decides, and the failed policy's
	// instructions are dropped.
	f("POLICY_ERROR", "", agentv1.StatusCode_POLICY_ERROR, map[string]string{})
	f("POLICY_ERROR", "continue", agentv1.StatusCode_OK, map[string]string{"x-after": "1"})
	f("POLICY_ERROR", "skip_remaining", agentv1.StatusCode_OK, map[string]string{})
	f("7", "", agentv1.StatusCode_POLICY_ERROR, map[string]string{})
	f("-1", "continue", agentv1.StatusCode_OK, map[string]string{"x-after": "1"})
	// TIMEOUT ends the chain as a timeout, whatever on_failure says.
	f("TIMEOUT", "", agentv1.StatusCode_TIMEOUT, map[string]string{})
	f("TIMEOUT", "continue", agentv1.StatusCode_TIMEOUT, map[string]string{})
	f("OK", "", agentv1.StatusCode_OK, map[string]string{"x-status": "OK", "x-after": "1"})
	if got := metricValue(t, e, `policy_agent_policy_failures_total{policy="t.status",reason="timeout"}`); got != 2 {
		t.Errorf("timeouts counted %v, want 2", got)
	}
	if got := metricValue(t, e, `policy_agent_policy_failures_total{policy="t.status",reason="error"}`); got != 5 {
		t.Errorf("errors counted %v, want 5", got)
	}
}

func TestEveryChainHasADeadline(t *testing.T) {
	f := func(deadlineMS int64, limit, want time.Duration) {
		t.Helper()
		before := time.Now()
		got := deadlineOf(&agentv1.PolicyRequest{DeadlineMs: deadlineMS}, limit)
		if d := got.Sub(before); d < want || d > want+100*time.Millisecond {
			t.Fatalf("deadline_ms %d, limit %v: deadline in %v, want %v", deadlineMS, limit, d, want)
		}
	}
	f(0, time.Second, time.Second)
	f(-5, time.Second, time.Second)
	f(150, time.Second, 150*time.Millisecond)
	f(5000, time.Second, time.Second)

	core := testCore()
	core.Server.MaxChainDurationMS = 30
	e, _ := newTestExecutor(t, core)
	// A policy that ignores its context and allows after the deadline: the chain answers
	// TIMEOUT, without the late instructions, and no later policy runs.
	for _, deadlineMS := range []int64{0, 5000} {
		rq := req(p("t.deaf", "sleep", "60ms"), p("t.setHeader", "key", "x-after", "value", "1"))
		rq.DeadlineMs = deadlineMS
		r := e.Execute(context.Background(), rq)
		if r.GetStatus().GetCode() != agentv1.StatusCode_TIMEOUT || r.GetStatus().GetPolicyName() != "t.deaf" || len(r.GetInstructions()) != 0 {
			t.Fatalf("deadline_ms %d: %v", deadlineMS, r)
		}
	}
	// A late denial still denies (a TIMEOUT answer would let a fail-open agent's request
	// through), and is counted as a timeout too.
	r := e.Execute(context.Background(), req(p("t.deaf", "sleep", "60ms", "want", "deny"), p("t.setHeader", "key", "x-after", "value", "1")))
	if r.GetStatus().GetCode() != agentv1.StatusCode_POLICY_DENIED || immediate(r).GetStatusCode() != 403 || len(r.GetInstructions()) != 1 {
		t.Fatalf("late denial: %v", r)
	}
	if got := metricValue(t, e, `policy_agent_policy_failures_total{policy="t.deaf",reason="timeout"}`); got != 3 {
		t.Errorf("timeouts counted %v, want 3", got)
	}
	if got := metricValue(t, e, `policy_agent_executions_total{policy="t.deaf",status="ok"}`); got != 0 {
		t.Errorf("late allows counted as %v successes", got)
	}
	// Within the deadline, the same policy's answer stands.
	rq := req(p("t.deaf", "sleep", "1ms"))
	if r := e.Execute(context.Background(), rq); r.GetStatus().GetCode() != agentv1.StatusCode_OK {
		t.Fatalf("in time: %v", r)
	}
}

// credPolicy reads a credential from the header its metadata names.
type credPolicy struct{ header string }

func (c credPolicy) Execute(context.Context, *policy.Context) (policy.Result, error) {
	return policy.Result{}, nil
}

func (c credPolicy) CredentialNames() policy.Credentials {
	return policy.Credentials{Headers: []string{c.header}}
}

func init() {
	policy.Register(policy.Module{
		Name: "t.credential", Phases: policy.Both,
		New: func(policy.Config) (policy.Factory, error) {
			return policy.FactoryFunc(func(md map[string]string) (policy.Policy, error) { return credPolicy{md["header"]}, nil }), nil
		},
	})
	register("t.requireCredential", policy.Both, func(s testSettings) funcPolicy {
		return func(_ context.Context, c *policy.Context) (policy.Result, error) {
			if !c.Credentials.Header(s.Want) {
				return policy.Deny(403, "forbidden", s.Want+" is not a credential header", nil), nil
			}
			return policy.Result{}, nil
		}
	})
}

// TestCredentialNames: the credential names of a compiled policy reach every chain run after it
// was compiled, its own chain included, as one set for the config in force; a reload starts a
// new set.
func TestCredentialNames(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	status := func(chain ...*agentv1.Policy) agentv1.StatusCode {
		return e.Execute(context.Background(), req(chain...)).GetStatus().GetCode()
	}
	check := p("t.requireCredential", "want", "x-partner")
	if got := status(check); got != agentv1.StatusCode_POLICY_DENIED {
		t.Fatalf("before any credential policy: %v", got)
	}
	if got := status(p("t.credential", "header", "X-Partner"), check); got != agentv1.StatusCode_OK {
		t.Fatalf("in the chain of the policy that reads it: %v", got)
	}
	if got := status(check); got != agentv1.StatusCode_OK {
		t.Fatalf("in a later chain: %v", got)
	}
	if got := status(p("t.credential", "header", "x-other"), p("t.requireCredential", "want", "x-other"), check); got != agentv1.StatusCode_OK {
		t.Fatalf("a second name: %v", got)
	}
	if err := e.Load(testCore(), "v2"); err != nil {
		t.Fatal(err)
	}
	if got := status(check); got != agentv1.StatusCode_POLICY_DENIED {
		t.Fatalf("after a reload: %v", got)
	}
}
