// Package crossing times the steps of the kernel's calls to the agent from execution traces
// of the two processes taken at the same time.
//
// The kernel's policy_kernel_agent_call_duration_seconds says how long a call takes; this says
// where the time goes. Both traces are read in the text form of `go tool trace -d=parsed`,
// whose timestamps are the system's monotonic clock, the same in both processes. The
// goroutines are told apart by where they wait (grpc-go's transport readers and writers, the
// kernel's callers and stream readers, the agent's workers), and each call that was alone in
// flight is followed through them:
//
//	kernel caller waits -> kernel's writer (loopy) has written and waits again
//	-> agent's transport reader woken -> agent worker woken -> worker done
//	-> agent's writer has written -> kernel's transport reader woken
//	-> kernel's stream reader woken -> caller woken -> caller running
//
// Calls that overlap another are left out: with two in flight the steps cannot be told apart.
package crossing

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os/exec"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// transition is a goroutine's change of state, with the frames of where it stopped running.
type transition struct {
	t        int64
	g        int64
	from, to string
	frames   []string
}

var (
	header = regexp.MustCompile(`^M=-?\d+ P=-?\d+ G=-?\d+ (\w+) Time=(\d+) (.*)`)
	state  = regexp.MustCompile(`GoID=(\d+) (\w+)->(\w+) `)
)

// parse reads the transitions of a `go tool trace -d=parsed` dump.
func parse(r io.Reader) ([]transition, error) {
	var (
		out     []transition
		cur     *transition
		inStack bool
	)
	flush := func() {
		if cur != nil {
			out = append(out, *cur)
			cur = nil
		}
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		line := sc.Text()
		if m := header.FindStringSubmatch(line); m != nil {
			flush()
			inStack = false
			if m[1] != "StateTransition" {
				continue
			}
			s := state.FindStringSubmatch(m[3])
			if s == nil {
				continue
			}
			t, err1 := strconv.ParseInt(m[2], 10, 64)
			g, err2 := strconv.ParseInt(s[1], 10, 64)
			if err1 != nil || err2 != nil {
				return nil, fmt.Errorf("trace dump: bad numbers in %q", line)
			}
			cur = &transition{t: t, g: g, from: s[2], to: s[3]}
			continue
		}
		if cur == nil {
			continue
		}
		switch {
		case line == "TransitionStack=":
			inStack = true
		case strings.HasPrefix(line, "Stack=") || line == "":
			inStack = false
		case inStack && strings.HasPrefix(line, "\t") && !strings.HasPrefix(line, "\t\t"):
			fn, _, _ := strings.Cut(strings.TrimSpace(line), " @ ")
			cur.frames = append(cur.frames, fn)
		}
	}
	flush()
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read trace dump: %w", err)
	}
	return out, nil
}

// Roles of the goroutines on a call's path, told by where they wait.
const (
	roleCaller       = "caller"        // kernel: an ext_proc stream waiting for its call
	roleStreamReader = "stream reader" // kernel: the agent stream's reader of replies
	roleClientWriter = "client writer" // grpc-go's writer of a client connection
	roleServerWriter = "server writer" // grpc-go's writer of a server connection
	roleClientReader = "client reader" // grpc-go's reader of a client connection
	roleServerReader = "server reader" // grpc-go's reader of a server connection
	roleWorker       = "worker"        // agent: a worker that runs chains
)

func role(frames []string) string {
	for _, f := range frames {
		switch {
		case strings.Contains(f, "(*laneStream).execute"):
			return roleCaller
		case strings.Contains(f, "(*laneStream).receive"):
			return roleStreamReader
		case strings.Contains(f, "(*loopyWriter).run"):
			if slices.ContainsFunc(frames, func(s string) bool { return strings.Contains(s, "HTTP2Client") }) {
				return roleClientWriter
			}
			return roleServerWriter
		case strings.Contains(f, "(*http2Client).reader"):
			return roleClientReader
		case strings.Contains(f, "(*http2Server).HandleStreams"):
			return roleServerReader
		case strings.Contains(f, "agent.(*service).worker"):
			return roleWorker
		}
	}
	return ""
}

