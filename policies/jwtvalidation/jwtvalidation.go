// Package jwtvalidation is the jwtValidation policy: it authenticates a request by a JSON Web
// Token (RFC 7519) in a header, checks its signature, issuer, audience and validity times, and
// passes claims on to the upstream in headers and to later policies in state.
//
// Keys come from exactly one source: a JWK Set fetched from a URL (cached, refreshed in the
// background, shared across config reloads), a JWK Set file, a PEM public key, or an HMAC
// secret named by an environment variable of the agent (only in the agent config, never in a
// route's metadata). The token's "alg" must be in an allow-list and must fit the key's type, so
// "none" and key confusion (an RSA public key used as an HMAC secret) are always refused.
//
// A denial is a 401 with a WWW-Authenticate challenge (RFC 6750) and a JSON body holding a
// fixed phrase; the token is never echoed or logged.
package jwtvalidation

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/headers"
	"github.com/policy-engine/policy-engine/internal/logging"
)

// Name is the policy's name in chains.
const Name = "jwtValidation"

// State keys the policy sets on success, for later policies and the response phase.
const (
	// StateUserID is the token's "sub" claim.
	StateUserID = "user_id"
	// StateAuthMethod is "jwt".
	StateAuthMethod = "auth_method"
	// StateClaims is the token's claims as one compact JSON object.
	StateClaims = "jwt.claims"
)

// Defaults and bounds of the settings.
const (
	DefaultHeader          = "authorization"
	DefaultPrefix          = "Bearer "
	DefaultLeeway          = 30 * time.Second
	MaxLeeway              = 5 * time.Minute
	DefaultRefreshInterval = 5 * time.Minute
	MinRefreshInterval     = time.Second
	MaxRefreshInterval     = 24 * time.Hour
	DefaultFetchTimeout    = 3 * time.Second
	MaxFetchTimeout        = 30 * time.Second
	DefaultMaxTokenBytes   = 8 << 10
	DefaultMaxClaimsBytes  = 8 << 10
	minSizeLimit           = 256
	maxSizeLimit           = 64 << 10
)

const schema = `{"$schema":"https://json-schema.org/draft/2020-12/schema","type":"object","additionalProperties":false,` +
	`"allOf":[{"not":{"required":["jwks_url","jwks_file"]}},{"not":{"required":["jwks_url","public_key_pem"]}},{"not":{"required":["jwks_file","public_key_pem"]}}],` +
	`"properties":{` +
	`"issuer":{"type":"string","description":"required value of the iss claim; default: the agent config's issuer, else iss is not checked"},` +
	`"audience":{"oneOf":[{"type":"string","minLength":1},{"type":"array","minItems":1,"items":{"type":"string","minLength":1}}],"description":"accepted aud values, any one suffices; default: the agent config's audience, else aud is not checked"},` +
	`"jwks_url":{"type":"string","format":"uri","description":"JWK Set URL (https, or http for a loopback host); one key source at most; default: the agent config's key source"},` +
	`"jwks_file":{"type":"string","description":"JWK Set file, read when the policy is built"},` +
	`"public_key_pem":{"type":"string","description":"PEM public key (PUBLIC KEY, RSA PUBLIC KEY or CERTIFICATE)"},` +
	`"header":{"type":"string","default":"authorization","description":"request header that carries the token"},` +
	`"prefix":{"type":"string","default":"Bearer ","description":"scheme before the token, compared case-insensitively; empty: the whole header value is the token"},` +
	`"leeway":{"type":"string","default":"30s","description":"clock skew allowed for exp, nbf and iat, a Go duration up to 5m"},` +
	`"claims_to_headers":{"type":"object","additionalProperties":{"type":"string"},"description":"claim path (dotted for nested claims) to request header; a header whose claim is absent is removed"},` +
	`"algorithms":{"type":"array","minItems":1,"items":{"enum":["RS256","RS384","RS512","PS256","PS384","PS512","ES256","ES384","ES512","EdDSA","HS256","HS384","HS512"]},"description":"allowed alg values; default RS256 RS384 RS512 PS256 ES256 ES384 EdDSA, or HS256 with an HMAC secret"},` +
	`"required":{"type":"boolean","default":true,"description":"deny requests without a token (401); when false they pass unauthenticated, but a token that is present must be valid"},` +
	`"remove_token_header":{"type":"boolean","default":false,"description":"remove the token header before the request goes upstream"}}}`

