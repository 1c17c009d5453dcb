package crossing

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
)

// dump writes transitions in the text form of `go tool trace -d=parsed`.
type dump struct{ bytes.Buffer }

// frames of where each role waits, innermost first, as the runtime records them.
var frames = map[string][]string{
	roleCaller:       {"runtime.selectgo", "github.com/policy-engine/policy-engine/kernel.(*laneStream).execute", "github.com/policy-engine/policy-engine/kernel.(*streamAgentClient).ExecuteTimeout"},
	roleStreamReader: {"google.golang.org/grpc.(*clientStream).RecvMsg", "github.com/policy-engine/policy-engine/kernel.(*laneStream).receive"},
	roleClientWriter: {"google.golang.org/grpc/internal/transport.(*controlBuffer).get", "google.golang.org/grpc/internal/transport.(*loopyWriter).run", "google.golang.org/grpc/internal/transport.NewHTTP2Client.func6"},
	roleServerWriter: {"google.golang.org/grpc/internal/transport.(*controlBuffer).get", "google.golang.org/grpc/internal/transport.(*loopyWriter).run", "google.golang.org/grpc/internal/transport.NewServerTransport.func3"},
	roleClientReader: {"github.com/policy-engine/policy-engine/internal/rawio.(*Conn).call", "google.golang.org/grpc/internal/transport.(*http2Client).reader"},
	roleServerReader: {"github.com/policy-engine/policy-engine/internal/rawio.(*Conn).call", "google.golang.org/grpc/internal/transport.(*http2Server).HandleStreams"},
	roleWorker:       {"runtime.chanrecv1", "github.com/policy-engine/policy-engine/agent.(*service).worker"},
}

func (d *dump) transition(t int64, g int64, from, to, role string) {
	fmt.Fprintf(&d.Buffer, "M=1 P=0 G=%d StateTransition Time=%d GoID=%d %s->%s Reason=\"\"\n", g, t, g, from, to)
	if from == "Running" && to == "Waiting" {
		d.WriteString("TransitionStack=\n")
		for _, f := range frames[role] {
			fmt.Fprintf(&d.Buffer, "\t%s @ 0x1\n\t\tfile.go:1\n", f)
		}
		d.WriteString("\nStack=\n\truntime.gopark @ 0x1\n\t\tproc.go:1\n\n")
	}
}

// call writes one call starting at t0 whose steps take 1, 2, ... 11 µs; the caller is g.
func call(k, a *dump, t0, g int64) {
	const us = 1000
	t := t0
	step := int64(0)
	next := func() int64 { step++; t += step * us; return t }
	k.transition(t0, g, "Running", "Waiting", roleCaller)
	k.transition(next(), 2, "Running", "Waiting", roleClientWriter)
	a.transition(next(), 20, "Waiting", "Runnable", roleServerReader)
	a.transition(next(), 20, "Runnable", "Running", roleServerReader)
	a.transition(next(), 21, "Waiting", "Runnable", roleWorker)
	a.transition(next(), 21, "Running", "Waiting", roleWorker)
	a.transition(next(), 22, "Running", "Waiting", roleServerWriter)
	k.transition(next(), 3, "Waiting", "Runnable", roleClientReader)
	k.transition(next(), 3, "Runnable", "Running", roleClientReader)
	k.transition(next(), 4, "Waiting", "Runnable", roleStreamReader)
	k.transition(next(), g, "Waiting", "Runnable", roleCaller)
	k.transition(next(), g, "Runnable", "Running", roleCaller)
}

func TestAnalyze(t *testing.T) {
	var k, a dump
	// Each role's goroutine waits once first, so that it is known by where it waits.
	k.transition(1, 3, "Running", "Waiting", roleClientReader)
	k.transition(1, 4, "Running", "Waiting", roleStreamReader)
	a.transition(1, 20, "Running", "Waiting", roleServerReader)
	call(&k, &a, 1_000_000, 100)
	call(&k, &a, 2_000_000, 101)
	// Two calls in flight at once: neither is followed.
	k.transition(3_000_000, 102, "Running", "Waiting", roleCaller)
	call(&k, &a, 3_000_500, 103)
	k.transition(3_100_000, 102, "Waiting", "Runnable", roleCaller)
	k.WriteString("M=1 P=0 G=5 GoStart Time=4000000 GoID=5\n") // other events are skipped

	b, err := Analyze(&k, &a)
	if err != nil {
		t.Fatal(err)
	}
	if b.Calls != 4 || b.Alone != 2 {
		t.Fatalf("calls %d, followed %d; want 4 and 2", b.Calls, b.Alone)
	}
	for i, s := range b.Step {
		if want := int64(i+1) * 1000; s[0] != want || s[1] != want {
			t.Errorf("step %q: %v, want %d twice", Steps[i], s, want)
		}
	}
	if b.Total[0] != 66_000 {
		t.Errorf("whole call %d ns, want 66 µs", b.Total[0])
	}
	var out bytes.Buffer
	if err := b.Write(&out); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"4 agent calls in the kernel's trace, 2 alone in flight", "agent worker woken                              4.0      4.0", "66.0"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}

func TestAnalyzeBadDump(t *testing.T) {
	bad := "M=1 P=0 G=1 StateTransition Time=99999999999999999999999 GoID=1 Running->Waiting Reason=\"\"\n"
	if _, err := Analyze(strings.NewReader(bad), strings.NewReader("")); err == nil || !strings.Contains(err.Error(), "kernel: trace dump: bad numbers") {
		t.Errorf("a time that is not a number: %v", err)
	}
	if _, err := Analyze(strings.NewReader(""), strings.NewReader(bad)); err == nil || !strings.Contains(err.Error(), "agent:") {
		t.Errorf("in the agent's dump: %v", err)
	}
	if _, err := AnalyzeTraces("no-such.trace", "no-such.trace"); err == nil || !strings.Contains(err.Error(), "read no-such.trace") {
		t.Errorf("a missing trace: %v", err)
	}
	// No calls at all is an empty breakdown, not an error.
	b, err := Analyze(strings.NewReader(""), strings.NewReader(""))
	if err != nil || b.Calls != 0 || b.Alone != 0 {
		t.Errorf("empty dumps: %+v, %v", b, err)
	}
	var out bytes.Buffer
	if err := b.Write(&out); err != nil || !strings.Contains(out.String(), "0 agent calls") {
		t.Errorf("empty breakdown: %q, %v", out.String(), err)
	}
}
