package auditlog

import (
	"bytes"
	"net/url"
	"strings"
	"unicode/utf8"

	"github.com/policy-engine/policy-engine/agent/policy"
	"github.com/policy-engine/policy-engine/internal/redact"
	"github.com/policy-engine/policy-engine/policies/bodytransform/jsonedit"
)

// Redacted replaces every credential in a record.
const Redacted = "[REDACTED]"

var redactedJSON = []byte(`"` + Redacted + `"`)

// DefaultRedactHeaders are the headers whose values are always redacted, besides those whose
// names hold a CredentialWords entry (internal/redact, shared with policyctl and the kernel's
// /debug/explain).
var DefaultRedactHeaders = redact.Headers

// CredentialWords redact every header, query parameter and form field whose name holds one of
// them (compared as keys are: case-insensitive, '-' and '_' equal): x-session-id,
// x-client-secret, private-token. JSON body keys are not matched by them (a body's "tokens"
// or "session_count" is data): only whole keys are, see DefaultRedactKeys.
var CredentialWords = redact.Words

// DefaultRedactParams are the query parameters and form fields whose values are always
// redacted besides the keys: short names that signed URLs and OAuth redirects use for
// credentials, too common in JSON bodies to redact there.
var DefaultRedactParams = redact.Params

// DefaultRedactKeys are the JSON keys, query parameters and form fields whose values are always
// redacted. Names are compared case-insensitively with '-' and '_' taken as equal, so
// "Access-Token" matches access_token.
var DefaultRedactKeys = redact.Keys

// redactDepth bounds the nesting of a body that is redacted; a deeper body is not logged.
const redactDepth = 256

// redactor finds credentials in headers, query strings, form bodies and JSON bodies. Besides
// its own lists it redacts the names a chain's policies read credentials from
// (policy.CredentialSet, passed with each record).
type redactor struct {
	headers map[string]struct{} // lowercase header names
	keys    map[string]struct{} // normalized key names
	params  map[string]struct{} // normalized names of query parameters and form fields only
	maxKey  int                 // the longest normalized key or parameter, in bytes
	// allow, when set, is the only headers recorded (lowercase names): allow-list mode.
	allow map[string]struct{}
}

func newRedactor(headers, keys []string) *redactor {
	r := &redactor{headers: map[string]struct{}{}, keys: map[string]struct{}{}, params: map[string]struct{}{}}
	for _, p := range DefaultRedactParams {
		r.params[p] = struct{}{}
		r.maxKey = max(r.maxKey, len(p))
	}
	for _, h := range append(DefaultRedactHeaders[:len(DefaultRedactHeaders):len(DefaultRedactHeaders)], headers...) {
		r.headers[strings.ToLower(h)] = struct{}{}
	}
	for _, k := range append(DefaultRedactKeys[:len(DefaultRedactKeys):len(DefaultRedactKeys)], keys...) {
		n := string(normalize(nil, []byte(k)))
		r.keys[n] = struct{}{}
		r.maxKey = max(r.maxKey, len(n))
	}
	return r
}

// normalize appends key lowercased, with '-' turned into '_'.
func normalize(dst, key []byte) []byte {
	for i := 0; i < len(key); i++ {
		if key[i] >= utf8.RuneSelf {
			return append(dst, strings.ReplaceAll(strings.ToLower(string(key)), "-", "_")...)
		}
	}
	for _, c := range key {
		switch {
		case c >= 'A' && c <= 'Z':
			c += 'a' - 'A'
		case c == '-':
			c = '_'
		}
		dst = append(dst, c)
	}
	return dst
}

// sensitiveKey reports whether a JSON key, query parameter or form field holds a credential.
func (r *redactor) sensitiveKey(key []byte) bool {
	if len(key) > 4*r.maxKey { // lowercasing changes a rune's length by a few bytes at most
		return false
	}
	var buf [64]byte
	_, ok := r.keys[string(normalize(buf[:0], key))]
	return ok
}

