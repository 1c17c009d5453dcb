// Package policyctl is the policyctl command: it plays one HTTP request through the policy
// kernel exactly as Envoy v1.36's ext_proc filter would (internal/envoytest), without an Envoy.
//
//	policyctl check   sends it to a running kernel and prints what Envoy would do.
//	policyctl explain runs it offline on the kernel and agent configs, in its own process, and
//	                  prints why: the route and the rule that picked it, every chain entry's
//	                  outcome, duration and changes, and the answer.
//	policyctl validate checks the kernel config as policy-kernel --validate does, with the
//	                  agents' policies in its own process: no socket, no wait.
//
// Exit codes: 0 the request reached the upstream, 1 it was refused (Envoy answered it
// locally), 2 a usage, config or connection error.
package policyctl

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/headers"
)

// Exit codes.
const (
	ExitUpstream = 0 // the request reached the upstream
	ExitRefused  = 1 // Envoy answered it locally: denied, or failed closed
	ExitError    = 2 // usage, config or connection error
)

const usage = `usage:
  policyctl check   [flags] [METHOD] PATH    send one request through a running kernel
  policyctl explain [flags] [METHOD] PATH    run it offline on the configs and say why
  policyctl validate --config K --agent-config A
                                             check the configs offline, as policy-kernel --validate

Exit status: 0 the request reached the upstream, 1 it was refused, 2 a usage, config or
connection error; validate: 0 valid, 1 invalid, 2 usage error. "policyctl COMMAND -h" lists
a command's flags.
`

// Main runs policyctl with args (without the program name) and returns the exit code.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return ExitError
	}
	var err error
	code := ExitError
	switch args[0] {
	case "check":
		code, err = check(ctx, args[1:], stdout, stderr)
	case "explain":
		code, err = explain(ctx, args[1:], stdout, stderr)
	case "validate":
		code, err = validate(ctx, args[1:], stdout, stderr)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		err = fmt.Errorf("unknown command %q", args[0])
		fmt.Fprint(stderr, usage)
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "policyctl: %v\n", err)
		return ExitError
	}
	return code
}

// listFlag is a repeatable flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ", ") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

// requestFlags describe the request and the upstream's answer; check and explain share them.
type requestFlags struct {
	headers         listFlag
	route           string
	body            string
	source          string
	upstreamStatus  int
	upstreamHeaders listFlag
	upstreamBody    string
	messageTimeout  time.Duration
	json            bool
}

func (r *requestFlags) register(fs *flag.FlagSet) {
	fs.Var(&r.headers, "H", "a request header, `Name: value` (repeatable); Host sets the authority")
	fs.StringVar(&r.route, "route", "", "the route name Envoy sends as the xds.route_name attribute (none: the kernel picks by path)")
	fs.StringVar(&r.body, "body", "", "the request body: `@file` (@- is standard input) or the text itself")
	fs.StringVar(&r.source, "source-address", "127.0.0.1:50000", "the client's address, sent as the source.address attribute")
	fs.IntVar(&r.upstreamStatus, "upstream-status", 200, "the status the upstream answers")
	fs.Var(&r.upstreamHeaders, "upstream-header", "a header of the upstream's answer, `Name: value` (repeatable; default content-type: application/json)")
	fs.StringVar(&r.upstreamBody, "upstream-body", "{}", "the upstream's body: `@file` or the text itself")
	fs.DurationVar(&r.messageTimeout, "message-timeout", 200*time.Millisecond, "Envoy's ext_proc message_timeout")
	fs.BoolVar(&r.json, "json", false, "print JSON instead of text")
}

// parseInterleaved parses flags that may come before, between or after the positional
// arguments, and returns those.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		if args[0] == "--" {
			return append(pos, args[1:]...), nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

