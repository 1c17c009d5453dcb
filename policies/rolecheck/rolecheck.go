// Package rolecheck is the roleCheck policy: it authorizes a request by the roles in the claims
// of a token that jwtValidation verified earlier in the same chain, and answers 403 when the
// roles do not satisfy the route.
//
// The claims come from the state key jwt.claims, which jwtValidation sets; the agent applies
// that state before the next policy runs. Without it (jwtValidation absent from the chain, or
// it let a request without token pass) the policy fails closed with a 403.
package rolecheck

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/policy-engine/policy-engine/agent/policy"
	"github.com/policy-engine/policy-engine/policies/jwtvalidation"
)

// Name is the policy's name in chains.
const Name = "roleCheck"

// DefaultClaim is the claim roles are read from when the metadata names none.
const DefaultClaim = "roles"

const schema = `{"$schema":"https://json-schema.org/draft/2020-12/schema","type":"object","additionalProperties":false,"required":["required_roles"],"properties":{` +
	`"required_roles":{"oneOf":[{"type":"string","minLength":1},{"type":"array","minItems":1,"items":{"type":"string","minLength":1}}],"description":"roles the token must hold"},` +
	`"match":{"enum":["any","all"],"default":"any","description":"any: one of the roles suffices; all: every role is needed"},` +
	`"claim":{"type":"string","default":"roles","description":"claim that holds the roles: a list of strings or a space-separated string (such as scope); dotted for nested claims (realm_access.roles)"}}}`

func init() {
	policy.Register(policy.Module{
		Name:           Name,
		Version:        "1.0.0",
		Description:    "Requires roles from the claims of a validated JWT.",
		Phases:         policy.Request,
		Enforces:       true,
		MetadataSchema: schema,
		New: func(policy.Config) (policy.Factory, error) {
			return policy.FactoryFunc(build), nil
		},

		// Cacheable: its result depends only on the claims an earlier jwtValidation put in
		// the state, which a key must read (state["jwt.claims"]), or the token.
		Cacheable: true,
	})
}

// Settings are the policy's metadata.
type Settings struct {
	// RequiredRoles is one role or a JSON list of roles.
	RequiredRoles string `json:"required_roles" required:"true"`
	Match         string `json:"match"`
	Claim         string `json:"claim"`
}

func build(md map[string]string) (policy.Policy, error) {
	var s Settings
	if err := policy.DecodeMetadata(md, &s); err != nil {
		return nil, err
	}
	var errs []error
	roles, err := parseRoles(s.RequiredRoles)
	if err != nil {
		errs = append(errs, fmt.Errorf("required_roles: %w", err))
	}
	p := &RoleCheck{roles: roles, claim: DefaultClaim}
	switch s.Match {
	case "", "any":
	case "all":
		p.all = true
	default:
		errs = append(errs, fmt.Errorf("match: want \"any\" or \"all\", got %q", s.Match))
	}
	if _, ok := md["claim"]; ok {
		if s.Claim == "" || strings.HasPrefix(s.Claim, ".") || strings.HasSuffix(s.Claim, ".") || strings.Contains(s.Claim, "..") {
			errs = append(errs, fmt.Errorf("claim: invalid claim path %q", s.Claim))
		}
		p.claim = s.Claim
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	p.noClaims = policy.Deny(403, "forbidden", "no verified token claims", nil)
	// The client reads the body; the operator reads the result's message in the agent's logs.
	p.noClaims.Message = "no verified token claims in state " + jwtvalidation.StateClaims + ": jwtValidation must run before roleCheck"
	p.missing = policy.Deny(403, "forbidden", "insufficient role", map[string]string{
		"www-authenticate": `Bearer error="insufficient_scope", error_description="insufficient role"`,
	})
	return p, nil
}

// parseRoles reads one role or a JSON list of roles.
func parseRoles(s string) ([]string, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return nil, errors.New("empty")
	}
	if !strings.HasPrefix(t, "[") {
		return []string{t}, nil
	}
	var roles []string
	if err := json.Unmarshal([]byte(t), &roles); err != nil {
		return nil, fmt.Errorf("want a role or a JSON list of roles: %w", err)
	}
	if len(roles) == 0 {
		return nil, errors.New("empty list")
	}
	if slices.Contains(roles, "") {
		return nil, errors.New("empty role in list")
	}
	return roles, nil
}

// RoleCheck requires roles.
type RoleCheck struct {
	roles []string
	all   bool
	claim string
	// Denials are built once; their instructions are shared read-only.
	noClaims, missing policy.Result
}

// Execute checks the roles of the request's verified claims.
func (p *RoleCheck) Execute(_ context.Context, c *policy.Context) (policy.Result, error) {
	raw := c.State[jwtvalidation.StateClaims]
	if raw == "" {
		return p.noClaims, nil
	}
	dec := json.NewDecoder(bytes.NewReader([]byte(raw)))
	dec.UseNumber()
	var claims map[string]any
	if err := dec.Decode(&claims); err != nil || claims == nil {
		return p.noClaims, nil
	}
	v, _ := jwtvalidation.LookupClaim(claims, p.claim)
	held := heldRoles(v)
	if p.satisfied(held) {
		return policy.Result{}, nil
	}
	return p.missing, nil
}

func (p *RoleCheck) satisfied(held []string) bool {
	for _, r := range p.roles {
		has := slices.Contains(held, r)
		if has && !p.all {
			return true
		}
		if !has && p.all {
			return false
		}
	}
	return p.all
}

// heldRoles reads roles from a claim: a list of strings (other members are ignored) or a
// space-separated string such as OAuth's scope.
func heldRoles(v any) []string {
	switch x := v.(type) {
	case string:
		return strings.Fields(x)
	case []any:
		out := make([]string, 0, len(x))
		for _, e := range x {
			if s, ok := e.(string); ok {
				out = append(out, s)
			}
		}
		return out
	default:
		return nil
	}
}

var _ policy.Policy = (*RoleCheck)(nil)
