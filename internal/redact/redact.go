// Package redact names the credentials that output meant for people must never show (the
// audit log, policyctl's reports, the kernel's /debug/explain) and hides their values.
package redact

import (
	"net/url"
	"slices"
	"strings"
)

// Redacted replaces a credential's value in policyctl's and the kernel's reports.
const Redacted = "[redacted]"

// Headers are the headers whose values are always redacted, besides those whose names hold a
// Words entry.
var Headers = []string{
	"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key",
	"x-csrf-token", "x-xsrf-token", "x-session-token", "x-amz-security-token", "x-auth-token",
}

// Words redact every header, query parameter and form field whose name holds one of them
// (compared case-insensitively, '-' and '_' equal): x-session-id, x-client-secret,
// private-token. JSON body keys are not matched by them (a body's "tokens" or
// "session_count" is data): only whole keys are, see Keys.
var Words = []string{"token", "secret", "password", "passwd", "apikey", "api_key", "session", "credential", "signature"}

// Params are the query parameters and form fields whose values are always redacted besides
// the keys: short names that signed URLs and OAuth redirects use for credentials, too common
// in JSON bodies to redact there.
var Params = []string{"key", "code", "sig", "auth", "pwd"}

// Keys are the JSON keys, query parameters and form fields whose values are always redacted.
// Names are compared case-insensitively with '-' and '_' taken as equal, so "Access-Token"
// matches access_token.
var Keys = []string{
	"password", "passwd", "token", "access_token", "refresh_token", "id_token", "secret",
	"client_secret", "api_key", "apikey", "x_api_key", "authorization", "private_key",
}

// Redactor hides the values of credential headers, state keys and query parameters: those of
// the lists above, and the extra header names a route's policies read credentials from.
type Redactor struct {
	extra map[string]bool
}

// New returns a Redactor that also hides the headers named in extra.
func New(extra []string) *Redactor {
	r := &Redactor{extra: map[string]bool{}}
	for _, h := range extra {
		r.extra[strings.ToLower(h)] = true
	}
	return r
}

// Sensitive reports whether a header or state key carries a credential.
func (r *Redactor) Sensitive(name string) bool {
	name = strings.ToLower(name)
	if r.extra[name] || slices.Contains(Headers, name) {
		return true
	}
	squeezed := strings.NewReplacer("-", "", "_", "").Replace(name)
	for _, w := range Words {
		if strings.Contains(squeezed, strings.ReplaceAll(w, "_", "")) {
			return true
		}
	}
	return false
}

// Param reports whether a query parameter carries a credential.
func (r *Redactor) Param(name string) bool {
	n := strings.ReplaceAll(strings.ToLower(name), "-", "_")
	return slices.Contains(Keys, n) || slices.Contains(Params, n) || r.Sensitive(name)
}

// Path hides the values of the credential parameters of a path's query.
func (r *Redactor) Path(p string) string {
	base, query, ok := strings.Cut(p, "?")
	if !ok {
		return p
	}
	parts := strings.Split(query, "&")
	for i, kv := range parts {
		name, _, hasValue := strings.Cut(kv, "=")
		if dec, err := url.QueryUnescape(name); err == nil {
			name = dec
		}
		if hasValue && r.Param(name) {
			parts[i] = kv[:strings.IndexByte(kv, '=')+1] + Redacted
		}
	}
	return base + "?" + strings.Join(parts, "&")
}

// Value returns v, or Redacted when name is a credential's.
func (r *Redactor) Value(name, v string) string {
	if r.Sensitive(name) {
		return Redacted
	}
	return v
}

// Headers returns a copy of hs, name/value pairs, with the credentials' values redacted.
func (r *Redactor) Headers(hs [][2]string) [][2]string {
	out := make([][2]string, 0, len(hs))
	for _, h := range hs {
		out = append(out, [2]string{h[0], r.Value(h[0], h[1])})
	}
	return out
}
