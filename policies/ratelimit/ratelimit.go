// Package ratelimit is the rateLimit policy: a token bucket per key (client IP, a header, a
// state value set by an earlier policy, or the route), kept in the agent's memory or in Redis
// so that several agents share one limit. A request over the limit gets 429 with Retry-After
// and the RateLimit header fields; a request within it can carry the same fields on its
// response.
//
// The bucket is GCRA, the generic cell rate algorithm: one timestamp per key, equivalent to a
// token bucket of burst tokens refilled at requests_per_second. docs/policies/rateLimit.md
// describes every setting.
package ratelimit

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
)

// Name is the policy's name in chains.
const Name = "rateLimit"

// DefaultMaxLocalBuckets bounds the local store when the agent config does not.
const DefaultMaxLocalBuckets = 100000

// maxRequestsPerSecond bounds requests_per_second: above it a request would cost less than a
// nanosecond.
const maxRequestsPerSecond = 1e9

// maxBurst bounds burst, so that a bucket's refill time fits its arithmetic.
const maxBurst = 1e9

// stateKey is the SET_STATE key that carries the RateLimit fields from the request phase to
// the response phase: "<limit> <remaining> <reset as Unix milliseconds>".
const stateKey = "ratelimit"

const schema = `{"$schema":"https://json-schema.org/draft/2020-12/schema","type":"object","additionalProperties":false,` +
	`"description":"A token bucket per key. An entry with no metadata only copies the RateLimit fields of the request phase onto the response.",` +
	`"anyOf":[{"required":["requests_per_second"]},{"maxProperties":0}],"properties":{` +
	`"requests_per_second":{"type":"number","exclusiveMinimum":0,"maximum":1e9,"description":"refill rate of each bucket"},` +
	`"burst":{"type":"integer","minimum":1,"maximum":1e9,"description":"bucket size: requests allowed at once; default ceil(requests_per_second)"},` +
	`"key":{"type":"string","default":"client_ip","pattern":"^(client_ip|route|header:[!#$%&'*+.^_|~0-9A-Za-z-]+|state:.+)$","description":"what names a bucket: client_ip, route, header:<name> or state:<key>"},` +
	`"trust_forwarded_for":{"type":"integer","minimum":0,"maximum":64,"default":0,"description":"for client_ip: take the address this many entries from the right of x-forwarded-for (Envoy's xff_num_trusted_hops); 0 uses the connection's address"},` +
	`"on_missing_key":{"enum":["shared","allow","deny"],"default":"shared","description":"a request without a key value: one bucket shared by all such requests, no limit, or 429"},` +
	`"scope":{"type":"string","description":"bucket namespace; default: the route name, so that routes do not share buckets"},` +
	`"backend":{"enum":["local","redis"],"default":"local","description":"where buckets live: this agent's memory, or the Redis of the agent config"},` +
	`"on_backend_error":{"enum":["local","allow","deny"],"default":"local","description":"when Redis fails or is slower than its timeout: decide with the local bucket, allow, or answer 503"},` +
	`"response_headers":{"type":"boolean","default":false,"description":"send RateLimit-Limit, -Remaining and -Reset on allowed responses (needs rateLimit in the response chain too)"}}}`

func init() {
	policy.Register(policy.Module{
		Name:        Name,
		Version:     "1.0.0",
		Description: "Limits request rates with a token bucket per client, header, state value or route, in memory or in Redis.",
		Phases:      policy.Both,
		Enforces:    true,
		// In the response phase it reads only the response and the state.
		ResponseIgnoresRequest: true,
		MetadataSchema:         schema,
		New:                    New,

		NotCacheable: "it counts every request",
	})
}

// Config is agent_core.policies.config.rateLimit.
type Config struct {
	// MaxLocalBuckets bounds the buckets of the agent's memory store.
	MaxLocalBuckets int `json:"max_local_buckets"`
	// Redis is the server for backend: redis; absent, that backend is unavailable.
	Redis *RedisConfig `json:"redis"`
}

// Factory holds what the policies of one config share: the local store and the Redis client,
// both kept in policy.Config.Shared across reloads and released by Close.
type Factory struct {
	local     *localStore
	redis     *redisStore
	release   []func()
	closeOnce sync.Once
}

