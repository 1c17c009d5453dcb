// Package securityheaders is the addSecurityHeaders policy: it sets response headers such as
// X-Content-Type-Options and X-Frame-Options on every response of a route.
package securityheaders

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/headers"
)

// Name is the policy's name in chains.
const Name = "addSecurityHeaders"

// DefaultHeaders are set when the metadata names no headers.
var DefaultHeaders = map[string]string{
	"X-Content-Type-Options": "nosniff",
	"X-Frame-Options":        "DENY",
	"Referrer-Policy":        "no-referrer",
}

const schema = `{"$schema":"https://json-schema.org/draft/2020-12/schema","type":"object","additionalProperties":false,` +
	`"properties":{"headers":{"type":"object","additionalProperties":{"type":"string"},` +
	`"description":"response headers to set, name to value; default: X-Content-Type-Options: nosniff, X-Frame-Options: DENY, Referrer-Policy: no-referrer"},` +
	`"overwrite":{"type":"boolean","default":true,"description":"replace a header the upstream already set"}}}`

// Settings are the policy's metadata.
type Settings struct {
	Headers   map[string]string `json:"headers"`
	Overwrite *bool             `json:"overwrite"`
}

func init() {
	policy.Register(policy.Module{
		Name:        Name,
		Version:     "1.0.0",
		Description: "Adds security headers to responses.",
		Phases:      policy.Response,
		// In the response phase it reads only the response and the state.
		ResponseIgnoresRequest: true,
		// With overwrite (the default) its answer is the same on every response.
		StaticEntries:  true,
		MetadataSchema: schema,
		New: func(policy.Config) (policy.Factory, error) {
			return policy.FactoryFunc(build), nil
		},

		NotCacheable: "its result depends on the response headers, which a key cannot read, and it costs nothing to run",
	})
}

func build(md map[string]string) (policy.Policy, error) {
	var s Settings
	if err := policy.DecodeMetadata(md, &s); err != nil {
		return nil, err
	}
	h := s.Headers
	if len(h) == 0 {
		h = DefaultHeaders
	}
	p := &SecurityHeaders{overwrite: s.Overwrite == nil || *s.Overwrite}
	names := make([]string, 0, len(h))
	for k := range h {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		name := strings.ToLower(k)
		if err := headers.ValidName(name); err != nil {
			return nil, fmt.Errorf("headers: %w", err)
		}
		if err := headers.ValidValue(h[k]); err != nil {
			return nil, fmt.Errorf("headers: %q: %w", k, err)
		}
		p.names = append(p.names, name)
		p.set = append(p.set, policy.SetHeader(name, h[k]))
	}
	return p, nil
}

// SecurityHeaders sets a fixed list of response headers.
type SecurityHeaders struct {
	names     []string
	set       []*agentv1.Instruction // prebuilt at build time; shared read-only
	overwrite bool
}

// Execute returns the header instructions.
func (p *SecurityHeaders) Execute(_ context.Context, c *policy.Context) (policy.Result, error) {
	if p.overwrite || c.Response == nil {
		return policy.Result{Instructions: p.set}, nil
	}
	out := make([]*agentv1.Instruction, 0, len(p.set))
	for i, name := range p.names {
		if _, present := c.Response.Headers[name]; !present {
			out = append(out, p.set[i])
		}
	}
	return policy.Result{Instructions: out}, nil
}

// StaticResult is the policy's answer on every response when it overwrites what the upstream
// set: its header instructions, whatever the response. Without overwrite the answer depends on
// the response's headers.
func (p *SecurityHeaders) StaticResult(phase agentv1.PolicyPhase) (policy.Result, bool) {
	if !p.overwrite || phase != agentv1.PolicyPhase_RESPONSE {
		return policy.Result{}, false
	}
	return policy.Result{Instructions: p.set}, true
}

var (
	_ policy.Policy = (*SecurityHeaders)(nil)
	_ policy.Static = (*SecurityHeaders)(nil)
)
