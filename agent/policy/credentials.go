package policy

import "strings"

// CredentialReader is implemented by compiled policies that read a credential from a request
// header or query parameter whose name is configured (apiKeyAuth's header_name, jwtValidation's
// header), so that the audit log redacts it although the name is in no fixed list. The agent
// asks once, when it compiles the policy.
//
// It names where secrets come from; a policy's own identity headers (the ones it sets) are a
// different matter.
type CredentialReader interface {
	CredentialNames() Credentials
}

// Credentials names the request headers (any case) and query parameters that carry credentials.
type Credentials struct {
	Headers []string
	Params  []string
}

// CredentialSet is an immutable set of credential names: those of every policy the agent has
// compiled for the config in force, a superset of any one chain's. The agent passes it in
// Context.Credentials. The zero value and nil are the empty set.
type CredentialSet struct {
	headers map[string]struct{} // lowercase
	params  map[string]struct{}
}

// Header reports whether a header (lowercase name) carries a credential.
func (s *CredentialSet) Header(name string) bool {
	if s == nil {
		return false
	}
	_, ok := s.headers[name]
	return ok
}

// Param reports whether a query parameter carries a credential.
func (s *CredentialSet) Param(name string) bool {
	if s == nil {
		return false
	}
	_, ok := s.params[name]
	return ok
}

// Has reports whether every name of c is in s.
func (s *CredentialSet) Has(c Credentials) bool {
	for _, h := range c.Headers {
		if !s.Header(strings.ToLower(h)) {
			return false
		}
	}
	for _, p := range c.Params {
		if !s.Param(p) {
			return false
		}
	}
	return true
}

// With returns a set holding s and c: s itself when it holds c already, else a new set.
func (s *CredentialSet) With(c Credentials) *CredentialSet {
	if s.Has(c) {
		return s
	}
	n := &CredentialSet{headers: map[string]struct{}{}, params: map[string]struct{}{}}
	if s != nil {
		for h := range s.headers {
			n.headers[h] = struct{}{}
		}
		for p := range s.params {
			n.params[p] = struct{}{}
		}
	}
	for _, h := range c.Headers {
		n.headers[strings.ToLower(h)] = struct{}{}
	}
	for _, p := range c.Params {
		n.params[p] = struct{}{}
	}
	return n
}
