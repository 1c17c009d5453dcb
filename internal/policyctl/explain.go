package policyctl

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"

	"github.com/policy-engine/policy-engine/agent"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/kernel"
)

// Explanation is why the request got its answer.
type Explanation struct {
	// Route is the route picked ("default" for the default policy, "" for none) and Rule the
	// rule that picked it: attribute, path prefix, default or none.
	Route   string `json:"route"`
	Rule    string `json:"rule"`
	Agent   string `json:"agent,omitempty"`
	Invalid string `json:"invalid,omitempty"`
	// Request and Response are the route's chains, entry by entry.
	Request  []Entry `json:"request_chain"`
	Response []Entry `json:"response_chain"`
	// Note says what the explanation lacks (an agent that gave no traces).
	Note string `json:"note,omitempty"`

	red *redactor
}

// Entry is one chain entry and what it did.
type Entry struct {
	Policy    string `json:"policy"`
	Shadow    bool   `json:"shadow,omitempty"`
	OnFailure string `json:"on_failure,omitempty"`
	// When is the entry's condition; empty: it always runs.
	When string `json:"when,omitempty"`
	// Outcome is allow, deny, error, timeout, skipped, shadow, or "not run" (an earlier entry
	// ended the chain, the request was refused before the phase, or the phase never came).
	Outcome    string   `json:"outcome"`
	DurationUS float64  `json:"duration_us,omitempty"`
	Changes    []string `json:"changes,omitempty"`
	Error      string   `json:"error,omitempty"`
	Message    string   `json:"message,omitempty"`
}

func explain(ctx context.Context, args []string, stdout, stderr io.Writer) (int, error) {
	fs := flag.NewFlagSet("policyctl explain", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var rf requestFlags
	rf.register(fs)
	kernelCfg := fs.String("config", "", "the kernel's config `file`")
	var agentCfgs listFlag
	fs.Var(&agentCfgs, "agent-config", "an agent's config `file` (repeatable: one for every agent the kernel config names)")
	kernelAddr := fs.String("kernel", "", "not used: the ext_proc port does not explain requests (see --kernel-admin)")
	kernelAdmin := fs.String("kernel-admin", "", "explain on a running kernel: the `URL` of its admin listener (e.g. http://127.0.0.1:9190), instead of the configs")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `usage: policyctl explain --config kernel.yaml --agent-config agent.yaml [flags] [METHOD] PATH
       policyctl explain --kernel-admin http://127.0.0.1:9190 [flags] [METHOD] PATH

Offline (--config, --agent-config): runs the request in policyctl's own process: the kernel's
route selection and chains on the kernel config, the agent's policies on the agent config
(secret references resolved as the agent does).

On a running kernel (--kernel-admin): POSTs the request to the kernel's admin listener
(/debug/explain, loopback by default: kubectl port-forward reaches it in a pod), which plays it
through its live config and agents as an Envoy stream.

Either way the policies with side effects have them (auditLog writes its record, rateLimit
takes a token). Prints the route and the rule that picked it, every entry's outcome, duration
and changes (credentials redacted), and the answer. Exit status: 0 it reached the upstream,
1 refused, 2 usage, config or connection error.

`)
		fs.PrintDefaults()
	}
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return ExitError, err
	}
	if *kernelAdmin != "" {
		if *kernelCfg != "" || len(agentCfgs) > 0 {
			return ExitError, errors.New("--kernel-admin explains on the running kernel: leave out --config and --agent-config")
		}
		req, resp, err := rf.request(pos)
		if err != nil {
			return ExitError, err
		}
		return explainRemote(ctx, *kernelAdmin, &rf, req, resp, stdout, stderr)
	}
	if *kernelCfg == "" || len(agentCfgs) == 0 {
		if *kernelAddr != "" {
			return ExitError, errNeedConfigs
		}
		return ExitError, fmt.Errorf("give the configs: --config kernel.yaml --agent-config agent.yaml")
	}
	req, resp, err := rf.request(pos)
	if err != nil {
		return ExitError, err
	}
	if *kernelAddr != "" {
		fmt.Fprintf(stderr, "policyctl: explaining offline on %s, not on the kernel at %s\n", *kernelCfg, *kernelAddr)
	}

	kc, _, err := kernel.LoadConfig(*kernelCfg)
	if err != nil {
		return ExitError, err
	}
	tr := &tracer{}
	clients, closeAll, err := loadAgents(agentCfgs, tr.add, stderr)
	defer closeAll()
	if err != nil {
		return ExitError, err
	}
	srv, err := kernel.NewOfflineServer(kc.PolicyKernel, clients)
	if err != nil {
		return ExitError, fmt.Errorf("%s: %w", *kernelCfg, err)
	}
	srv.SetSkipHook(tr.kernelSkipped)

	// The kernel serves ext_proc on an in-memory connection, and the Envoy-faithful client
	// plays the request through it.
	lis := bufconn.Listen(1 << 20)
	gs := grpc.NewServer()
	extprocv3.RegisterExternalProcessorServer(gs, srv)
	go func() { _ = gs.Serve(lis) }()
	defer gs.Stop()
	c, err := envoytest.Dial("passthrough:///offline-kernel", filterConfig(rf.messageTimeout),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return ExitError, err
	}
	defer c.Close()

	choice := srv.Snapshot().ExplainRoute(req.Attributes["xds.route_name"], req.Path)
	ctx, cancel := context.WithTimeout(ctx, rf.messageTimeout*4+5*time.Second)
	defer cancel()
	res, err := c.Do(ctx, req, upstreamOf(resp))
	if err != nil {
		return ExitError, fmt.Errorf("the request could not be played: %w", err)
	}
	x := newExplanation(choice, tr.withKernelSkips(choice))
	rep := newReport(req, resp, res, x)
	if err := rep.write(stdout, rf.json); err != nil {
		return ExitError, err
	}
	return rep.exitCode(), nil
}

