package kernel

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// validatingAgent is a fakeAgent that also answers ValidateChains.
type validatingAgent struct {
	*fakeAgent
	mu    sync.Mutex
	asked [][]*agentv1.ChainEntry
	// verdict says what the agent answers for an entry; err fails the whole call.
	verdict func(*agentv1.ChainEntry) string
	err     error
}

func (v *validatingAgent) ValidateChains(_ context.Context, entries []*agentv1.ChainEntry) (*agentv1.ValidateChainsResponse, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.asked = append(v.asked, entries)
	if v.err != nil {
		return nil, v.err
	}
	out := make([]string, len(entries))
	for i, e := range entries {
		if v.verdict != nil {
			out[i] = v.verdict(e)
		}
	}
	return &agentv1.ValidateChainsResponse{Errors: out}, nil
}

func (v *validatingAgent) calls() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return len(v.asked)
}

var _ chainValidator = (*validatingAgent)(nil)

// validConfig is baseConfig without its route on an unknown policy.
var validConfig = strings.Replace(baseConfig, "policy: notThere", "policy: allowAll", 1)

// rebuildWith makes the test kernel's agent a validatingAgent and builds the snapshot the way
// the kernel does: the agent's verdicts first.
func rebuildWith(t *testing.T, tk *testKernel, va *validatingAgent) (*Snapshot, map[string]error) {
	t.Helper()
	snap := tk.s.Snapshot()
	for _, a := range snap.agents {
		a.client = va
	}
	errs := checkEntries(snap.Config, snap.agents, time.Second)
	next := buildSnapshot(snap.Config, snap.Version, snap.agents, tk.m)
	tk.s.Store(next)
	return next, errs
}

// TestEntriesRefusedByTheAgent: an entry the agent cannot build makes its route invalid (with
// its config key), the other routes serve, verdicts are asked once per policy set and agent
// config version, and an agent without ValidateChains leaves the schema checks alone.
func TestEntriesRefusedByTheAgent(t *testing.T) {
	tk := newTestKernel(t, validConfig, &fakeAgent{})
	va := &validatingAgent{fakeAgent: tk.agent, verdict: func(e *agentv1.ChainEntry) string {
		if e.GetPolicy().GetMetadata()["header_name"] == "X-Other" {
			return `policy "auth": invalid metadata: header_name: refused`
		}
		return ""
	}}
	snap, errs := rebuildWith(t, tk, va)
	if len(errs) != 0 {
		t.Fatal(errs)
	}
	if len(snap.invalid) != 1 || !strings.Contains(snap.invalid[0], `route "named-route": agent "a" cannot run this entry: policy "auth": invalid metadata: header_name: refused`) {
		t.Fatalf("invalid: %q", snap.invalid)
	}
	if len(snap.problems) != 1 || snap.problems[0].key != "policy_kernel.route_policies[1].request_policy_chain[0]" {
		t.Fatalf("problems: %+v", snap.problems)
	}
	st := tk.open(t)
	r := st.send(t, reqHeaders("/x", true, "named-route"))
	if jsonErrorOf(t, r.GetImmediateResponse()) != "invalid_route" || tk.agent.ncalls() != 0 {
		t.Fatalf("named-route: %v", r)
	}
	// The verdicts are kept: a rebuild asks nothing more.
	if _, errs := rebuildWith(t, tk, va); len(errs) != 0 || va.calls() != 1 {
		t.Fatalf("asked %d times: %v", va.calls(), errs)
	}
	// Another agent config version: asked again.
	info := testInfo()
	info.ConfigVersion = "agent-v2"
	tk.state.info.Store(info)
	if _, errs := rebuildWith(t, tk, va); len(errs) != 0 || va.calls() != 2 {
		t.Fatalf("asked %d times after the agent's config changed: %v", va.calls(), errs)
	}
	// An agent that predates the call: the schema checks alone, and it is not asked again.
	old := &validatingAgent{fakeAgent: tk.agent, err: status.Error(codes.Unimplemented, "unknown method")}
	tk.state.info.Store(testInfo())
	snap, errs = rebuildWith(t, tk, old)
	if len(errs) != 0 || len(snap.invalid) != 0 || len(snap.unvalidated) != 0 {
		t.Fatalf("old agent: %v %q %q", errs, snap.invalid, snap.unvalidated)
	}
	if rebuildWith(t, tk, old); old.calls() != 1 {
		t.Fatalf("an agent without ValidateChains asked %d times", old.calls())
	}
}

