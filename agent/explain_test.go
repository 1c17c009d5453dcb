package agent

import (
	"context"
	"fmt"
	"strings"
	"testing"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// TestEntryHook: the hook hears every entry with its outcome, in order, and entries after the
// one that ended the chain are not heard; without a hook nothing is told.
func TestEntryHook(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	var got []string
	e.SetEntryHook(func(tr EntryTrace) {
		s := fmt.Sprintf("%d:%s:%s:%d", tr.Index, tr.Policy, tr.Outcome, len(tr.Instructions))
		if tr.Err != nil {
			s += ":err"
		}
		if tr.Duration < 0 || tr.Phase != agentv1.PolicyPhase_REQUEST {
			t.Errorf("trace %+v", tr)
		}
		got = append(got, s)
	})
	run := func(chain ...*agentv1.Policy) string {
		got = nil
		e.Execute(context.Background(), req(chain...))
		return strings.Join(got, " ")
	}
	if s := run(
		p("t.setHeader", "key", "x-a", "value", "1"),
		shadowed(p("t.denyBare")),
		onFailure(p("t.fail"), "skip_remaining"),
		p("t.setHeader", "key", "x-b", "value", "1"),
		onFailure(p("t.fail"), "continue"),
		p("t.setHeader", "key", "x-after", "value", "1"),
	); s != "0:t.setHeader:allow:1 1:t.denyBare:shadow:0 2:t.fail:error:0:err 3:t.setHeader:skipped:0 4:t.fail:skipped:0 5:t.setHeader:skipped:0" {
		t.Fatalf("traces: %s", s)
	}
	if s := run(
		onFailure(p("t.fail"), "continue"),
		p("t.requireHeader", "key", "x-a", "want", "never"),
		p("t.setHeader", "key", "x-after", "value", "1"),
	); s != "0:t.fail:error:0:err 1:t.requireHeader:deny:1" {
		t.Fatalf("denial: %s", s)
	}
	if s := run(p("t.setHeader", "key", "x-a", "value", "1"), p("t.nothere")); s != "0:t.setHeader:allow:1 1:t.nothere:error:0:err" {
		t.Fatalf("unknown policy: %s", s)
	}
	got = nil
	rq := req(p("t.sleep", "sleep", "5s"))
	rq.DeadlineMs = 30
	e.Execute(context.Background(), rq)
	if s := strings.Join(got, " "); s != "0:t.sleep:timeout:0:err" {
		t.Fatalf("deadline: %s", s)
	}
	e.SetEntryHook(nil)
	if s := run(p("t.setHeader", "key", "x-a", "value", "1")); s != "" {
		t.Fatalf("hook off: %s", s)
	}
}

// TestExplainEntries: a request with explain gets every entry's trace in its response, in
// order, with the entry's own instructions; one without gets none, and allocates nothing more
// than before (the off path is one bool check per entry).
func TestExplainEntries(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	chain := []*agentv1.Policy{
		p("t.setHeader", "key", "x-a", "value", "1"),
		shadowed(p("t.denyBare")),
		onFailure(p("t.fail"), "continue"),
		p("t.requireHeader", "key", "x-a", "want", "never"),
		p("t.setHeader", "key", "x-after", "value", "1"),
	}
	rq := req(chain...)
	rq.Explain = true
	resp := e.Execute(context.Background(), rq)
	var got []string
	for _, tr := range resp.GetEntries() {
		s := fmt.Sprintf("%d:%s:%s:%d", tr.GetIndex(), tr.GetPolicy(), tr.GetOutcome(), len(tr.GetInstructions()))
		if tr.GetError() != "" {
			s += ":err"
		}
		if tr.GetDurationNs() < 0 {
			t.Errorf("trace %+v", tr)
		}
		got = append(got, s)
	}
	if s := strings.Join(got, " "); s != "0:t.setHeader:allow:1 1:t.denyBare:shadow:0 2:t.fail:continue:0:err 3:t.requireHeader:deny:1" &&
		s != "0:t.setHeader:allow:1 1:t.denyBare:shadow:0 2:t.fail:error:0:err 3:t.requireHeader:deny:1" {
		t.Fatalf("entries: %s", s)
	}
	if tr := TraceOf(agentv1.PolicyPhase_REQUEST, resp.GetEntries()[2]); tr.Err == nil || tr.Index != 2 || tr.Policy != "t.fail" {
		t.Fatalf("TraceOf: %+v", tr)
	}
	rq = req(chain...)
	if resp := e.Execute(context.Background(), rq); len(resp.GetEntries()) != 0 {
		t.Fatalf("entries without explain: %v", resp.GetEntries())
	}
}