// request builds the downstream request and the upstream from the flags and the positional
// arguments ([METHOD] PATH).
func (r *requestFlags) request(pos []string) (*envoytest.Request, *envoytest.Response, error) {
	var method, path string
	switch len(pos) {
	case 1:
		method, path = "GET", pos[0]
	case 2:
		method, path = pos[0], pos[1]
	default:
		return nil, nil, errors.New("give the request as [METHOD] PATH, e.g. GET /api/v1/users")
	}
	if method == "" || strings.ContainsAny(method, " \t\r\n:") {
		return nil, nil, fmt.Errorf("invalid method %q", method)
	}
	if !strings.HasPrefix(path, "/") {
		return nil, nil, fmt.Errorf("invalid path %q: it must start with /", path)
	}
	req := &envoytest.Request{Method: method, Path: path, Attributes: map[string]string{}}
	hs, err := parseHeaders("-H", r.headers)
	if err != nil {
		return nil, nil, err
	}
	req.Headers = hs
	if r.route != "" {
		req.Attributes["xds.route_name"] = r.route
	}
	if r.source != "" {
		req.Attributes["source.address"] = r.source
	}
	if req.Body, err = readValue("--body", r.body); err != nil {
		return nil, nil, err
	}
	if len(req.Body) > 0 && !hasHeader(req.Headers, "content-length") {
		req.Headers = append(req.Headers, [2]string{"content-length", strconv.Itoa(len(req.Body))})
	}
	if r.upstreamStatus < 100 || r.upstreamStatus > 599 {
		return nil, nil, fmt.Errorf("--upstream-status %d: not an HTTP status", r.upstreamStatus)
	}
	resp := &envoytest.Response{Status: r.upstreamStatus}
	if resp.Headers, err = parseHeaders("--upstream-header", r.upstreamHeaders); err != nil {
		return nil, nil, err
	}
	if len(r.upstreamHeaders) == 0 {
		resp.Headers = [][2]string{{"content-type", "application/json"}}
	}
	if resp.Body, err = readValue("--upstream-body", r.upstreamBody); err != nil {
		return nil, nil, err
	}
	if !hasHeader(resp.Headers, "content-length") {
		resp.Headers = append(resp.Headers, [2]string{"content-length", strconv.Itoa(len(resp.Body))})
	}
	return req, resp, nil
}

// parseHeaders parses "Name: value" flags into lowercase pairs.
func parseHeaders(flagName string, list []string) ([][2]string, error) {
	var out [][2]string
	for _, h := range list {
		name, value, ok := strings.Cut(h, ":")
		name = strings.TrimSpace(name)
		if !ok || name == "" {
			return nil, fmt.Errorf("%s %q: give a header as \"Name: value\"", flagName, h)
		}
		name = strings.ToLower(name)
		value = strings.TrimSpace(value)
		if err := headers.ValidName(name); err != nil {
			return nil, fmt.Errorf("%s %q: %v", flagName, name, err)
		}
		if err := headers.ValidValue(value); err != nil {
			return nil, fmt.Errorf("%s %q: %v", flagName, name, err)
		}
		out = append(out, [2]string{name, value})
	}
	return out, nil
}

func hasHeader(hs [][2]string, name string) bool {
	for _, h := range hs {
		if h[0] == name {
			return true
		}
	}
	return false
}

// readValue reads a @file value (@- is standard input), or returns the text itself.
func readValue(flagName, v string) ([]byte, error) {
	if !strings.HasPrefix(v, "@") {
		return []byte(v), nil
	}
	var (
		b   []byte
		err error
	)
	if v == "@-" {
		b, err = io.ReadAll(os.Stdin)
	} else {
		b, err = os.ReadFile(v[1:])
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flagName, err)
	}
	return b, nil
}

// upstreamOf answers every request with resp.
func upstreamOf(resp *envoytest.Response) envoytest.Upstream {
	return func(*envoytest.Forwarded) *envoytest.Response { return resp }
}

// filterConfig is the ext_proc filter of the project's Envoy config (deploy/envoy/envoy.yaml).
func filterConfig(timeout time.Duration) envoytest.FilterConfig {
	return envoytest.FilterConfig{
		AllowModeOverride: true,
		RequestAttributes: []string{"xds.route_name", "source.address"},
		MessageTimeout:    timeout,
	}
}