// loadAgents loads every agent config into an executor of this process, by agent name; hook,
// when not nil, is told every chain entry's outcome. closeAll closes the executors.
func loadAgents(paths []string, hook func(agent.EntryTrace), stderr io.Writer) (clients map[string]kernel.AgentClient, closeAll func(), err error) {
	// On error too, closeAll closes the executors that were loaded.
	clients = map[string]kernel.AgentClient{}
	var execs []*agent.Executor
	closeAll = func() {
		for _, e := range execs {
			e.Close()
		}
	}
	var errs []error
	for _, path := range paths {
		exec, name, err := agent.LoadOffline(path, logging.New(stderr, "agent", zerolog.ErrorLevel))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		execs = append(execs, exec)
		if _, dup := clients[name]; dup {
			errs = append(errs, fmt.Errorf("%s: agent_core.name %q: another agent config has this name", path, name))
			continue
		}
		if hook != nil {
			exec.SetEntryHook(hook)
		}
		clients[name] = localAgent{exec}
	}
	// The agents that loaded are returned with the others' problems: validate checks the
	// kernel config with them all the same.
	return clients, closeAll, errors.Join(errs...)
}

// localAgent is a kernel.AgentClient that runs chains on an executor in this process.
type localAgent struct{ exec *agent.Executor }

func (l localAgent) Execute(ctx context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
	return l.exec.Execute(ctx, req), nil
}

func (l localAgent) GetAgentConfig(context.Context) (*agentv1.GetAgentConfigResponse, error) {
	return l.exec.Describe(), nil
}

func (l localAgent) Check(ctx context.Context) error { return l.exec.HealthCheck(ctx) }
func (l localAgent) Close() error                    { return nil }

// ValidateChains lets the kernel check the chain entries with the agent, as it does at start.
// The entries' static outcomes are left out: a running kernel applies them without calling the
// agent, with the same result, but explain shows every entry run, so every chain is called.
func (l localAgent) ValidateChains(_ context.Context, entries []*agentv1.ChainEntry) (*agentv1.ValidateChainsResponse, error) {
	facts := l.exec.EntryFacts(entries)
	for _, f := range facts {
		f.StaticOutcome = nil
	}
	return &agentv1.ValidateChainsResponse{Errors: l.exec.ValidateChains(entries), Facts: facts}, nil
}

// tracer collects the entries' traces of the one request being explained.
type tracer struct {
	mu     sync.Mutex
	traces []agent.EntryTrace
	// skipped are the phases whose chain the kernel skipped by its when conditions (when.go).
	skipped []agentv1.PolicyPhase
}

func (t *tracer) add(e agent.EntryTrace) {
	t.mu.Lock()
	t.traces = append(t.traces, e)
	t.mu.Unlock()
}

func (t *tracer) take() []agent.EntryTrace {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.traces
}

// newExplanation lays the traces over the route's chains. A chain the kernel splits around
// its first body reader runs in two agent calls, each numbering its entries from 0: a trace
// whose index does not grow starts the next call, after the entries of the previous one.
func newExplanation(c kernel.RouteChoice, traces []agent.EntryTrace) *Explanation {
	x := &Explanation{Route: c.Route, Rule: c.Rule, Agent: c.Agent, Invalid: c.Invalid}
	x.red = newRedactor(c.CredentialHeaders())
	x.Request = x.lay(c.Request, traces, agentv1.PolicyPhase_REQUEST)
	x.Response = x.lay(c.Response, traces, agentv1.PolicyPhase_RESPONSE)
	return x
}

