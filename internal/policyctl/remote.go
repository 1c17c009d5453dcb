package policyctl

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/policy-engine/policy-engine/agent"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/kernel"
)

// noTraces is the outcome of the entries of a route whose agent answered without traces.
const noTraces = "unknown"

// explainRemote asks a running kernel's admin listener to play the request (POST
// /debug/explain) and prints its answer as the offline explain prints its own.
func explainRemote(ctx context.Context, base string, rf *requestFlags, req *envoytest.Request, resp *envoytest.Response, stdout, stderr io.Writer) (int, error) {
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return ExitError, fmt.Errorf("--kernel-admin %q: give the admin listener's URL, e.g. http://127.0.0.1:9190", base)
	}
	in := kernel.ExplainInput{Method: req.Method, Path: req.Path, Headers: req.Headers, Body: string(req.Body), Attributes: req.Attributes,
		MessageTimeoutMS: int(rf.messageTimeout.Milliseconds())}
	in.Upstream.Status, in.Upstream.Headers, in.Upstream.Body = resp.Status, resp.Headers, string(resp.Body)
	body, err := json.Marshal(in)
	if err != nil {
		return ExitError, err
	}
	ctx, cancel := context.WithTimeout(ctx, rf.messageTimeout*4+10*time.Second)
	defer cancel()
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimRight(base, "/")+"/debug/explain", bytes.NewReader(body))
	if err != nil {
		return ExitError, err
	}
	hr.Header.Set("Content-Type", "application/json")
	hresp, err := http.DefaultClient.Do(hr)
	if err != nil {
		return ExitError, fmt.Errorf("cannot reach the kernel's admin listener at %s (loopback by default: in Kubernetes, kubectl port-forward first): %w", base, err)
	}
	defer hresp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(hresp.Body, 64<<20))
	if err != nil {
		return ExitError, fmt.Errorf("reading the kernel's answer: %w", err)
	}
	if hresp.StatusCode == http.StatusNotFound {
		return ExitError, fmt.Errorf("%s has no /debug/explain: is it the kernel's admin listener (observability.admin_port, default 9190), of a kernel that explains requests?", base)
	}
	if hresp.StatusCode != http.StatusOK {
		var e struct{ Error string }
		if json.Unmarshal(data, &e) == nil && e.Error != "" {
			return ExitError, fmt.Errorf("the kernel refused: %d: %s", hresp.StatusCode, e.Error)
		}
		return ExitError, fmt.Errorf("the kernel answered %d: %.200s", hresp.StatusCode, data)
	}
	var rep kernel.ExplainReport
	if err := json.Unmarshal(data, &rep); err != nil {
		return ExitError, fmt.Errorf("the kernel's answer is not an explain report: %w", err)
	}
	choice := kernel.RouteChoice{Route: rep.Route, Rule: rep.Rule, Agent: rep.Agent, Invalid: rep.Invalid,
		Request: policies(rep.RequestChain), Response: policies(rep.ResponseChain)}
	var traces []agent.EntryTrace
	for i, t := range rep.Traces {
		var et agentv1.EntryTrace
		if err := protojson.Unmarshal(t.Entry, &et); err != nil {
			return ExitError, fmt.Errorf("the kernel's answer: traces[%d]: %w", i, err)
		}
		phase := agentv1.PolicyPhase_REQUEST
		if t.Phase == "response" {
			phase = agentv1.PolicyPhase_RESPONSE
		}
		traces = append(traces, agent.TraceOf(phase, &et))
	}
	var skipped []agentv1.PolicyPhase
	for _, ph := range rep.KernelSkipped {
		if ph == "response" {
			skipped = append(skipped, agentv1.PolicyPhase_RESPONSE)
		} else {
			skipped = append(skipped, agentv1.PolicyPhase_REQUEST)
		}
	}
	x := newExplanation(choice, kernelSkips(choice, skipped, traces))
	if rep.AgentCalls > 0 && len(rep.Traces) == 0 && len(rep.KernelSkipped) == 0 {
		// An agent that predates PolicyRequest.explain runs the chain without tracing it.
		x.Note = "the agent answered without per-entry traces (it predates the explain field of its API): the entries' outcomes are unknown, the answer below is the chain's"
		for _, list := range [][]Entry{x.Request, x.Response} {
			for i := range list {
				list[i].Outcome = noTraces
			}
		}
	}
	res := &envoytest.Result{Status: rep.Result.Status, LocalReply: rep.Result.LocalReply, Details: rep.Result.Details,
		Headers: rep.Result.Headers, Body: []byte(rep.Result.Body)}
	if f := rep.Result.Forwarded; f != nil {
		res.Forwarded = &envoytest.Forwarded{Method: f.Method, Path: f.Path, Authority: f.Authority, Headers: f.Headers, Body: []byte(f.Body)}
	}
	// The kernel redacted what it sent: the request's own headers are redacted the same way
	// before they are compared with what the upstream received.
	shown := *req
	shown.Headers = x.red.Headers(req.Headers)
	rep2 := newReport(&shown, resp, res, x)
	if err := rep2.write(stdout, rf.json); err != nil {
		return ExitError, err
	}
	return rep2.exitCode(), nil
}

func policies(entries []kernel.ExplainEntry) []*agentv1.Policy {
	out := make([]*agentv1.Policy, 0, len(entries))
	for _, e := range entries {
		out = append(out, &agentv1.Policy{Name: e.Policy, Shadow: e.Shadow, OnFailure: e.OnFailure, When: e.When})
	}
	return out
}
