package ratelimit

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"github.com/policy-engine/policy-engine/agent/policy"
	"github.com/policy-engine/policy-engine/internal/logging"
)

// RedisConfig is agent_core.policies.config.rateLimit.redis: the Redis server that buckets
// with backend: redis share, so that every agent that uses it enforces one limit.
type RedisConfig struct {
	// Address is host:port, or a Unix socket path (absolute, or with a unix:// prefix).
	Address  string `json:"address"`
	Username string `json:"username"`
	// PasswordEnv names the environment variable that holds the password; the password
	// itself is never in a config file.
	PasswordEnv string `json:"password_env"`
	DB          int    `json:"db"`
	// TimeoutMS bounds one decision: dial, write and read. Past it the request is decided by
	// on_backend_error. A decision also ends early enough for the answer to reach the kernel
	// within the chain's deadline (policy.AnswerBy), whatever this says.
	TimeoutMS int `json:"timeout_ms"`
	// PoolSize is the most connections the agent opens; 0 means go-redis's default, ten per
	// CPU.
	PoolSize int `json:"pool_size"`
	// KeyPrefix starts every key the policy writes.
	KeyPrefix string `json:"key_prefix"`
}

// Defaults of the Redis settings.
const (
	DefaultRedisTimeoutMS = 20
	DefaultRedisKeyPrefix = "policy-engine:ratelimit:"
	maxRedisTimeoutMS     = 1000
)