func (x *Explanation) lay(chain []*agentv1.Policy, traces []agent.EntryTrace, phase agentv1.PolicyPhase) []Entry {
	out := make([]Entry, len(chain))
	for i, p := range chain {
		out[i] = Entry{Policy: p.GetName(), Shadow: p.GetShadow(), OnFailure: p.GetOnFailure(), When: p.GetWhen(), Outcome: "not run"}
	}
	base, last, lastPos := 0, -1, -1
	for _, t := range traces {
		if t.Phase != phase {
			continue
		}
		if t.Index <= last {
			base = lastPos + 1
		}
		pos := base + t.Index
		last, lastPos = t.Index, pos
		if pos >= len(out) || out[pos].Policy != t.Policy {
			continue // not this route's chain: cannot happen with one request
		}
		e := &out[pos]
		e.Outcome = t.Outcome
		e.DurationUS = float64(t.Duration.Nanoseconds()) / 1e3
		e.Message = t.Message
		if t.Err != nil {
			e.Error = t.Err.Error()
		}
		e.Changes = x.changes(t.Instructions)
	}
	return out
}

// changes describes an entry's instructions, credential values redacted.
func (x *Explanation) changes(ins []*agentv1.Instruction) []string {
	var out []string
	for _, in := range ins {
		switch in.GetType() {
		case agentv1.InstructionType_SET_HEADER:
			h := in.GetHeader()
			verb := "set header"
			if h.GetAppend() {
				verb = "append header"
			}
			out = append(out, fmt.Sprintf("%s %s: %s", verb, strings.ToLower(h.GetKey()), x.red.value(h.GetKey(), h.GetValue())))
		case agentv1.InstructionType_REMOVE_HEADER:
			out = append(out, "remove header "+strings.ToLower(in.GetHeader().GetKey()))
		case agentv1.InstructionType_SET_BODY:
			out = append(out, fmt.Sprintf("set body (%d bytes)", len(in.GetBody().GetBody())))
		case agentv1.InstructionType_SET_STATE:
			s := in.GetState()
			out = append(out, fmt.Sprintf("set state %s = %s", s.GetKey(), x.red.value(s.GetKey(), s.GetValue())))
		case agentv1.InstructionType_IMMEDIATE_RESPONSE:
			out = append(out, fmt.Sprintf("answer %d", in.GetImmediateResponse().GetStatusCode()))
		}
	}
	return out
}

func (x *Explanation) text(b *strings.Builder) {
	switch x.Rule {
	case "none":
		b.WriteString("route: none (no route matches and there is no default_policy): the kernel lets the request pass unchanged\n")
	default:
		fmt.Fprintf(b, "route: %s (picked by %s", x.Route, x.Rule)
		switch x.Rule {
		case "attribute":
			b.WriteString(": the xds.route_name attribute")
		case "path prefix":
			b.WriteString(": the longest route name that prefixes the path")
		case "default":
			b.WriteString(": no route name nor path prefix matched")
		}
		fmt.Fprintf(b, "), agent %s\n", x.Agent)
	}
	if x.Invalid != "" {
		fmt.Fprintf(b, "the route is refused: %s\n", x.Invalid)
	}
	if x.Note != "" {
		fmt.Fprintf(b, "note: %s\n", x.Note)
	}
	for _, ph := range []struct {
		name    string
		entries []Entry
	}{{"request", x.Request}, {"response", x.Response}} {
		if len(ph.entries) == 0 {
			fmt.Fprintf(b, "%s chain: empty\n", ph.name)
			continue
		}
		fmt.Fprintf(b, "%s chain:\n", ph.name)
		for i, e := range ph.entries {
			name := e.Policy
			if e.Shadow {
				name += " (shadow)"
			}
			if e.OnFailure != "" {
				name += " (on_failure " + e.OnFailure + ")"
			}
			fmt.Fprintf(b, "  %d. %-28s %s", i+1, name, e.Outcome)
			if e.Outcome != "not run" && e.Outcome != "skipped" && e.Outcome != noTraces {
				fmt.Fprintf(b, " (%.0fµs)", e.DurationUS)
			}
			b.WriteString("\n")
			if e.When != "" {
				fmt.Fprintf(b, "       when: %s\n", e.When)
			}
			for _, ch := range e.Changes {
				fmt.Fprintf(b, "       %s\n", ch)
			}
			if e.Message != "" {
				fmt.Fprintf(b, "       message: %s\n", e.Message)
			}
			if e.Error != "" {
				fmt.Fprintf(b, "       error: %s\n", e.Error)
			}
		}
	}
	b.WriteString("\n")
}
