package kernel

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/headers"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/redact"
)

// adminRoutes are the kernel's own handlers of the admin listener, besides /config and pprof.
func (k *Kernel) adminRoutes() map[string]http.Handler {
	return map[string]http.Handler{"/debug/explain": &explainHandler{s: k.server, log: k.log, sem: make(chan struct{}, maxExplains)}}
}

// maxExplains is how many /debug/explain calls run at once; more are answered 429.
const maxExplains = 4

// ExplainInput is the body of POST /debug/explain: one HTTP request as Envoy would send it to
// the kernel, and the answer of the upstream.
type ExplainInput struct {
	Method string `json:"method"`
	Path   string `json:"path"`
	// Headers are the request's headers, [name, value] pairs; host sets the authority.
	Headers [][2]string `json:"headers"`
	Body    string      `json:"body"`
	// Attributes are Envoy's request attributes: xds.route_name, source.address.
	Attributes map[string]string `json:"attributes"`
	Upstream   struct {
		Status  int         `json:"status"`
		Headers [][2]string `json:"headers"`
		Body    string      `json:"body"`
	} `json:"upstream"`
	// MessageTimeoutMS is Envoy's message_timeout; 0: the kernel's server.message_timeout_ms.
	MessageTimeoutMS int `json:"message_timeout_ms"`
}

// ExplainReport is the answer of /debug/explain, credentials redacted: the route and the rule
// that picked it, the chains, what each entry did as the agent traced it, and what Envoy
// would have done.
type ExplainReport struct {
	Route         string         `json:"route"`
	Rule          string         `json:"rule"`
	Agent         string         `json:"agent,omitempty"`
	Invalid       string         `json:"invalid,omitempty"`
	RequestChain  []ExplainEntry `json:"request_chain"`
	ResponseChain []ExplainEntry `json:"response_chain"`
	// AgentCalls counts the agent calls the request made; Traces are the entries they ran. An
	// agent that predates PolicyRequest.explain answers calls without traces.
	AgentCalls int            `json:"agent_calls"`
	Traces     []ExplainTrace `json:"traces"`
	// KernelSkipped are the phases (request, response) whose chain the kernel let go without
	// calling the agent, every entry's when condition being false.
	KernelSkipped []string      `json:"kernel_skipped,omitempty"`
	Result        ExplainResult `json:"result"`
}

// ExplainEntry is one chain entry of the route (its metadata left out: it may hold secrets).
type ExplainEntry struct {
	Policy    string `json:"policy"`
	Shadow    bool   `json:"shadow,omitempty"`
	OnFailure string `json:"on_failure,omitempty"`
	When      string `json:"when,omitempty"`
}

// ExplainTrace is one entry's trace: Phase is request or response, Entry the agent's
// EntryTrace in protobuf JSON, its header and state values redacted.
type ExplainTrace struct {
	Phase string          `json:"phase"`
	Entry json.RawMessage `json:"entry"`
}

// ExplainResult is what Envoy would have done.
type ExplainResult struct {
	// Forwarded is the request as the upstream receives it; absent when it was refused.
	Forwarded *ExplainForwarded `json:"forwarded,omitempty"`
	// Status, Headers and Body are what the client receives.
	Status     int         `json:"status"`
	LocalReply bool        `json:"local_reply"`
	Details    string      `json:"details"`
	Headers    [][2]string `json:"headers"`
	Body       string      `json:"body"`
}

// ExplainForwarded is the request as the upstream receives it.
type ExplainForwarded struct {
	Method    string      `json:"method"`
	Path      string      `json:"path"`
	Authority string      `json:"authority"`
	Headers   [][2]string `json:"headers"`
	Body      string      `json:"body"`
}

// explainTrace collects the agent's entry traces of one explained request, by phase.
type explainTrace struct {
	mu     sync.Mutex
	calls  int
	traces []phaseTrace
	// skipped are the phases whose chain the kernel skipped by its when conditions.
	skipped []agentv1.PolicyPhase
}

func (x *explainTrace) skip(phase agentv1.PolicyPhase) {
	x.mu.Lock()
	x.skipped = append(x.skipped, phase)
	x.mu.Unlock()
}

type phaseTrace struct {
	phase agentv1.PolicyPhase
	entry *agentv1.EntryTrace
}

func (x *explainTrace) add(phase agentv1.PolicyPhase, resp *agentv1.PolicyResponse) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.calls++
	for _, e := range resp.GetEntries() {
		x.traces = append(x.traces, phaseTrace{phase, proto.Clone(e).(*agentv1.EntryTrace)})
	}
}

// explainProcessor serves the ext_proc stream of one explained request: the live server, its
// snapshot and its agents, with the entry traces collected.
type explainProcessor struct {
	extprocv3.UnimplementedExternalProcessorServer
	s *Server
	x *explainTrace
}