// validate checks the settings, fills in defaults and reads the password.
func (c *RedisConfig) options() (*redis.Options, error) {
	var errs []error
	if c.Address == "" {
		errs = append(errs, errors.New("redis.address: required"))
	}
	if c.TimeoutMS == 0 {
		c.TimeoutMS = DefaultRedisTimeoutMS
	}
	if c.TimeoutMS < 0 || c.TimeoutMS > maxRedisTimeoutMS {
		errs = append(errs, fmt.Errorf("redis.timeout_ms: want 1 to %d, got %d", maxRedisTimeoutMS, c.TimeoutMS))
	}
	if c.DB < 0 {
		errs = append(errs, fmt.Errorf("redis.db: must not be negative, got %d", c.DB))
	}
	if c.PoolSize < 0 {
		errs = append(errs, fmt.Errorf("redis.pool_size: must not be negative, got %d", c.PoolSize))
	}
	if c.KeyPrefix == "" {
		c.KeyPrefix = DefaultRedisKeyPrefix
	}
	var password string
	if c.PasswordEnv != "" {
		v, ok := os.LookupEnv(c.PasswordEnv)
		if !ok || v == "" {
			errs = append(errs, fmt.Errorf("redis.password_env: environment variable %q is not set", c.PasswordEnv))
		}
		password = v
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	network, addr := "tcp", c.Address
	if p, ok := strings.CutPrefix(addr, "unix://"); ok {
		network, addr = "unix", p
	} else if strings.HasPrefix(addr, "/") {
		network = "unix"
	}
	timeout := time.Duration(c.TimeoutMS) * time.Millisecond
	return &redis.Options{
		Network:  network,
		Addr:     addr,
		Username: c.Username,
		Password: password,
		DB:       c.DB,
		// RESP2 and no CLIENT SETINFO: a new connection costs one round trip fewer, and
		// servers without HELLO answer the same.
		Protocol:        2,
		DisableIdentity: true,
		MaintNotificationsConfig: &maintnotifications.Config{
			Mode: maintnotifications.ModeDisabled,
		},
		// One attempt per decision: a retry could not finish within timeout_ms anyway, and
		// the caller's on_backend_error is the answer to a failure.
		MaxRetries:            -1,
		DialerRetries:         1,
		DialTimeout:           timeout,
		ReadTimeout:           timeout,
		WriteTimeout:          timeout,
		PoolTimeout:           timeout,
		ContextTimeoutEnabled: true,
		PoolSize:              c.PoolSize,
	}, nil
}

// key names the shared client in policy.Config.Shared: a reload with the same settings (and
// the same password) keeps the client and its connections.
func (c *RedisConfig) key(o *redis.Options) string {
	pw := sha256.Sum256([]byte(o.Password))
	return fmt.Sprintf("rateLimit/redis\x00%s\x00%s\x00%s\x00%x\x00%d\x00%d\x00%d",
		o.Network, o.Addr, o.Username, pw[:8], o.DB, c.TimeoutMS, c.PoolSize)
}

// gcraScript takes one request from a bucket kept in Redis, atomically, with the same GCRA
// as the local store. Time is the server's, so agents whose clocks differ still share one
// limit. The key holds the TAT in microseconds and expires when the bucket is full again, so
// idle keys disappear by themselves.
//
// ARGV: interval (µs per request, may be fractional), burst.
// Reply: {allowed (0/1), remaining, retry after (µs), reset (µs)}.
//
// A Lua number turns into a string with 14 significant digits, too few for a timestamp in
// microseconds, so the TAT is written with string.format.
const gcraScript = `
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tau = interval * burst
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then
  tat = math.max(tonumber(stored) or now, now)
end
local nexttat = tat + interval
local wait = nexttat - tau - now
if wait > 0 then
  return {0, 0, math.ceil(wait), math.ceil(tat - now)}
end
redis.call('SET', KEYS[1], string.format('%.0f', nexttat), 'PX', math.max(1, math.ceil((nexttat - now) / 1000)))
return {1, math.floor((tau - (nexttat - now)) / interval + 1e-6), 0, math.ceil(nexttat - now)}
`

var script = redis.NewScript(gcraScript)

// redisStore decides with buckets in Redis.
type redisStore struct {
	client  *redis.Client
	prefix  string
	timeout time.Duration
	log     *logging.Logger
	// failing is set from a failed decision until the next good one, so that the start and
	// the end of an outage are logged once each; errLog throttles the reports in between.
	failing atomic.Bool
	errLog  *logging.Throttle
}

// failed reports a failed decision: counted always, logged when an outage starts and then
// at most once per errLog interval. Errors name the server's address, never the password.
func (r *redisStore) failed(err error, action errorAction) {
	backendErrors[action].Inc()
	if r.failing.CompareAndSwap(false, true) {
		r.errLog.Allow() // the start is logged now; the interval counts from it
	} else if !r.errLog.Allow() {
		return
	}
	if ev := r.log.Warn(); ev != nil {
		ev.Str("policy", Name).Str("on_backend_error", action.String()).Str("error", err.Error()).
			Msg("rate-limit backend failed; deciding by on_backend_error")
	}
}

// succeeded notes a good decision, logging the end of an outage.
func (r *redisStore) succeeded() {
	if r.failing.Load() && r.failing.CompareAndSwap(true, false) {
		if ev := r.log.Info(); ev != nil {
			ev.Str("policy", Name).Msg("rate-limit backend answers again")
		}
	}
}

// redisLimit is a limit with its script arguments formatted once.
type redisLimit struct {
	interval string // microseconds
	burst    string
}

func newRedisLimit(l limit) redisLimit {
	return redisLimit{
		interval: strconv.FormatFloat(float64(l.interval)/1e3, 'f', -1, 64),
		burst:    strconv.FormatInt(l.burst, 10),
	}
}

// key names a bucket in Redis by a digest of its scope, limit, kind and key value: keys have
// a fixed length, and key values (which may be credentials) are not stored.
func (r *redisStore) key(scope, ident string, kind byte, value string) string {
	h := sha256.New()
	h.Write([]byte(scope))
	h.Write([]byte{0})
	h.Write([]byte(ident))
	h.Write([]byte{kind})
	h.Write([]byte(value))
	var sum [sha256.Size]byte
	return r.prefix + hex.EncodeToString(h.Sum(sum[:0])[:16])
}

// take runs the script, EVALSHA first and EVAL when Redis does not have it cached, within the
// store's timeout, and never past policy.AnswerBy(ctx): a Redis call that ran to the chain's
// deadline would reach the kernel after it gave up on the agent, and the kernel's fail_open
// would decide instead of on_backend_error.
func (r *redisStore) take(ctx context.Context, l limit, rl redisLimit, key string) (decision, error) {
	deadline := time.Now().Add(r.timeout)
	if by, ok := policy.AnswerBy(ctx); ok && by.Before(deadline) {
		deadline = by
	}
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	vals, err := script.Run(ctx, r.client, []string{key}, rl.interval, rl.burst).Int64Slice()
	if err != nil {
		return decision{}, fmt.Errorf("redis: %w", err)
	}
	if len(vals) != 4 {
		return decision{}, fmt.Errorf("redis: the script answered %d values, want 4", len(vals))
	}
	return decision{
		allowed:    vals[0] == 1,
		limit:      l.burst,
		remaining:  vals[1],
		retryAfter: time.Duration(vals[2]) * time.Microsecond,
		reset:      time.Duration(vals[3]) * time.Microsecond,
	}, nil
}

// ping checks that Redis answers.
func (r *redisStore) ping(ctx context.Context) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, r.timeout)
		defer cancel()
	}
	if err := r.client.Ping(ctx).Err(); err != nil {
		return fmt.Errorf("redis ping: %w", err)
	}
	return nil
}