func init() {
	policy.Register(policy.Module{
		Name:           Name,
		Version:        "1.0.0",
		Description:    "Validates JSON Web Tokens and passes their claims on.",
		Phases:         policy.Request,
		Enforces:       true,
		MetadataSchema: schema,
		New:            New,

		// Cacheable: its result depends on the token and the signing keys; an allow holds
		// until the token's exp (Result.Expires), and answers about a passing condition (keys
		// unavailable, unknown kid, a token not valid yet) are never reused.
		Cacheable: true,
	})
}

// Config is agent_core.policies.config.jwtValidation: defaults for every route, and settings
// that only the agent's operator may choose.
type Config struct {
	Issuer       string     `json:"issuer"`
	Audience     stringList `json:"audience"`
	JWKSURL      string     `json:"jwks_url"`
	JWKSFile     string     `json:"jwks_file"`
	PublicKeyPEM string     `json:"public_key_pem"`
	// HMACSecretEnv names an environment variable holding an HMAC secret; it is the only way
	// to allow HS256/HS384/HS512.
	HMACSecretEnv       string   `json:"hmac_secret_env"`
	Algorithms          []string `json:"algorithms"`
	Leeway              duration `json:"leeway"`
	JWKSRefreshInterval duration `json:"jwks_refresh_interval"`
	JWKSFetchTimeout    duration `json:"jwks_fetch_timeout"`
	MaxTokenBytes       int      `json:"max_token_bytes"`
	MaxClaimsBytes      int      `json:"max_claims_bytes"`
}

// Settings are a chain entry's metadata. Presence of leeway, prefix and required is read from
// the metadata map itself, since their zero values are meaningful.
type Settings struct {
	Issuer            string            `json:"issuer"`
	Audience          string            `json:"audience"`
	JWKSURL           string            `json:"jwks_url"`
	JWKSFile          string            `json:"jwks_file"`
	PublicKeyPEM      string            `json:"public_key_pem"`
	Header            string            `json:"header"`
	Prefix            string            `json:"prefix"`
	Leeway            time.Duration     `json:"leeway"`
	ClaimsToHeaders   map[string]string `json:"claims_to_headers"`
	Algorithms        []string          `json:"algorithms"`
	Required          bool              `json:"required"`
	RemoveTokenHeader bool              `json:"remove_token_header"`
}

// Factory holds the agent config's defaults and the remote key sets its policies use.
type Factory struct {
	issuer     string
	audience   []string
	algorithms []string
	leeway     time.Duration
	interval   time.Duration
	timeout    time.Duration
	maxToken   int
	maxClaims  int
	// defaultKeys is the agent config's key source; nil when it has none.
	defaultKeys keyProvider
	defaultHMAC bool

	reg *registry
	now func() time.Time
	log *logging.Logger

	mu      sync.Mutex
	closed  bool
	remotes map[remoteKey]*remoteKeys
}

// New makes the factory from the policy's agent config section. When that names a jwks_url,
// the factory starts fetching it; Close stops that.
func New(c policy.Config) (policy.Factory, error) {
	f, err := newWithClock(c, time.Now)
	if err != nil {
		return nil, err
	}
	return f, nil
}