func (p explainProcessor) Process(ps extprocv3.ExternalProcessor_ProcessServer) error {
	return p.s.process(ps, p.x)
}

// maxExplainInput bounds the JSON of /debug/explain besides the two bodies it carries.
const maxExplainInput = 1 << 20

// ParseExplainInput reads and checks the body of /debug/explain.
func ParseExplainInput(data []byte) (*ExplainInput, error) {
	in := &ExplainInput{}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(in); err != nil {
		return nil, fmt.Errorf("the request must be JSON: %w", err)
	}
	if dec.More() {
		return nil, errors.New("the request must be one JSON object")
	}
	if in.Method == "" {
		in.Method = "GET"
	}
	if strings.ContainsAny(in.Method, " \t\r\n:") || headers.ValidValue(in.Method) != nil {
		return nil, fmt.Errorf("method %q: not an HTTP method", in.Method)
	}
	if !strings.HasPrefix(in.Path, "/") || headers.ValidValue(in.Path) != nil {
		return nil, fmt.Errorf("path %q: it must start with / and hold no control characters", in.Path)
	}
	for _, list := range []struct {
		name string
		hs   [][2]string
	}{{"headers", in.Headers}, {"upstream.headers", in.Upstream.Headers}} {
		for i, h := range list.hs {
			if strings.HasPrefix(h[0], ":") {
				return nil, fmt.Errorf("%s[%d]: %q: pseudo-headers come from method, path and the host header", list.name, i, h[0])
			}
			if err := headers.ValidName(strings.ToLower(h[0])); err != nil {
				return nil, fmt.Errorf("%s[%d]: %q: %v", list.name, i, h[0], err)
			}
			if err := headers.ValidValue(h[1]); err != nil {
				return nil, fmt.Errorf("%s[%d]: %q: %v", list.name, i, h[0], err)
			}
		}
	}
	for k, v := range in.Attributes {
		if k != "xds.route_name" && k != "source.address" {
			return nil, fmt.Errorf("attributes: %q: only xds.route_name and source.address are sent", k)
		}
		if headers.ValidValue(v) != nil {
			return nil, fmt.Errorf("attributes: %q: control characters in the value", k)
		}
	}
	if in.Upstream.Status == 0 {
		in.Upstream.Status = 200
	}
	if in.Upstream.Status < 100 || in.Upstream.Status > 599 {
		return nil, fmt.Errorf("upstream.status %d: not an HTTP status", in.Upstream.Status)
	}
	if in.MessageTimeoutMS < 0 || in.MessageTimeoutMS > 60000 {
		return nil, fmt.Errorf("message_timeout_ms %d: must be from 0 to 60000", in.MessageTimeoutMS)
	}
	return in, nil
}

// explainHandler is POST /debug/explain.
type explainHandler struct {
	s   *Server
	log *logging.Logger
	sem chan struct{}
}

func (h *explainHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", "POST")
		writeAdminJSON(w, http.StatusMethodNotAllowed, map[string]string{"error": "POST the request as JSON (policyctl explain --kernel-admin)"})
		return
	}
	snap := h.s.Snapshot()
	if snap == nil {
		writeAdminJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "no config loaded"})
		return
	}
	select {
	case h.sem <- struct{}{}:
		defer func() { <-h.sem }()
	default:
		writeAdminJSON(w, http.StatusTooManyRequests, map[string]string{"error": fmt.Sprintf("%d explain calls are running; try again", maxExplains)})
		return
	}
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, int64(maxExplainInput+2*snap.Config.Server.MaxBodySizeBytes)))
	if err != nil {
		writeAdminJSON(w, http.StatusRequestEntityTooLarge, map[string]string{"error": err.Error()})
		return
	}
	in, err := ParseExplainInput(data)
	if err != nil {
		writeAdminJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
		return
	}
	rep, err := h.s.Explain(r.Context(), in)
	if err != nil {
		writeAdminJSON(w, http.StatusInternalServerError, map[string]string{"error": err.Error()})
		return
	}
	h.log.Audit(zerolog.InfoLevel).Str("route", rep.Route).Str("path", redact.New(nil).Path(in.Path)).Int("status", rep.Result.Status).
		Int("agent_calls", rep.AgentCalls).Int("entries_traced", len(rep.Traces)).Msg("request explained on the admin listener")
	w.Header().Set("Cache-Control", "no-store")
	writeAdminJSON(w, http.StatusOK, rep)
}

func writeAdminJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// Explain plays one request through the live snapshot and agents exactly as an Envoy stream
// would (the project's ext_proc filter config, on an in-memory connection) and returns its
// trace, credentials redacted. The request is a real one for the policies: rateLimit counts
// it, auditLog records it, and the kernel's metrics count it.
func (s *Server) Explain(ctx context.Context, in *ExplainInput) (*ExplainReport, error) {
	snap := s.Snapshot()
	if snap == nil {
		return nil, errors.New("no config loaded")
	}
	timeout := time.Duration(in.MessageTimeoutMS) * time.Millisecond
	if timeout == 0 {
		timeout = time.Duration(snap.Config.Server.MessageTimeoutMS) * time.Millisecond
	}
	choice := snap.ExplainRoute(in.Attributes["xds.route_name"], in.Path)

	x := &explainTrace{}
	lis := bufconn.Listen(1 << 20)
	limit := grpcMsgLimit(snap.Config)
	gs := grpc.NewServer(grpc.MaxRecvMsgSize(limit), grpc.MaxSendMsgSize(limit))
	extprocv3.RegisterExternalProcessorServer(gs, explainProcessor{s: s, x: x})
	go func() { _ = gs.Serve(lis) }()
	defer gs.Stop()
	c, err := envoytest.Dial("passthrough:///explain", envoytest.FilterConfig{
		AllowModeOverride: true,
		RequestAttributes: []string{"xds.route_name", "source.address"},
		MessageTimeout:    timeout,
	},
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(limit), grpc.MaxCallSendMsgSize(limit)))
	if err != nil {
		return nil, err
	}
	defer c.Close()
	req := &envoytest.Request{Method: in.Method, Path: in.Path, Headers: in.Headers, Body: []byte(in.Body), Attributes: in.Attributes}
	up := &envoytest.Response{Status: in.Upstream.Status, Headers: in.Upstream.Headers, Body: []byte(in.Upstream.Body)}
	ctx, cancel := context.WithTimeout(ctx, 4*timeout+5*time.Second)
	defer cancel()
	res, err := c.Do(ctx, req, func(*envoytest.Forwarded) *envoytest.Response { return up })
	if err != nil {
		return nil, fmt.Errorf("the request could not be played: %w", err)
	}

	red := redact.New(choice.CredentialHeaders())
	rep := &ExplainReport{Route: choice.Route, Rule: choice.Rule, Agent: choice.Agent, Invalid: choice.Invalid,
		RequestChain: explainEntries(choice.Request), ResponseChain: explainEntries(choice.Response), Traces: []ExplainTrace{}}
	x.mu.Lock()
	rep.AgentCalls = x.calls
	traces := x.traces
	for _, ph := range x.skipped {
		rep.KernelSkipped = append(rep.KernelSkipped, strings.ToLower(ph.String()))
	}
	x.mu.Unlock()
	for _, t := range traces {
		redactTrace(red, t.entry)
		b, err := protojson.Marshal(t.entry)
		if err != nil {
			return nil, err
		}
		rep.Traces = append(rep.Traces, ExplainTrace{Phase: strings.ToLower(t.phase.String()), Entry: b})
	}
	rep.Result = ExplainResult{Status: res.Status, LocalReply: res.LocalReply, Details: res.Details,
		Headers: red.Headers(res.Headers), Body: string(res.Body)}
	if f := res.Forwarded; f != nil {
		rep.Result.Forwarded = &ExplainForwarded{Method: f.Method, Path: red.Path(f.Path), Authority: f.Authority,
			Headers: red.Headers(f.Headers), Body: string(f.Body)}
	}
	return rep, nil
}

func explainEntries(chain []*agentv1.Policy) []ExplainEntry {
	out := make([]ExplainEntry, 0, len(chain))
	for _, p := range chain {
		out = append(out, ExplainEntry{Policy: p.GetName(), Shadow: p.GetShadow(), OnFailure: p.GetOnFailure(), When: p.GetWhen()})
	}
	return out
}

// CredentialHeaders are the headers the route's policies read credentials from, by their
// settings (apiKeyAuth's header_name, jwtValidation's header), besides redact's lists: an
// explanation hides their values.
func (c RouteChoice) CredentialHeaders() []string {
	var out []string
	for _, chain := range [][]*agentv1.Policy{c.Request, c.Response} {
		for _, p := range chain {
			for _, k := range []string{"header_name", "header"} {
				if v := p.GetMetadata()[k]; v != "" {
					out = append(out, v)
				}
			}
		}
	}
	return out
}

// redactTrace hides the credential values of an entry's instructions: header and state
// values under credential names, and those of an immediate response's headers.
func redactTrace(red *redact.Redactor, t *agentv1.EntryTrace) {
	for _, in := range t.GetInstructions() {
		if h := in.GetHeader(); h != nil {
			h.Value = red.Value(h.GetKey(), h.GetValue())
		}
		if st := in.GetState(); st != nil {
			st.Value = red.Value(st.GetKey(), st.GetValue())
		}
		if ir := in.GetImmediateResponse(); ir != nil {
			for k, v := range ir.GetHeaders() {
				ir.Headers[k] = red.Value(k, v)
			}
		}
	}
}