// TestRoutesNotChecked: routes whose agent could not build their entries, or was never
// reached, are refused with route_not_validated whatever fail_open says, the health loop is
// woken, and the kernel is not ready until a rebuild checks them.
func TestRoutesNotChecked(t *testing.T) {
	tk := newTestKernel(t, strings.Replace(validConfig, "retry: {max_attempts: 3, backoff_ms: 1}", "retry: {max_attempts: 3, backoff_ms: 1}\n      fail_open: true", 1), &fakeAgent{})
	k := newUnitKernel(t, tk, "unused")
	va := &validatingAgent{fakeAgent: tk.agent, err: status.Error(codes.Unavailable, "agent busy")}
	snap, errs := rebuildWith(t, tk, va)
	if errs["a"] == nil || len(snap.invalid) != 0 || len(snap.unvalidated) == 0 {
		t.Fatalf("errs %v invalid %q unvalidated %q", errs, snap.invalid, snap.unvalidated)
	}
	st := tk.open(t)
	r := st.send(t, reqHeaders("/api/v1/users", true, ""))
	if ir := r.GetImmediateResponse(); ir.GetStatus().GetCode() != 500 || jsonErrorOf(t, ir) != "route_not_validated" || tk.agent.ncalls() != 0 {
		t.Fatalf("unchecked route: %v", r)
	}
	select {
	case <-tk.s.wake:
	default:
		t.Fatal("the health loop was not woken")
	}
	// An empty chain needs no check.
	if r := tk.open(t).send(t, reqHeaders("/open", true, "")); r.GetImmediateResponse() != nil {
		t.Fatalf("/open: %v", r)
	}
	if ready, detail := k.readiness(); ready || !strings.Contains(strings.Join(detailNotReady(detail), ","), "not checked against their agent") {
		t.Fatalf("ready with unchecked routes: %+v", detail)
	}
	if snap.refusedRoutes() != len(snap.unvalidated) {
		t.Fatalf("refusedRoutes %d", snap.refusedRoutes())
	}
	// The agent answers again: the health check rebuilds and the routes serve.
	va.mu.Lock()
	va.err = nil
	va.mu.Unlock()
	k.checkAgent(context.Background(), tk.state)
	if snap := tk.s.Snapshot(); len(snap.unvalidated) != 0 || len(snap.invalid) != 0 {
		t.Fatalf("after the agent answered: %q %q", snap.unvalidated, snap.invalid)
	}
	if ready, detail := k.readiness(); !ready {
		t.Fatalf("not ready: %+v", detail)
	}

	// Never reached: the same refusal.
	tk2 := newTestKernel(t, validConfig, &fakeAgent{})
	tk2.state.info.Store(nil)
	snap = buildSnapshot(tk2.s.Snapshot().Config, "v2", tk2.s.Snapshot().agents, tk2.m)
	tk2.s.Store(snap)
	if r := tk2.open(t).send(t, reqHeaders("/api/v1/users", true, "")); jsonErrorOf(t, r.GetImmediateResponse()) != "route_not_validated" {
		t.Fatalf("agent never reached: %v", r)
	}
}

// detailNotReady reads the not_ready list of a readiness detail.
func detailNotReady(detail any) []string {
	b, _ := json.Marshal(detail)
	var d struct {
		NotReady []string `json:"not_ready"`
	}
	_ = json.Unmarshal(b, &d)
	return d.NotReady
}

