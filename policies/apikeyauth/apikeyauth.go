// Package apikeyauth is the apiKeyAuth policy (specification §4.2.1): it authenticates a request
// by an API key in a header, answers 401 when the key is missing and 403 when it is wrong, and
// passes the key's user id on in X-User-ID and in state.
//
// Keys are configured in the agent config, never in the kernel's, under
// agent_core.policies.config.apiKeyAuth.keys, each as its SHA-256 (key_sha256), the name of an
// environment variable that holds it (key_env), or the key itself (key). They are held only as
// SHA-256 digests and compared in constant time; a key is never logged or echoed.
package apikeyauth

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/policy-engine/policy-engine/agent/policy"
	"github.com/policy-engine/policy-engine/internal/headers"
	"github.com/policy-engine/policy-engine/internal/secrets"
)

// Name is the policy's name in chains.
const Name = "apiKeyAuth"

const schema = `{"$schema":"https://json-schema.org/draft/2020-12/schema","type":"object","additionalProperties":false,"properties":{` +
	`"header_name":{"type":"string","default":"X-API-Key","description":"request header that carries the key"},` +
	`"required":{"type":"boolean","default":true,"description":"deny requests without a key (401); when false they pass unauthenticated"},` +
	`"user_id_header":{"type":"string","default":"X-User-ID","description":"request header set to the key's user id"},` +
	`"remove_key_header":{"type":"boolean","default":false,"description":"remove the key header before the request goes upstream"}}}`

// Key is one configured API key.
type Key struct {
	KeySHA256 string `json:"key_sha256"`
	KeyEnv    string `json:"key_env"`
	Key       string `json:"key"`
	UserID    string `json:"user_id"`
}

// Config is agent_core.policies.config.apiKeyAuth.
type Config struct {
	Keys []Key `json:"keys"`
	// AllowPlaintextKeys silences the warning about keys written in clear (key: without a
	// secret reference), for tests and demos.
	AllowPlaintextKeys bool `json:"allow_plaintext_keys"`
}

// Settings are a chain entry's metadata.
type Settings struct {
	HeaderName      string `json:"header_name"`
	Required        *bool  `json:"required"`
	UserIDHeader    string `json:"user_id_header"`
	RemoveKeyHeader bool   `json:"remove_key_header"`
}

type storedKey struct {
	digest [sha256.Size]byte
	userID string
}

// Factory holds the configured keys.
type Factory struct {
	keys []storedKey
}

func init() {
	policy.Register(policy.Module{
		Name:           Name,
		Version:        "1.0.0",
		Description:    "Authenticates requests by API key.",
		Phases:         policy.Request,
		Enforces:       true,
		MetadataSchema: schema,
		New:            New,

		// Cacheable: its result depends only on the key header and the configured keys (a
		// reload of the agent config drops every cached result).
		Cacheable: true,
	})
}

// New makes the factory from the policy's agent config section.
func New(c policy.Config) (policy.Factory, error) {
	var cfg Config
	if err := c.Decode(&cfg); err != nil {
		return nil, err
	}
	f := &Factory{}
	if clear := plaintextKeys(c); len(clear) > 0 && !cfg.AllowPlaintextKeys {
		c.Log.Warn().Str("policy", Name).Str("keys", strings.Join(clear, ", ")).
			Msg("API keys written in clear in the config file; use key_sha256, key_env or a ${file:...} reference, or set allow_plaintext_keys: true")
	}
	var errs []error
	for i, k := range cfg.Keys {
		sk, err := k.digest()
		if err != nil {
			errs = append(errs, fmt.Errorf("keys[%d]: %w", i, err))
			continue
		}
		if k.UserID == "" {
			errs = append(errs, fmt.Errorf("keys[%d]: user_id is required", i))
			continue
		}
		if err := headers.ValidValue(k.UserID); err != nil {
			errs = append(errs, fmt.Errorf("keys[%d]: user_id: %w", i, err))
			continue
		}
		f.keys = append(f.keys, storedKey{digest: sk, userID: k.UserID})
	}
	return f, errors.Join(errs...)
}

// plaintextKeys names the entries whose key is written in the config file in clear, not as a
// secret reference: "keys[0]", never the key.
func plaintextKeys(c policy.Config) []string {
	written := c.Unresolved
	if written == nil {
		written = c.Raw
	}
	var w struct {
		Keys []struct {
			Key string `json:"key"`
		} `json:"keys"`
	}
	if len(written) == 0 || json.Unmarshal(written, &w) != nil {
		return nil
	}
	var out []string
	for i, k := range w.Keys {
		if k.Key != "" && !secrets.IsRef(k.Key) {
			out = append(out, fmt.Sprintf("keys[%d]", i))
		}
	}
	return out
}