// New makes the factory from the policy's agent config section.
func New(c policy.Config) (policy.Factory, error) {
	cfg := Config{MaxLocalBuckets: DefaultMaxLocalBuckets}
	if err := c.Decode(&cfg); err != nil {
		return nil, err
	}
	var errs []error
	if cfg.MaxLocalBuckets < 1 {
		errs = append(errs, fmt.Errorf("max_local_buckets: must be positive, got %d", cfg.MaxLocalBuckets))
	}
	var rs *redisSetup
	if cfg.Redis != nil {
		var err error
		if rs, err = cfg.Redis.setup(); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	shared := c.Shared
	if shared == nil {
		shared = &sync.Map{}
	}
	f := &Factory{}
	local, release := acquire(shared, "rateLimit/local\x00"+strconv.Itoa(cfg.MaxLocalBuckets), func() (*localStore, func()) {
		return startLocalStore(int64(cfg.MaxLocalBuckets))
	})
	f.local = local
	f.release = append(f.release, release)
	if rs != nil {
		if c.Log != nil {
			goRedisLog.Store(c.Log)
		}
		// go-redis dials lazily: making the client opens no connection.
		client, release := acquire(shared, cfg.Redis.key(rs), func() (redis.UniversalClient, func()) {
			cl := cfg.Redis.newClient(rs)
			return cl, func() { _ = cl.Close() }
		})
		f.release = append(f.release, release)
		f.redis = &redisStore{
			client:  client,
			cluster: rs.mode == RedisCluster,
			prefix:  cfg.Redis.KeyPrefix,
			timeout: time.Duration(cfg.Redis.TimeoutMS) * time.Millisecond,
			log:     c.Log,
			errLog:  logging.NewThrottle(10 * time.Second),
		}
		n := DefaultOverLimitCacheEntries
		if cfg.Redis.OverLimitCacheEntries != nil {
			n = *cfg.Redis.OverLimitCacheEntries
		}
		f.redis.overLimit = newOverLimitCache(n)
	}
	return f, nil
}

// Close drops the factory's references to the shared store and client; the last reference
// stops the store's clock and closes the client.
func (f *Factory) Close() error {
	f.closeOnce.Do(func() {
		for _, r := range f.release {
			r()
		}
	})
	return nil
}

// HealthCheck pings Redis when it is configured, so that the agent's readiness shows it.
func (f *Factory) HealthCheck(ctx context.Context) error {
	if f.redis == nil {
		return nil
	}
	return f.redis.ping(ctx)
}

// Settings are a chain entry's metadata.
type Settings struct {
	RequestsPerSecond float64 `json:"requests_per_second"`
	Burst             int64   `json:"burst"`
	Key               string  `json:"key"`
	TrustForwardedFor int     `json:"trust_forwarded_for"`
	OnMissingKey      string  `json:"on_missing_key"`
	Scope             string  `json:"scope"`
	Backend           string  `json:"backend"`
	OnBackendError    string  `json:"on_backend_error"`
	ResponseHeaders   bool    `json:"response_headers"`
}

type missingAction uint8

const (
	missingShared missingAction = iota
	missingAllow
	missingDeny
)

type errorAction uint8

const (
	errorLocal errorAction = iota
	errorAllow
	errorDeny
)

func (a errorAction) String() string {
	switch a {
	case errorAllow:
		return "allow"
	case errorDeny:
		return "deny"
	}
	return "local"
}

// Build compiles a chain entry's metadata. Empty metadata makes an entry for the response
// chain that only adds the RateLimit fields recorded in the request phase.
func (f *Factory) Build(md map[string]string) (policy.Policy, error) {
	if len(md) == 0 {
		return &RateLimit{responseOnly: true, local: f.local}, nil
	}
	var s Settings
	if err := policy.DecodeMetadata(md, &s); err != nil {
		return nil, err
	}
	return f.build(s, md)
}

func (f *Factory) build(s Settings, md map[string]string) (*RateLimit, error) {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	rps := s.RequestsPerSecond
	switch _, set := md["requests_per_second"]; {
	case !set:
		bad("requests_per_second: required")
	case !(rps > 0) || math.IsInf(rps, 0) || rps > maxRequestsPerSecond:
		bad("requests_per_second: want a number above 0 and at most %g, got %v", float64(maxRequestsPerSecond), md["requests_per_second"])
	}
	if _, set := md["burst"]; set && (s.Burst < 1 || s.Burst > maxBurst) {
		bad("burst: want 1 to %d, got %d", int64(maxBurst), s.Burst)
	}
	key, err := parseKey(s.Key, s.TrustForwardedFor)
	if err != nil {
		errs = append(errs, err)
	}
	p := &RateLimit{key: key, scope: s.Scope, headers: s.ResponseHeaders, local: f.local}
	switch s.OnMissingKey {
	case "", "shared":
		p.onMissing = missingShared
	case "allow":
		p.onMissing = missingAllow
	case "deny":
		p.onMissing = missingDeny
	default:
		bad("on_missing_key: want shared, allow or deny, got %q", s.OnMissingKey)
	}
	switch s.Backend {
	case "", "local":
	case "redis":
		if f.redis == nil {
			bad("backend: redis needs agent_core.policies.config.rateLimit.redis in the agent config")
		}
		p.redis = f.redis
	default:
		bad("backend: want local or redis, got %q", s.Backend)
	}
	switch s.OnBackendError {
	case "", "local":
		p.onError = errorLocal
	case "allow":
		p.onError = errorAllow
	case "deny":
		p.onError = errorDeny
	default:
		bad("on_backend_error: want local, allow or deny, got %q", s.OnBackendError)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	burst := s.Burst
	if burst == 0 {
		burst = int64(math.Ceil(rps))
	}
	if float64(burst)/rps > float64(math.MaxInt64/4)/1e9 {
		return nil, fmt.Errorf("burst: %d requests at %v per second take too long to refill", burst, rps)
	}
	// The local store's clock advances in steps; a bucket must hold at least one step's
	// worth of tokens, or the rest of each step's refill is lost.
	usesLocal := p.redis == nil || p.onError == errorLocal
	if step := rps * clockResolution.Seconds(); usesLocal && float64(burst) < step {
		return nil, fmt.Errorf("burst: %d is below the %v requests that refill in the local clock's %v step; set burst to at least %d",
			burst, step, clockResolution, int64(math.Ceil(step)))
	}
	p.limit = newLimit(rps, burst)
	p.rlimit = newRedisLimit(p.limit)
	p.ident = strconv.FormatFloat(rps, 'g', -1, 64) + "/" + strconv.FormatInt(burst, 10) + "/" + key.String()
	p.missingDenial = policy.Deny(429, "rate_limit_key_missing", "the request has no value for the rate-limit key "+key.String(), nil)
	p.unavailable = policy.Deny(503, "rate_limit_unavailable", "the rate-limit backend is unavailable", map[string]string{"retry-after": "1"})
	return p, nil
}

// RateLimit is one compiled chain entry.
type RateLimit struct {
	limit  limit
	rlimit redisLimit
	// ident is the limit's identity in bucket names: rate, burst and key. Entries with the
	// same scope and identity share buckets; entries that differ never do.
	ident     string
	key       keySpec
	scope     string
	onMissing missingAction
	onError   errorAction
	headers   bool
	local     *localStore
	redis     *redisStore // nil for backend: local
	// responseOnly is an entry without metadata: it only writes the response's fields.
	responseOnly bool
	// Denials that do not vary are built once and shared read-only.
	missingDenial, unavailable policy.Result
}

var errResponseOnly = errors.New("rateLimit without metadata only adds the RateLimit fields in the response phase; a request-phase entry needs requests_per_second")

// Execute decides on a request, or in the response phase adds the RateLimit fields.
func (p *RateLimit) Execute(ctx context.Context, c *policy.Context) (policy.Result, error) {
	if c.Phase == agentv1.PolicyPhase_RESPONSE {
		return responseFields(c, p.local.now()), nil
	}
	if p.responseOnly {
		return policy.Result{}, errResponseOnly
	}
	scope := p.scope
	if scope == "" {
		scope = c.RouteName
	}
	value, ok := p.key.value(c)
	kind := kindValue
	if !ok {
		switch p.onMissing {
		case missingAllow:
			return policy.Result{}, nil
		case missingDeny:
			return p.missingDenial, nil
		}
		kind = kindMissing
	}
	d, failed := p.decide(ctx, scope, kind, value)
	if failed {
		return p.unavailable, nil
	}
	if !d.allowed {
		return policy.Deny(429, "rate_limited", "rate limit exceeded", map[string]string{
			"retry-after":         strconv.FormatInt(ceilSeconds(d.retryAfter), 10),
			"ratelimit-limit":     strconv.FormatInt(d.limit, 10),
			"ratelimit-remaining": "0",
			"ratelimit-reset":     strconv.FormatInt(ceilSeconds(d.reset), 10),
		}), nil
	}
	if !p.headers {
		return policy.Result{}, nil
	}
	if in := p.recordFields(c, d); in != nil {
		return policy.Allow(in), nil
	}
	return policy.Result{}, nil
}

// decide takes one request from the key's bucket. failed is true when Redis failed and
// on_backend_error is deny; an error with allow returns an allowed decision without fields.
func (p *RateLimit) decide(ctx context.Context, scope string, kind byte, value string) (d decision, failed bool) {
	if p.redis != nil {
		key := p.redis.key(scope, p.ident, kind, value)
		var start int64
		if ol := p.redis.overLimit; ol != nil {
			start = ol.now().UnixNano()
			if d, ok := ol.refused(key, p.limit, start); ok {
				return d, false
			}
		}
		d, err := p.redis.take(ctx, p.limit, p.rlimit, key)
		if err == nil {
			p.redis.succeeded()
			p.redis.overLimit.remember(key, d, start)
			return d, false
		}
		p.redis.failed(err, p.onError)
		switch p.onError {
		case errorAllow:
			return decision{allowed: true, limit: -1}, false
		case errorDeny:
			return decision{}, true
		}
	}
	if kind == kindMissing {
		return p.local.takeMissing(p.limit, scope, p.ident), false
	}
	return p.local.take(p.limit, scope, p.ident, value), false
}

// recordFields returns the SET_STATE instruction that carries d's fields to the response
// phase. When an earlier rateLimit entry of the chain recorded fields, the more restrictive
// of the two is kept: fewer requests remaining, or else the later reset.
func (p *RateLimit) recordFields(c *policy.Context, d decision) *agentv1.Instruction {
	if d.limit < 0 {
		// Allowed because Redis failed: nothing is known about the bucket.
		return nil
	}
	// Rounded down, so that the response phase, which rounds its seconds up, never reports
	// a reset later than the bucket's.
	resetAt := (p.local.now() + int64(d.reset)) / int64(time.Millisecond)
	if prev, ok := parseFields(c.State[stateKey]); ok {
		if prev.remaining < d.remaining || (prev.remaining == d.remaining && prev.resetAtMS >= resetAt) {
			return nil
		}
	}
	return policy.SetState(stateKey, formatFields(fields{limit: d.limit, remaining: d.remaining, resetAtMS: resetAt}))
}

// fields are the RateLimit header fields as recorded between the phases.
type fields struct {
	limit, remaining, resetAtMS int64
}

func formatFields(f fields) string {
	b := make([]byte, 0, 40)
	b = strconv.AppendInt(b, f.limit, 10)
	b = append(b, ' ')
	b = strconv.AppendInt(b, f.remaining, 10)
	b = append(b, ' ')
	b = strconv.AppendInt(b, f.resetAtMS, 10)
	return string(b)
}

// parseFields parses a recorded state value; anything malformed is ignored.
func parseFields(s string) (fields, bool) {
	var f fields
	a, rest, ok1 := strings.Cut(s, " ")
	b, c, ok2 := strings.Cut(rest, " ")
	if !ok1 || !ok2 {
		return f, false
	}
	var err1, err2, err3 error
	f.limit, err1 = strconv.ParseInt(a, 10, 64)
	f.remaining, err2 = strconv.ParseInt(b, 10, 64)
	f.resetAtMS, err3 = strconv.ParseInt(c, 10, 64)
	if err1 != nil || err2 != nil || err3 != nil || f.limit < 1 || f.remaining < 0 || f.remaining > f.limit || f.resetAtMS < 0 {
		return fields{}, false
	}
	return f, true
}

// responseFields sets the RateLimit fields recorded in the request phase on the response.
// The reset is counted from now, so the upstream's time is not reported twice.
func responseFields(c *policy.Context, now int64) policy.Result {
	f, ok := parseFields(c.State[stateKey])
	if !ok {
		return policy.Result{}
	}
	reset := max(time.Duration(f.resetAtMS*int64(time.Millisecond)-now), 0)
	return policy.Allow(
		policy.SetHeader("ratelimit-limit", strconv.FormatInt(f.limit, 10)),
		policy.SetHeader("ratelimit-remaining", strconv.FormatInt(f.remaining, 10)),
		policy.SetHeader("ratelimit-reset", strconv.FormatInt(ceilSeconds(reset), 10)),
	)
}

// ceilSeconds rounds a duration up to whole seconds, as delta-seconds fields need.
func ceilSeconds(d time.Duration) int64 {
	if d <= 0 {
		return 0
	}
	return int64((d + time.Second - 1) / time.Second)
}

var (
	_ policy.Factory       = (*Factory)(nil)
	_ policy.HealthChecker = (*Factory)(nil)
	_ io.Closer            = (*Factory)(nil)
	_ policy.Policy        = (*RateLimit)(nil)
)