// newWithClock is New with the clock that validity times and refetch intervals are read from.
func newWithClock(c policy.Config, now func() time.Time) (*Factory, error) {
	var cfg Config
	if err := c.Decode(&cfg); err != nil {
		return nil, err
	}
	shared := c.Shared
	if shared == nil {
		shared = &sync.Map{}
	}
	f := &Factory{
		issuer:    cfg.Issuer,
		audience:  cfg.Audience,
		leeway:    DefaultLeeway,
		interval:  DefaultRefreshInterval,
		timeout:   DefaultFetchTimeout,
		maxToken:  DefaultMaxTokenBytes,
		maxClaims: DefaultMaxClaimsBytes,
		reg:       sharedRegistry(shared),
		now:       now,
		log:       c.Log,
		remotes:   map[remoteKey]*remoteKeys{},
	}
	var errs []error
	bad := func(key string, err error) { errs = append(errs, fmt.Errorf("%s: %w", key, err)) }
	if cfg.Leeway.set {
		if err := checkLeeway(cfg.Leeway.d); err != nil {
			bad("leeway", err)
		}
		f.leeway = cfg.Leeway.d
	}
	if cfg.JWKSRefreshInterval.set {
		if d := cfg.JWKSRefreshInterval.d; d < MinRefreshInterval || d > MaxRefreshInterval {
			bad("jwks_refresh_interval", fmt.Errorf("%s is out of range [%s, %s]", d, MinRefreshInterval, MaxRefreshInterval))
		}
		f.interval = cfg.JWKSRefreshInterval.d
	}
	if cfg.JWKSFetchTimeout.set {
		if d := cfg.JWKSFetchTimeout.d; d <= 0 || d > MaxFetchTimeout {
			bad("jwks_fetch_timeout", fmt.Errorf("%s is out of range (0, %s]", d, MaxFetchTimeout))
		}
		f.timeout = cfg.JWKSFetchTimeout.d
	}
	if cfg.MaxTokenBytes != 0 {
		if err := checkSizeLimit(cfg.MaxTokenBytes); err != nil {
			bad("max_token_bytes", err)
		}
		f.maxToken = cfg.MaxTokenBytes
	}
	if cfg.MaxClaimsBytes != 0 {
		if err := checkSizeLimit(cfg.MaxClaimsBytes); err != nil {
			bad("max_claims_bytes", err)
		}
		f.maxClaims = cfg.MaxClaimsBytes
	}
	for i, a := range cfg.Audience {
		if a == "" {
			bad(fmt.Sprintf("audience[%d]", i), errors.New("must not be empty"))
		}
	}
	// A key source that is named but empty is an error, not "no key source": it is what an
	// empty ${env:...} variable or ${file:...} file comes to, and the agent must not start
	// without the keys its operator meant to give it.
	var named map[string]json.RawMessage
	if json.Unmarshal(c.Raw, &named) == nil {
		for _, k := range []string{"jwks_url", "jwks_file", "public_key_pem", "hmac_secret_env"} {
			if string(named[k]) == `""` {
				bad(k, errors.New("is empty; leave the key out for no default key source"))
			}
		}
	}
	sources := 0
	for _, s := range []string{cfg.JWKSURL, cfg.JWKSFile, cfg.PublicKeyPEM, cfg.HMACSecretEnv} {
		if s != "" {
			sources++
		}
	}
	if sources > 1 {
		bad("key source", errors.New("set at most one of jwks_url, jwks_file, public_key_pem and hmac_secret_env"))
	}
	switch {
	case sources != 1:
	case cfg.JWKSURL != "":
		if err := checkJWKSURL(cfg.JWKSURL); err != nil {
			bad("jwks_url", err)
		}
	case cfg.HMACSecretEnv != "":
		secret, err := hmacSecret(cfg.HMACSecretEnv)
		if err != nil {
			bad("hmac_secret_env", err)
		} else {
			f.defaultKeys = staticKeys{set: newKeySet([]*verifyKey{{fam: famHMAC, key: secret}})}
			f.defaultHMAC = true
		}
	default:
		kp, err := staticSource(cfg.JWKSFile, cfg.PublicKeyPEM)
		if err != nil {
			bad(sourceName(cfg.JWKSFile), err)
		} else {
			f.defaultKeys = kp
		}
	}
	if len(cfg.Algorithms) > 0 {
		if err := checkAlgorithms(cfg.Algorithms, f.defaultHMAC); err != nil {
			bad("algorithms", err)
		}
		f.algorithms = cfg.Algorithms
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	if sources == 1 && cfg.JWKSURL != "" {
		r, err := f.acquire(cfg.JWKSURL)
		if err != nil {
			return nil, err
		}
		f.defaultKeys = r
	}
	return f, nil
}

func sourceName(jwksFile string) string {
	if jwksFile != "" {
		return "jwks_file"
	}
	return "public_key_pem"
}

// staticSource reads a JWKS file or parses a PEM key; exactly one of them is set.
func staticSource(jwksFile, pemText string) (keyProvider, error) {
	if jwksFile != "" {
		data, err := readCapped(jwksFile, maxJWKSBody)
		if err != nil {
			return nil, fmt.Errorf("read JWK set: %w", err)
		}
		set, err := parseJWKS(data)
		if err != nil {
			return nil, fmt.Errorf("file %q: %w", jwksFile, err)
		}
		return staticKeys{set: set}, nil
	}
	k, err := parsePublicKeyPEM([]byte(pemText))
	if err != nil {
		return nil, err
	}
	return staticKeys{set: newKeySet([]*verifyKey{k})}, nil
}

// readCapped reads a file of at most max bytes, so that a wrong path (a device, a log) cannot
// make the agent read without end.
func readCapped(name string, max int64) ([]byte, error) {
	fh, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer fh.Close()
	data, err := io.ReadAll(io.LimitReader(fh, max+1))
	if err != nil {
		return nil, fmt.Errorf("read %q: %w", name, err)
	}
	if int64(len(data)) > max {
		return nil, fmt.Errorf("file %q exceeds %d bytes", name, max)
	}
	return data, nil
}

func hmacSecret(env string) ([]byte, error) {
	v, ok := os.LookupEnv(env)
	if !ok || v == "" {
		return nil, fmt.Errorf("environment variable %q is not set", env)
	}
	if len(v) < minHMACSecret {
		return nil, fmt.Errorf("secret in %q is %d bytes: at least %d are required", env, len(v), minHMACSecret)
	}
	return []byte(v), nil
}

func checkLeeway(d time.Duration) error {
	if d < 0 || d > MaxLeeway {
		return fmt.Errorf("%s is out of range [0s, %s]", d, MaxLeeway)
	}
	return nil
}

func checkSizeLimit(n int) error {
	if n < minSizeLimit || n > maxSizeLimit {
		return fmt.Errorf("%d is out of range [%d, %d]", n, minSizeLimit, maxSizeLimit)
	}
	return nil
}

// checkAlgorithms checks an allow-list: every name known, "none" never, HMAC algorithms only
// with an HMAC secret and public-key algorithms only without one.
func checkAlgorithms(algs []string, hmac bool) error {
	var errs []error
	for _, a := range algs {
		fam, ok := algorithms[a]
		switch {
		case !ok:
			errs = append(errs, fmt.Errorf("algorithm %q is not supported", a))
		case fam == famHMAC && !hmac:
			errs = append(errs, fmt.Errorf("algorithm %q needs the key source hmac_secret_env", a))
		case fam != famHMAC && hmac:
			errs = append(errs, fmt.Errorf("algorithm %q needs a public key, but the key source is hmac_secret_env", a))
		}
	}
	return errors.Join(errs...)
}

// acquire takes a reference on the shared remote set for rawURL, once per factory.
func (f *Factory) acquire(rawURL string) (*remoteKeys, error) {
	k := remoteKey{url: rawURL, interval: f.interval, timeout: f.timeout}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, errFactoryClosed
	}
	if r, ok := f.remotes[k]; ok {
		return r, nil
	}
	r := f.reg.acquire(k, f.now, f.log)
	f.remotes[k] = r
	return r, nil
}