// TestStaleRoute: once the agent's client learned another policy set than a route was
// compiled against, a call on the route is checked against it: the route runs while the set
// has what it needs, and is refused invalid_route, whatever the agent answered, when it lacks
// a policy or a body the route does not ask for. With the set unchanged, nothing is checked.
func TestStaleRoute(t *testing.T) {
	tk := newTestKernel(t, validConfig, &fakeAgent{})
	learned := new(atomic.Pointer[agentv1.GetAgentConfigResponse])
	tk.state.learned = learned
	snap := buildSnapshot(tk.s.Snapshot().Config, "v2", tk.s.Snapshot().agents, tk.m)
	tk.s.Store(snap)
	route, _ := snap.routes.ByName("/api/v1/users")
	if route.checkedWith == nil || route.stale() != "" {
		t.Fatal("a route compiled against the agent's set is stale")
	}
	learned.Store(route.checkedWith)
	if route.stale() != "" {
		t.Fatal("same set, stale")
	}
	f := func(mutate func(*agentv1.GetAgentConfigResponse), path, want string) {
		t.Helper()
		info := testInfo()
		mutate(info)
		learned.Store(info)
		r := tk.open(t).send(t, reqHeaders(path, true, ""))
		got := "continue"
		if ir := r.GetImmediateResponse(); ir != nil {
			got = jsonErrorOf(t, ir)
		}
		if got != want {
			t.Errorf("%s: %s, want %s", path, got, want)
		}
	}
	without := func(name string) func(*agentv1.GetAgentConfigResponse) {
		return func(info *agentv1.GetAgentConfigResponse) {
			var keep []*agentv1.PolicyInfo
			for _, p := range info.SupportedPolicies {
				if p.Name != name {
					keep = append(keep, p)
				}
			}
			info.SupportedPolicies = keep
		}
	}
	f(func(*agentv1.GetAgentConfigResponse) {}, "/api/v1/users", "continue")
	f(without("auth"), "/api/v1/users", "invalid_route")
	f(without("auth"), "/open", "continue") // an empty chain calls no agent
	f(without("hdr"), "/upload", "continue")
	f(func(info *agentv1.GetAgentConfigResponse) {
		for _, p := range info.SupportedPolicies {
			if p.Name == "auth" {
				p.RequiresRequestBody = true
			}
		}
	}, "/api/v1/users", "invalid_route")
	if n := tk.agent.ncalls(); n == 0 {
		t.Fatal("the agent was never called")
	}
}

// learnFake is a streamFake that answers GetAgentConfig with the set it is given, and counts
// the calls it ran: an agent build that skips the policies it lacks.
type learnFake struct {
	*streamFake
	info *agentv1.GetAgentConfigResponse
}

func (f *learnFake) GetAgentConfig(context.Context, *agentv1.GetAgentConfigRequest) (*agentv1.GetAgentConfigResponse, error) {
	return f.info, nil
}

// TestStreamLearnsBeforeFirstCall replaces the agent behind a client by one with another
// policy set: the client hears of the new set (onLearn) before any call reaches the new agent,
// and of an unchanged set never.
func TestStreamLearnsBeforeFirstCall(t *testing.T) {
	path := socketPath(t)
	first := &learnFake{streamFake: newStreamFake(), info: testInfo()}
	srv := serveAgent(t, path, first)
	var (
		mu      sync.Mutex
		learned []*agentv1.GetAgentConfigResponse
		second  = &learnFake{streamFake: newStreamFake(), info: testInfo()}
		early   atomic.Int64 // calls the second agent ran before onLearn returned
	)
	second.info.SupportedPolicies = second.info.SupportedPolicies[1:]
	c, err := dialStreamAgent(AgentConfig{SocketPath: path, Connections: 2, TimeoutMS: 200}, 4<<20,
		func(_ AgentClient, info *agentv1.GetAgentConfigResponse) {
			mu.Lock()
			defer mu.Unlock()
			learned = append(learned, info)
			early.Add(second.executed.Load())
		})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	warm(t, c)
	mu.Lock()
	if len(learned) != 1 || c.learned.Load() != learned[0] {
		t.Fatalf("learned %d sets at first", len(learned))
	}
	mu.Unlock()
	for range 4 { // both lanes open their streams: the same set is not news
		if _, err := callAgentFor(c, time.Second, "", "x"); err != nil {
			t.Fatal(err)
		}
	}
	srv.Stop()
	serveAgent(t, path, second)
	warm(t, c)
	for range 4 {
		if _, err := callAgentFor(c, time.Second, "", "y"); err != nil {
			t.Fatal(err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(learned) != 2 || len(learned[1].GetSupportedPolicies()) != len(second.info.GetSupportedPolicies()) {
		t.Fatalf("learned %d sets", len(learned))
	}
	if early.Load() != 0 || second.executed.Load() == 0 {
		t.Fatalf("the new agent ran %d calls before its set was learned (%d in all)", early.Load(), second.executed.Load())
	}
}