func (k Key) digest() ([sha256.Size]byte, error) {
	var d [sha256.Size]byte
	set := 0
	for _, s := range []string{k.KeySHA256, k.KeyEnv, k.Key} {
		if s != "" {
			set++
		}
	}
	if set != 1 {
		return d, errors.New("exactly one of key_sha256, key_env and key must be set")
	}
	switch {
	case k.KeySHA256 != "":
		b, err := hex.DecodeString(k.KeySHA256)
		if err != nil || len(b) != sha256.Size || strings.ToLower(k.KeySHA256) != k.KeySHA256 {
			return d, errors.New("key_sha256 must be 64 lowercase hex digits")
		}
		copy(d[:], b)
	case k.KeyEnv != "":
		v, ok := os.LookupEnv(k.KeyEnv)
		if !ok || v == "" {
			return d, fmt.Errorf("key_env: environment variable %q is not set", k.KeyEnv)
		}
		d = sha256.Sum256([]byte(v))
	default:
		d = sha256.Sum256([]byte(k.Key))
	}
	return d, nil
}

// Build compiles a chain entry's metadata.
func (f *Factory) Build(md map[string]string) (policy.Policy, error) {
	s := Settings{HeaderName: "X-API-Key", UserIDHeader: "X-User-ID"}
	if err := policy.DecodeMetadata(md, &s); err != nil {
		return nil, err
	}
	p := &APIKeyAuth{
		keys:         f.keys,
		header:       strings.ToLower(s.HeaderName),
		required:     s.Required == nil || *s.Required,
		userIDHeader: strings.ToLower(s.UserIDHeader),
		removeKey:    s.RemoveKeyHeader,
	}
	if err := headers.ValidName(p.header); err != nil || strings.HasPrefix(p.header, ":") {
		return nil, fmt.Errorf("header_name: invalid header name %q", s.HeaderName)
	}
	if err := headers.ValidName(p.userIDHeader); err != nil || !headers.SetAllowed(p.userIDHeader) {
		return nil, fmt.Errorf("user_id_header: %q cannot be set", s.UserIDHeader)
	}
	if strings.ReplaceAll(p.userIDHeader, "_", "-") == strings.ReplaceAll(p.header, "_", "-") {
		// The agent strips the user id header from the client's request, key and all.
		return nil, fmt.Errorf("user_id_header: %q is the key header", s.UserIDHeader)
	}
	p.owned = []string{p.userIDHeader}
	p.missing = policy.Deny(401, "unauthorized", "API key required", map[string]string{"www-authenticate": "API-Key"})
	p.invalid = policy.Deny(403, "forbidden", "invalid API key", nil)
	resultMD := map[string]string{"auth_method": "api_key"}
	p.allowed = make([]policy.Result, len(f.keys))
	for i, k := range f.keys {
		r := policy.Allow(
			policy.SetHeader(p.userIDHeader, k.userID),
			policy.SetState("user_id", k.userID),
			policy.SetState("auth_method", "api_key"),
		)
		if p.removeKey {
			r.Instructions = append(r.Instructions, policy.RemoveHeader(p.header))
		}
		r.Metadata = resultMD
		p.allowed[i] = r
	}
	return p, nil
}

// APIKeyAuth checks API keys.
type APIKeyAuth struct {
	keys         []storedKey
	header       string
	required     bool
	userIDHeader string
	removeKey    bool
	owned        []string // the user id header, which the agent strips from the client's request
	// Every answer is built once; their instructions are shared read-only.
	missing, invalid policy.Result
	allowed          []policy.Result // by key, in the order of keys
}

// CredentialNames names the key header, for the audit log to redact.
func (p *APIKeyAuth) CredentialNames() policy.Credentials {
	return policy.Credentials{Headers: []string{p.header}}
}

// Execute authenticates the request.
func (p *APIKeyAuth) Execute(_ context.Context, c *policy.Context) (policy.Result, error) {
	key := c.Headers[p.header]
	if key == "" {
		if p.required {
			return p.missing, nil
		}
		return policy.Result{}, nil
	}
	i, ok := p.lookup(key)
	if !ok {
		return p.invalid, nil
	}
	return p.allowed[i], nil
}

// OwnedRequestHeaders returns the user id header: whatever the client sent in it (or in a
// spelling such as x_user_id) is removed on every request, also when required is false and the
// request carries no key.
func (p *APIKeyAuth) OwnedRequestHeaders() []string { return p.owned }

// lookup compares the key's digest with every configured digest in constant time, without
// stopping at the first match, so timing tells nothing about which key matched or how close a
// guess came.
func (p *APIKeyAuth) lookup(key string) (int, bool) {
	d := sha256.Sum256([]byte(key))
	match := -1
	for i := range p.keys {
		if subtle.ConstantTimeCompare(d[:], p.keys[i].digest[:]) == 1 {
			match = i
		}
	}
	return match, match >= 0
}

var (
	_ policy.Factory          = (*Factory)(nil)
	_ policy.Policy           = (*APIKeyAuth)(nil)
	_ policy.HeaderOwner      = (*APIKeyAuth)(nil)
	_ policy.CredentialReader = (*APIKeyAuth)(nil)
)
