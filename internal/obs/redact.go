package obs

import (
	"encoding/json"
	"net/url"
	"strings"

	"github.com/policy-engine/policy-engine/internal/secrets"
)

// Redacted replaces a secret in a config dump.
const Redacted = "[REDACTED]"

// secretKeyWords are the parts of a setting's name that say its value may be a secret: an
// API key, a password, a token, a PEM key, an HMAC secret, headers (which carry credentials,
// such as a tracing collector's). A name that holds one is redacted whatever its value; it
// errs on the side of hiding (key_prefix, a rate limit's key source) rather than showing.
var secretKeyWords = []string{
	"secret", "password", "passwd", "pwd", "token", "key", "pem", "credential", "private",
	"authorization", "cookie", "hmac", "signature", "salt", "headers", "auth",
}

// SecretKey reports whether a setting's name says its value may be a secret.
func SecretKey(name string) bool {
	n := strings.ToLower(name)
	for _, w := range secretKeyWords {
		if strings.Contains(n, w) {
			return true
		}
	}
	return false
}

// RedactValue returns what a config dump shows of a setting's string value: a secret
// reference (${env:NAME}, ${file:/path}) as it is, never resolved; "[REDACTED]" when the
// setting's name (or one of its parents', secret) says it may be a secret; a URL with its
// password removed; else the value. A value that is a JSON object or array (a policy setting
// given as nested YAML) is redacted inside, key by key, and returned as JSON.
func RedactValue(secret bool, v string) any {
	if secrets.IsRef(v) {
		return v
	}
	t := strings.TrimSpace(v)
	if t != "" && (t[0] == '{' || t[0] == '[') {
		var tree any
		if err := json.Unmarshal([]byte(t), &tree); err == nil {
			return RedactTree(secret, tree)
		}
	}
	if secret {
		if v == "" {
			return v
		}
		return Redacted
	}
	return redactURL(v)
}

// RedactTree redacts a decoded JSON tree (maps, slices, scalars) for a config dump: every
// value under a name that SecretKey matches is redacted, at any depth (booleans and nulls
// stay: they hold no secret); secret references stay as they are. secret says the tree itself
// sits under such a name. It returns a new tree.
func RedactTree(secret bool, v any) any {
	switch x := v.(type) {
	case map[string]any:
		out := make(map[string]any, len(x))
		for k, c := range x {
			out[k] = RedactTree(secret || SecretKey(k), c)
		}
		return out
	case []any:
		out := make([]any, len(x))
		for i, c := range x {
			out[i] = RedactTree(secret, c)
		}
		return out
	case string:
		return RedactValue(secret, x)
	case nil, bool:
		return x
	default: // numbers
		if secret {
			return Redacted
		}
		return x
	}
}

// RedactMap redacts a map of settings (chain entry metadata, headers) by RedactValue.
func RedactMap(secret bool, m map[string]string) map[string]any {
	if m == nil {
		return nil
	}
	out := make(map[string]any, len(m))
	for k, v := range m {
		out[k] = RedactValue(secret || SecretKey(k), v)
	}
	return out
}

// RedactJSON redacts a JSON document (a policy's settings) and returns its tree; a document
// that does not decode is shown as "[REDACTED]".
func RedactJSON(doc []byte) any {
	if len(doc) == 0 {
		return nil
	}
	var tree any
	if err := json.Unmarshal(doc, &tree); err != nil {
		return Redacted
	}
	return RedactTree(false, tree)
}

// redactURL removes the password of a URL (redis://user:pass@host).
func redactURL(v string) string {
	if !strings.Contains(v, "@") || !strings.Contains(v, "://") {
		return v
	}
	u, err := url.Parse(v)
	if err != nil {
		return Redacted // looks like a URL with credentials but does not parse: hide it
	}
	if u.User == nil {
		return v
	}
	if _, ok := u.User.Password(); ok {
		u.User = url.UserPassword(u.User.Username(), "REDACTED")
		return u.String()
	}
	return v
}