// credentialName reports whether a header, parameter or field name holds a CredentialWords
// entry.
func credentialName(name []byte) bool {
	var buf [64]byte
	n := normalize(buf[:0], name)
	for _, w := range CredentialWords {
		if bytes.Contains(n, []byte(w)) {
			return true
		}
	}
	return false
}

// sensitiveParam reports whether a query parameter or form field (unescaped name) holds a
// credential: a redacted key, a short credential name, a name with a credential word, or a name
// a policy of the config reads a credential from.
func (r *redactor) sensitiveParam(name []byte, creds *policy.CredentialSet) bool {
	if r.sensitiveKey(name) || credentialName(name) || creds.Param(string(name)) {
		return true
	}
	if len(name) > 4*r.maxKey {
		return false
	}
	var buf [64]byte
	_, ok := r.params[string(normalize(buf[:0], name))]
	return ok
}

// sensitiveHeader reports whether a header holds a credential: it is one of the redacted
// headers, a header a policy of the config reads a credential from, its name is a redacted key
// (a header named "access-token", say) or holds a credential word.
func (r *redactor) sensitiveHeader(name string, creds *policy.CredentialSet) bool {
	lower := strings.ToLower(name)
	if _, ok := r.headers[lower]; ok {
		return true
	}
	return creds.Header(lower) || r.sensitiveKey([]byte(name)) || credentialName([]byte(name))
}

// Headers returns a copy of h with credentials redacted; in allow-list mode, only the allowed
// headers, still redacted when they hold a credential.
func (r *redactor) Headers(h map[string]string, creds *policy.CredentialSet) map[string]string {
	if len(h) == 0 {
		return nil
	}
	out := make(map[string]string, min(len(h), max(len(r.allow), 1)))
	for k, v := range h {
		if r.allow != nil {
			if _, ok := r.allow[strings.ToLower(k)]; !ok {
				continue
			}
		}
		if r.sensitiveHeader(k, creds) {
			v = Redacted
		}
		out[k] = v
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

// Path returns a request path with the values of sensitive query parameters redacted.
func (r *redactor) Path(p string, creds *policy.CredentialSet) string {
	path, q, ok := strings.Cut(p, "?")
	if !ok {
		return p
	}
	return path + "?" + r.Query(q, creds)
}

// Query redacts the values of sensitive parameters of a query string or form body, keeping
// everything else, order included, as it was.
func (r *redactor) Query(q string, creds *policy.CredentialSet) string {
	var b strings.Builder
	b.Grow(len(q))
	for i := 0; ; i++ {
		part, rest, more := strings.Cut(q, "&")
		if i > 0 {
			b.WriteByte('&')
		}
		name, _, _ := strings.Cut(part, "=")
		key, err := url.QueryUnescape(name)
		if err != nil {
			key = name
		}
		if r.sensitiveParam([]byte(key), creds) {
			b.WriteString(name)
			b.WriteString("=" + Redacted)
		} else {
			b.WriteString(part)
		}
		if !more {
			return b.String()
		}
		q = rest
	}
}

// JSON returns a JSON document with the value of every sensitive key, at any depth, replaced
// by "[REDACTED]". A document that is not JSON or nests too deeply is an error: it cannot be
// redacted, so it must not be logged.
func (r *redactor) JSON(body []byte) ([]byte, error) {
	out, _, err := jsonedit.Edit(body, redactDepth, struct{}{}, jsonedit.Visitor[struct{}](r))
	return out, err
}

// Member redacts a sensitive key's value, whatever its type.
func (r *redactor) Member(_ struct{}, key []byte) (jsonedit.Action, struct{}) {
	if r.sensitiveKey(key) {
		return jsonedit.Action{Op: jsonedit.Replace, Raw: redactedJSON}, struct{}{}
	}
	return jsonedit.Action{}, struct{}{}
}

// Element visits every element.
func (r *redactor) Element(struct{}, int) struct{} { return struct{}{} }

var _ jsonedit.Visitor[struct{}] = (*redactor)(nil)
