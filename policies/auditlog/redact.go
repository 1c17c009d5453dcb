package auditlog

import (
	"net/url"
	"strings"
	"unicode/utf8"

	"github.com/policy-engine/policy-engine/policies/bodytransform/jsonedit"
)

// Redacted replaces every credential in a record.
const Redacted = "[REDACTED]"

var redactedJSON = []byte(`"` + Redacted + `"`)

// DefaultRedactHeaders are the headers whose values are always redacted.
var DefaultRedactHeaders = []string{"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"}

// DefaultRedactKeys are the JSON keys, query parameters and form fields whose values are always
// redacted. Names are compared case-insensitively with '-' and '_' taken as equal, so
// "Access-Token" matches access_token.
var DefaultRedactKeys = []string{
	"password", "passwd", "token", "access_token", "refresh_token", "id_token", "secret",
	"client_secret", "api_key", "apikey", "x_api_key", "authorization", "private_key",
}

// redactDepth bounds the nesting of a body that is redacted; a deeper body is not logged.
const redactDepth = 256

// redactor finds credentials in headers, query strings, form bodies and JSON bodies.
type redactor struct {
	headers map[string]struct{} // lowercase header names
	keys    map[string]struct{} // normalized key names
	maxKey  int                 // the longest normalized key, in bytes
}

func newRedactor(headers, keys []string) *redactor {
	r := &redactor{headers: map[string]struct{}{}, keys: map[string]struct{}{}}
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

// sensitiveHeader reports whether a header holds a credential: it is one of the redacted
// headers, or its name is a redacted key (a header named "access-token", say).
func (r *redactor) sensitiveHeader(name string) bool {
	if _, ok := r.headers[strings.ToLower(name)]; ok {
		return true
	}
	return r.sensitiveKey([]byte(name))
}

// Headers returns a copy of h with credentials redacted.
func (r *redactor) Headers(h map[string]string) map[string]string {
	if len(h) == 0 {
		return nil
	}
	out := make(map[string]string, len(h))
	for k, v := range h {
		if r.sensitiveHeader(k) {
			v = Redacted
		}
		out[k] = v
	}
	return out
}

// Path returns a request path with the values of sensitive query parameters redacted.
func (r *redactor) Path(p string) string {
	path, q, ok := strings.Cut(p, "?")
	if !ok {
		return p
	}
	return path + "?" + r.Query(q)
}

// Query redacts the values of sensitive parameters of a query string or form body, keeping
// everything else, order included, as it was.
func (r *redactor) Query(q string) string {
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
		if r.sensitiveKey([]byte(key)) {
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
