package policyctl

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/redact"
)

// Header is one header as printed.
type Header struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// Mutation is one header change the filter made: op is added, changed or removed.
type Mutation struct {
	Op    string `json:"op"`
	Name  string `json:"name"`
	Value string `json:"value,omitempty"`
}

// Upstream is the request as the upstream received it.
type Upstream struct {
	Method    string     `json:"method"`
	Path      string     `json:"path"`
	Authority string     `json:"authority"`
	Headers   []Header   `json:"headers"`
	Body      string     `json:"body"`
	Mutations []Mutation `json:"mutations"`
}

// Answer is the response as the client received it.
type Answer struct {
	Status int `json:"status"`
	// LocalReply is true when Envoy answered itself (a denial, or a failure), false when the
	// answer came from the upstream.
	LocalReply bool       `json:"local_reply"`
	Details    string     `json:"details"`
	Headers    []Header   `json:"headers"`
	Body       string     `json:"body"`
	Mutations  []Mutation `json:"mutations,omitempty"`
}

// Report is what policyctl prints, as JSON with --json.
type Report struct {
	// Outcome is "upstream" (the request reached the upstream) or "refused".
	Outcome  string       `json:"outcome"`
	Upstream *Upstream    `json:"upstream,omitempty"`
	Response Answer       `json:"response"`
	Explain  *Explanation `json:"explain,omitempty"`

	red *redactor
}

func newReport(req *envoytest.Request, upResp *envoytest.Response, res *envoytest.Result, x *Explanation) *Report {
	red := newRedactor(nil)
	if x != nil {
		red = x.red
	}
	r := &Report{Outcome: "refused", Explain: x, red: red}
	if f := res.Forwarded; f != nil {
		r.Outcome = "upstream"
		r.Upstream = &Upstream{Method: f.Method, Path: red.path(f.Path), Authority: f.Authority, Headers: red.headers(f.Headers), Body: string(f.Body),
			Mutations: red.diff(withoutHost(req.Headers), f.Headers)}
	}
	r.Response = Answer{Status: res.Status, LocalReply: res.LocalReply, Details: res.Details, Headers: red.headers(res.Headers), Body: string(res.Body)}
	if !res.LocalReply && upResp != nil {
		r.Response.Mutations = red.diff(upResp.Headers, res.Headers)
	}
	return r
}

func (r *Report) exitCode() int {
	if r.Outcome == "upstream" {
		return ExitUpstream
	}
	return ExitRefused
}

func (r *Report) write(w io.Writer, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	}
	var b strings.Builder
	if r.Explain != nil {
		r.Explain.text(&b)
	}
	if u := r.Upstream; u != nil {
		fmt.Fprintf(&b, "Envoy continues upstream; the upstream receives:\n  %s %s (authority %s)\n", u.Method, u.Path, u.Authority)
		writeHeaders(&b, u.Headers)
		writeBody(&b, u.Body)
		writeMutations(&b, "the filter's changes to the request headers", u.Mutations)
		fmt.Fprintf(&b, "the client receives (from the upstream):\n  %d\n", r.Response.Status)
	} else {
		fmt.Fprintf(&b, "Envoy refuses the request: local reply %d (%s)\n", r.Response.Status, r.Response.Details)
	}
	writeHeaders(&b, r.Response.Headers)
	writeBody(&b, r.Response.Body)
	if r.Upstream != nil {
		writeMutations(&b, "the filter's changes to the response headers", r.Response.Mutations)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func writeHeaders(b *strings.Builder, hs []Header) {
	for _, h := range hs {
		fmt.Fprintf(b, "  %s: %s\n", h.Name, h.Value)
	}
}

func writeBody(b *strings.Builder, body string) {
	if body != "" {
		fmt.Fprintf(b, "\n  %s\n", strings.ReplaceAll(strings.TrimRight(body, "\n"), "\n", "\n  "))
	}
}

func writeMutations(b *strings.Builder, title string, ms []Mutation) {
	if len(ms) == 0 {
		fmt.Fprintf(b, "  (%s: none)\n", title)
		return
	}
	fmt.Fprintf(b, "  %s:\n", title)
	for _, m := range ms {
		switch m.Op {
		case "removed":
			fmt.Fprintf(b, "    - %s\n", m.Name)
		case "added":
			fmt.Fprintf(b, "    + %s: %s\n", m.Name, m.Value)
		default:
			fmt.Fprintf(b, "    ~ %s: %s\n", m.Name, m.Value)
		}
	}
}

// redactor hides the values of credential headers (internal/redact: those the audit log
// redacts, and the headers the configured policies read credentials from).
type redactor struct{ *redact.Redactor }

func newRedactor(extra []string) *redactor { return &redactor{redact.New(extra)} }

func (r *redactor) path(p string) string        { return r.Path(p) }
func (r *redactor) value(name, v string) string { return r.Value(name, v) }

func (r *redactor) headers(hs [][2]string) []Header {
	out := make([]Header, 0, len(hs))
	for _, h := range hs {
		out = append(out, Header{Name: h[0], Value: r.value(h[0], h[1])})
	}
	return out
}

// diff lists the header changes from before to after (names lowercase; a repeated header
// compares as its values joined).
func (r *redactor) diff(before, after [][2]string) []Mutation {
	b, a := joined(before), joined(after)
	var out []Mutation
	for _, name := range names(after) {
		old, had := b[name]
		switch {
		case !had:
			out = append(out, Mutation{Op: "added", Name: name, Value: r.value(name, a[name])})
		case old != a[name]:
			out = append(out, Mutation{Op: "changed", Name: name, Value: r.value(name, a[name])})
		}
	}
	for _, name := range names(before) {
		if _, ok := a[name]; !ok {
			out = append(out, Mutation{Op: "removed", Name: name})
		}
	}
	return out
}

// names lists the header names of hs, lowercase, each once, in order.
func names(hs [][2]string) []string {
	var out []string
	for _, h := range hs {
		if n := strings.ToLower(h[0]); !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}

// withoutHost drops the host header, which Envoy turns into the authority.
func withoutHost(hs [][2]string) [][2]string {
	return slices.DeleteFunc(slices.Clone(hs), func(h [2]string) bool { return strings.EqualFold(h[0], "host") })
}

func joined(hs [][2]string) map[string]string {
	m := make(map[string]string, len(hs))
	for _, h := range hs {
		k := strings.ToLower(h[0])
		if v, ok := m[k]; ok {
			m[k] = v + "," + h[1]
		} else {
			m[k] = h[1]
		}
	}
	return m
}