var errFactoryClosed = errors.New("factory is closed: a newer agent config replaced it")

// Close releases the remote key sets this factory used; a set that no other factory uses
// stops being refreshed.
func (f *Factory) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	for k := range f.remotes {
		f.reg.release(k)
	}
	clear(f.remotes)
	return nil
}

// HealthCheck reports remote key sets that have never been fetched.
func (f *Factory) HealthCheck(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	var errs []error
	for _, r := range f.remotes {
		if err := r.health(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// claimHeader copies one claim into one request header.
type claimHeader struct {
	path   string
	header string
}

// Build compiles a chain entry's metadata.
func (f *Factory) Build(md map[string]string) (policy.Policy, error) {
	var s Settings
	if err := policy.DecodeMetadata(md, &s); err != nil {
		return nil, err
	}
	p := &JWTValidation{
		header:      DefaultHeader,
		prefix:      DefaultPrefix,
		required:    true,
		removeToken: s.RemoveTokenHeader,
		maxToken:    f.maxToken,
		maxClaims:   f.maxClaims,
		now:         f.now,
	}
	var errs []error
	bad := func(key string, err error) { errs = append(errs, fmt.Errorf("%s: %w", key, err)) }
	if s.Header != "" {
		p.header = strings.ToLower(s.Header)
		if err := headers.ValidName(p.header); err != nil || strings.HasPrefix(p.header, ":") {
			bad("header", fmt.Errorf("invalid header name %q", s.Header))
		}
	}
	if _, ok := md["prefix"]; ok {
		p.prefix = s.Prefix
	}
	if _, ok := md["required"]; ok {
		p.required = s.Required
	}
	leeway := f.leeway
	if _, ok := md["leeway"]; ok {
		if err := checkLeeway(s.Leeway); err != nil {
			bad("leeway", err)
		}
		leeway = s.Leeway
	}
	issuer := f.issuer
	if s.Issuer != "" {
		issuer = s.Issuer
	}
	audience := f.audience
	if s.Audience != "" {
		a, err := parseStringList(s.Audience)
		if err != nil {
			bad("audience", err)
		}
		audience = a
	}
	names := make([]string, 0, len(s.ClaimsToHeaders))
	for k := range s.ClaimsToHeaders {
		names = append(names, k)
	}
	sort.Strings(names)
	seen := map[string]string{}
	for _, claim := range names {
		h := strings.ToLower(s.ClaimsToHeaders[claim])
		switch {
		case claim == "":
			bad("claims_to_headers", errors.New("empty claim name"))
		case headers.ValidName(h) != nil || strings.HasPrefix(h, ":") || !headers.SetAllowed(h):
			bad("claims_to_headers", fmt.Errorf("claim %q: header %q cannot be set", claim, s.ClaimsToHeaders[claim]))
		case strings.ReplaceAll(h, "_", "-") == strings.ReplaceAll(p.header, "_", "-"):
			// The agent strips claim headers from the client's request, token and all.
			bad("claims_to_headers", fmt.Errorf("claim %q: header %q is the token header", claim, h))
		case seen[h] != "":
			bad("claims_to_headers", fmt.Errorf("claims %q and %q both set header %q", seen[h], claim, h))
		default:
			seen[h] = claim
			p.claimHeaders = append(p.claimHeaders, claimHeader{path: claim, header: h})
			p.owned = append(p.owned, h)
		}
	}

	keys, remoteURL, hmac, err := f.keySource(s)
	if err != nil {
		errs = append(errs, err)
	}
	algs := s.Algorithms
	if len(algs) == 0 {
		algs = f.algorithms
	}
	if len(algs) == 0 {
		algs = defaultAlgorithms
		if hmac {
			algs = defaultHMACAlgorithms
		}
	}
	if err := checkAlgorithms(algs, hmac); err != nil {
		bad("algorithms", err)
	}
	if sk, ok := keys.(staticKeys); ok && err == nil {
		if !anyFits(sk.set, algs) {
			bad("algorithms", fmt.Errorf("none of %v fits the configured key", algs))
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	if remoteURL != "" {
		// Taken last, so that metadata with an error starts no refresher.
		r, err := f.acquire(remoteURL)
		if err != nil {
			return nil, err
		}
		keys = r
	}
	p.keys = keys
	p.algs = make(map[string]bool, len(algs))
	for _, a := range algs {
		p.algs[a] = true
	}
	opts := []jwt.ParserOption{
		jwt.WithJSONNumber(),
		jwt.WithStrictDecoding(),
		jwt.WithLeeway(leeway),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
		jwt.WithTimeFunc(func() time.Time { return p.now() }),
	}
	if issuer != "" {
		opts = append(opts, jwt.WithIssuer(issuer))
	}
	if len(audience) > 0 {
		opts = append(opts, jwt.WithAudience(audience...))
	}
	p.parser = jwt.NewParser(opts...)
	p.missing = policy.Deny(401, "unauthorized", "bearer token required", map[string]string{"www-authenticate": "Bearer"})
	// Answers about a passing condition are never cached (policy.NotReusable): keys that
	// are unavailable or do not know the kid yet may be fetched a moment later, and a token
	// not valid yet becomes valid.
	p.unavailable = policy.NotReusable(policy.Deny(503, "jwks_unavailable", "signing keys unavailable", map[string]string{"retry-after": "1"}))
	for r := range p.invalid {
		phrase := phrases[r]
		p.invalid[r] = policy.Deny(401, "invalid_token", phrase, map[string]string{
			"www-authenticate": `Bearer error="invalid_token", error_description="` + phrase + `"`,
		})
		switch reason(r) {
		case reasonUnknownKey, reasonNotYetValid, reasonIssuedInFuture:
			p.invalid[r] = policy.NotReusable(p.invalid[r])
		}
	}
	return p, nil
}

// keySource returns the metadata's key source, or the agent config's when the metadata names
// none, and whether it is an HMAC secret. A jwks_url in the metadata is returned as remoteURL,
// checked but not yet acquired.
func (f *Factory) keySource(s Settings) (keys keyProvider, remoteURL string, hmac bool, err error) {
	n := 0
	for _, v := range []string{s.JWKSURL, s.JWKSFile, s.PublicKeyPEM} {
		if v != "" {
			n++
		}
	}
	switch {
	case n > 1:
		return nil, "", false, errors.New("key source: set at most one of jwks_url, jwks_file and public_key_pem")
	case n == 0 && f.defaultKeys == nil:
		return nil, "", false, errors.New("key source: none; set jwks_url, jwks_file or public_key_pem in the metadata or in the agent config")
	case n == 0:
		return f.defaultKeys, "", f.defaultHMAC, nil
	case s.JWKSURL != "":
		if err := checkJWKSURL(s.JWKSURL); err != nil {
			return nil, "", false, fmt.Errorf("jwks_url: %w", err)
		}
		return nil, s.JWKSURL, false, nil
	default:
		kp, err := staticSource(s.JWKSFile, s.PublicKeyPEM)
		if err != nil {
			return nil, "", false, fmt.Errorf("%s: %w", sourceName(s.JWKSFile), err)
		}
		return kp, "", false, nil
	}
}

func anyFits(set *keySet, algs []string) bool {
	fams := set.families()
	for _, a := range algs {
		if fams[algorithms[a]] {
			return true
		}
	}
	return false
}

// parseStringList reads a metadata value that is one string or a JSON list of strings.
func parseStringList(s string) ([]string, error) {
	t := strings.TrimSpace(s)
	if !strings.HasPrefix(t, "[") {
		return []string{s}, nil
	}
	var list []string
	if err := json.Unmarshal([]byte(t), &list); err != nil {
		return nil, fmt.Errorf("want a string or a JSON list of strings: %w", err)
	}
	if len(list) == 0 {
		return nil, errors.New("empty list")
	}
	if slices.Contains(list, "") {
		return nil, errors.New("empty string in list")
	}
	return list, nil
}

// reason is why a token was refused; each has a fixed phrase that never includes token data.
type reason uint8

const (
	reasonMalformed reason = iota
	reasonTooLarge
	reasonAlgorithm
	reasonUnknownKey
	reasonSignature
	reasonExpired
	reasonNotYetValid
	reasonIssuedInFuture
	reasonIssuer
	reasonAudience
	reasonMissingClaim
	reasonClaims
	reasonClaimValue
	numReasons
)

var phrases = [numReasons]string{
	reasonMalformed:      "malformed token",
	reasonTooLarge:       "token too large",
	reasonAlgorithm:      "signing algorithm not allowed",
	reasonUnknownKey:     "unknown signing key",
	reasonSignature:      "invalid signature",
	reasonExpired:        "token expired",
	reasonNotYetValid:    "token not valid yet",
	reasonIssuedInFuture: "token issued in the future",
	reasonIssuer:         "wrong issuer",
	reasonAudience:       "wrong audience",
	reasonMissingClaim:   "missing required claim",
	reasonClaims:         "invalid claims",
	reasonClaimValue:     "claim value cannot be forwarded",
}

// Errors of the key function, told apart by classify.
var (
	errAlgNotAllowed = errors.New("algorithm not allowed")
	errKeyMismatch   = errors.New("no key of the algorithm's type")
	errUnknownKID    = errors.New("unknown kid")
	errBadHeader     = errors.New("unsupported token header")
)

// classify maps a parse error to a reason; ok is false when the keys are unavailable.
func classify(err error) (r reason, ok bool) {
	switch {
	case errors.Is(err, errKeysUnavailable):
		return 0, false
	case errors.Is(err, errAlgNotAllowed), errors.Is(err, errKeyMismatch):
		return reasonAlgorithm, true
	case errors.Is(err, errUnknownKID):
		return reasonUnknownKey, true
	case errors.Is(err, errBadHeader), errors.Is(err, jwt.ErrTokenMalformed):
		return reasonMalformed, true
	case errors.Is(err, jwt.ErrTokenUnverifiable):
		// alg missing, or a name that no algorithm has.
		return reasonAlgorithm, true
	case errors.Is(err, jwt.ErrTokenSignatureInvalid):
		return reasonSignature, true
	case errors.Is(err, jwt.ErrInvalidType):
		return reasonClaims, true
	case errors.Is(err, jwt.ErrTokenExpired):
		return reasonExpired, true
	case errors.Is(err, jwt.ErrTokenNotValidYet):
		return reasonNotYetValid, true
	case errors.Is(err, jwt.ErrTokenUsedBeforeIssued):
		return reasonIssuedInFuture, true
	case errors.Is(err, jwt.ErrTokenInvalidIssuer):
		return reasonIssuer, true
	case errors.Is(err, jwt.ErrTokenInvalidAudience):
		return reasonAudience, true
	case errors.Is(err, jwt.ErrTokenRequiredClaimMissing):
		return reasonMissingClaim, true
	default:
		return reasonClaims, true
	}
}

// JWTValidation validates tokens with one compiled set of settings.
type JWTValidation struct {
	header       string
	prefix       string
	required     bool
	removeToken  bool
	maxToken     int
	maxClaims    int
	algs         map[string]bool
	keys         keyProvider
	parser       *jwt.Parser
	claimHeaders []claimHeader
	owned        []string // the claims_to_headers headers, stripped from the client's request
	now          func() time.Time
	// Denials are built once; their instructions are shared read-only.
	missing, unavailable policy.Result
	invalid              [numReasons]policy.Result
}

// CredentialNames names the token header, for the audit log to redact.
func (p *JWTValidation) CredentialNames() policy.Credentials {
	return policy.Credentials{Headers: []string{p.header}}
}

// Execute validates the request's token.
func (p *JWTValidation) Execute(ctx context.Context, c *policy.Context) (policy.Result, error) {
	tok, ok := p.token(c.Headers[p.header])
	if !ok {
		if p.required {
			return p.missing, nil
		}
		return policy.Result{}, nil
	}
	if len(tok) > p.maxToken {
		return p.invalid[reasonTooLarge], nil
	}
	claims := jwt.MapClaims{}
	if _, err := p.parser.ParseWithClaims(tok, claims, p.keyFunc(ctx)); err != nil {
		r, ok := classify(err)
		if !ok {
			return p.unavailable, nil
		}
		return p.invalid[r], nil
	}
	ins := make([]*agentv1.Instruction, 0, len(p.claimHeaders)+4)
	for _, ch := range p.claimHeaders {
		v, found := LookupClaim(claims, ch.path)
		val, ok := headerValue(v)
		switch {
		case !found || !ok:
			// The client must not be able to pass a value off as the token's.
			ins = append(ins, policy.RemoveHeader(ch.header))
		case headers.ValidValue(val) != nil:
			return p.invalid[reasonClaimValue], nil
		default:
			ins = append(ins, policy.SetHeader(ch.header, val))
		}
	}
	if p.removeToken {
		ins = append(ins, policy.RemoveHeader(p.header))
	}
	if sub, ok := claims["sub"].(string); ok && sub != "" {
		ins = append(ins, policy.SetState(StateUserID, sub))
	}
	enc, err := encodeClaims(claims, p.maxClaims)
	if err != nil {
		return policy.Result{}, fmt.Errorf("encode claims: %w", err)
	}
	ins = append(ins, policy.SetState(StateAuthMethod, "jwt"), policy.SetState(StateClaims, enc))
	r := policy.Allow(ins...)
	r.Metadata = map[string]string{StateAuthMethod: "jwt"}
	// A cached allow never outlives the token (exp is required by the parser).
	if exp, err := claims.GetExpirationTime(); err == nil && exp != nil {
		r.Expires = exp.Time
	} else {
		r = policy.NotReusable(r)
	}
	return r, nil
}

// OwnedRequestHeaders returns the claims_to_headers headers: whatever the client sent in them
// is removed on every request, also when required is false and the request carries no token.
func (p *JWTValidation) OwnedRequestHeaders() []string { return p.owned }

// token cuts the token out of the header value; false when there is none.
func (p *JWTValidation) token(v string) (string, bool) {
	if v == "" {
		return "", false
	}
	if p.prefix != "" {
		if len(v) < len(p.prefix) || !strings.EqualFold(v[:len(p.prefix)], p.prefix) {
			return "", false
		}
		v = v[len(p.prefix):]
	}
	v = strings.TrimSpace(v)
	return v, v != ""
}

// keyFunc picks the keys a token may be verified with. It is the only gate for the token's
// alg: the alg must be allowed, and only keys whose type fits it are returned.
func (p *JWTValidation) keyFunc(ctx context.Context) jwt.Keyfunc {
	return func(t *jwt.Token) (any, error) {
		alg := t.Method.Alg()
		if !p.algs[alg] {
			return nil, errAlgNotAllowed
		}
		if _, ok := t.Header["crit"]; ok {
			// RFC 7515 §4.1.11: extensions this policy does not understand must be refused.
			return nil, errBadHeader
		}
		var kid string
		if v, ok := t.Header["kid"]; ok {
			if kid, ok = v.(string); !ok {
				return nil, errBadHeader
			}
		}
		set, err := p.keys.keys(ctx)
		if err != nil {
			return nil, err
		}
		keys, known := set.candidates(kid, alg)
		if !known {
			if fresh := p.keys.refetch(); fresh != nil {
				keys, known = fresh.candidates(kid, alg)
			}
			if !known {
				return nil, errUnknownKID
			}
		}
		switch len(keys) {
		case 0:
			return nil, errKeyMismatch
		case 1:
			return keys[0], nil
		default:
			return jwt.VerificationKeySet{Keys: keys}, nil
		}
	}
}

// stringList is a JSON string or list of strings.
type stringList []string

// UnmarshalJSON implements json.Unmarshaler.
func (l *stringList) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		*l = stringList{s}
		return nil
	}
	var list []string
	if err := json.Unmarshal(b, &list); err != nil {
		return fmt.Errorf("want a string or a list of strings, got %s", b)
	}
	*l = list
	return nil
}

// duration is a Go duration string in the agent config, such as "30s".
type duration struct {
	d   time.Duration
	set bool
}

// UnmarshalJSON implements json.Unmarshaler.
func (d *duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("want a duration such as \"30s\", got %s", b)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("want a duration such as \"30s\", got %q", s)
	}
	d.d, d.set = v, true
	return nil
}

var (
	_ policy.Factory          = (*Factory)(nil)
	_ policy.HealthChecker    = (*Factory)(nil)
	_ io.Closer               = (*Factory)(nil)
	_ policy.Policy           = (*JWTValidation)(nil)
	_ policy.HeaderOwner      = (*JWTValidation)(nil)
	_ policy.CredentialReader = (*JWTValidation)(nil)
	_ keyProvider             = staticKeys{}
	_ keyProvider             = (*remoteKeys)(nil)
)