// process is one trace: the times of each kind of transition, by role.
type process struct {
	roles map[int64]string
	// times[role][kind] lists, in order, when goroutines of the role made the transition kind
	// ("park": Running->Waiting, "wake": Waiting->Runnable, "run": Runnable->Running).
	times map[string]map[string][]int64
	// callers lists each caller goroutine's parks in laneStream.execute, wakes and runs.
	parks []callPark
	wakes map[int64][]int64
	runs  map[int64][]int64
}

type callPark struct{ t, g int64 }

func kind(tr transition) string {
	switch {
	case tr.from == "Running" && tr.to == "Waiting":
		return "park"
	case tr.from == "Waiting" && tr.to == "Runnable":
		return "wake"
	case tr.from == "Runnable" && tr.to == "Running":
		return "run"
	}
	return ""
}

func load(trs []transition) *process {
	p := &process{roles: map[int64]string{}, times: map[string]map[string][]int64{}, wakes: map[int64][]int64{}, runs: map[int64][]int64{}}
	for _, tr := range trs {
		if kind(tr) == "park" {
			if r := role(tr.frames); r != "" {
				if _, ok := p.roles[tr.g]; !ok {
					p.roles[tr.g] = r
				}
			}
		}
	}
	for _, tr := range trs {
		r, k := p.roles[tr.g], kind(tr)
		if r == "" || k == "" {
			continue
		}
		if p.times[r] == nil {
			p.times[r] = map[string][]int64{}
		}
		p.times[r][k] = append(p.times[r][k], tr.t)
		if r != roleCaller {
			continue
		}
		switch k {
		case "park":
			if slices.ContainsFunc(tr.frames, func(s string) bool { return strings.Contains(s, "(*laneStream).execute") }) {
				p.parks = append(p.parks, callPark{tr.t, tr.g})
			}
		case "wake":
			p.wakes[tr.g] = append(p.wakes[tr.g], tr.t)
		case "run":
			p.runs[tr.g] = append(p.runs[tr.g], tr.t)
		}
	}
	for _, m := range p.times {
		for _, ts := range m {
			slices.Sort(ts)
		}
	}
	return p
}

// after returns the first time in ts later than t, and whether there is one.
func after(ts []int64, t int64) (int64, bool) {
	i := sort.Search(len(ts), func(i int) bool { return ts[i] > t })
	if i == len(ts) {
		return 0, false
	}
	return ts[i], true
}

// Steps names the steps of a call, in order; each is the time from the end of the one before.
var Steps = []string{
	"kernel writes the call",
	"agent's reader woken",
	"agent's reader running",
	"agent worker woken",
	"worker runs the chain, queues the reply",
	"agent writes the reply",
	"kernel's reader woken",
	"kernel's reader running",
	"kernel's stream reader woken",
	"caller woken",
	"caller running",
}

// Breakdown is the time of each step, over the calls that were alone in flight.
type Breakdown struct {
	Calls, Alone int
	// Step[i] lists the duration of Steps[i] of every call followed, in nanoseconds, sorted.
	Step  [][]int64
	Total []int64
}

// Analyze follows the kernel's agent calls through the two dumps.
func Analyze(kernelDump, agentDump io.Reader) (*Breakdown, error) {
	kt, err := parse(kernelDump)
	if err != nil {
		return nil, fmt.Errorf("kernel: %w", err)
	}
	at, err := parse(agentDump)
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	k, a := load(kt), load(at)
	b := &Breakdown{Calls: len(k.parks), Step: make([][]int64, len(Steps))}
	// Each call's wait, from the caller's park to its wake-up; a call is alone when no other
	// call's wait overlaps its own.
	type wait struct{ park, woken, g int64 }
	waits := make([]wait, 0, len(k.parks))
	for _, c := range k.parks {
		w := wait{park: c.t, woken: -1, g: c.g}
		if t, ok := after(k.wakes[c.g], c.t); ok {
			w.woken = t
		}
		waits = append(waits, w)
	}
	slices.SortFunc(waits, func(x, y wait) int { return int(x.park - y.park) })
	var lastWoken int64 = -1 // the latest end of the waits before; -1 while none
	for i, c := range waits {
		alone := c.woken >= 0 && c.park > lastWoken && (i+1 == len(waits) || waits[i+1].park > c.woken)
		if c.woken < 0 {
			lastWoken = 1<<63 - 1 // never woken: every later call overlaps it
		} else {
			lastWoken = max(lastWoken, c.woken)
		}
		if !alone {
			continue
		}
		woken := c.woken
		running, ok := after(k.runs[c.g], woken)
		if !ok {
			continue
		}
		chain := []struct {
			p          *process
			role, kind string
		}{
			{k, roleClientWriter, "park"},
			{a, roleServerReader, "wake"},
			{a, roleServerReader, "run"},
			{a, roleWorker, "wake"},
			{a, roleWorker, "park"},
			{a, roleServerWriter, "park"},
			{k, roleClientReader, "wake"},
			{k, roleClientReader, "run"},
			{k, roleStreamReader, "wake"},
		}
		at := []int64{c.park}
		complete := true
		for _, s := range chain {
			t, ok := after(s.p.times[s.role][s.kind], at[len(at)-1])
			if !ok || t > woken {
				complete = false
				break
			}
			at = append(at, t)
		}
		if !complete {
			continue
		}
		at = append(at, woken, running)
		for i := range Steps {
			b.Step[i] = append(b.Step[i], at[i+1]-at[i])
		}
		b.Total = append(b.Total, running-c.park)
		b.Alone++
	}
	for _, s := range b.Step {
		slices.Sort(s)
	}
	slices.Sort(b.Total)
	return b, nil
}

// AnalyzeTraces follows the kernel's agent calls through two execution trace files, read with
// `go tool trace -d=parsed`.
func AnalyzeTraces(kernelTrace, agentTrace string) (*Breakdown, error) {
	var dumps [2]bytes.Buffer
	for i, path := range []string{kernelTrace, agentTrace} {
		var stderr bytes.Buffer
		cmd := exec.Command("go", "tool", "trace", "-d=parsed", path)
		cmd.Stdout, cmd.Stderr = &dumps[i], &stderr
		if err := cmd.Run(); err != nil {
			return nil, fmt.Errorf("read %s: %w: %s", path, err, bytes.TrimSpace(stderr.Bytes()))
		}
	}
	return Analyze(&dumps[0], &dumps[1])
}

// quantile returns the q quantile (0..1) of sorted values, 0 when empty.
func quantile(sorted []int64, q float64) int64 {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, int(q*float64(len(sorted))))]
}

// Write prints the breakdown: the p50 and p90 of each step and of the whole call, in µs.
func (b *Breakdown) Write(w io.Writer) error {
	fmt.Fprintf(w, "%d agent calls in the kernel's trace, %d alone in flight and followed through both traces\n", b.Calls, b.Alone)
	fmt.Fprintf(w, "%-42s %8s %8s\n", "step (from the end of the one before)", "p50 µs", "p90 µs")
	for i, name := range Steps {
		fmt.Fprintf(w, "%-42s %8.1f %8.1f\n", name, float64(quantile(b.Step[i], 0.5))/1e3, float64(quantile(b.Step[i], 0.9))/1e3)
	}
	_, err := fmt.Fprintf(w, "%-42s %8.1f %8.1f\n", "whole call (caller waits -> caller running)", float64(quantile(b.Total, 0.5))/1e3, float64(quantile(b.Total, 0.9))/1e3)
	return err
}
