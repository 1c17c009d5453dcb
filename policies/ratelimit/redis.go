package ratelimit

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"github.com/policy-engine/policy-engine/agent/policy"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/secrets"
)

// RedisConfig is agent_core.policies.config.rateLimit.redis: the Redis that buckets with
// backend: redis share, so that every agent that uses it enforces one limit. It is one server,
// a master found through Sentinel, or a Redis Cluster.
type RedisConfig struct {
	// Mode is single (the default), sentinel or cluster.
	Mode string `json:"mode"`
	// Address is host:port, or a Unix socket path (absolute, or with a unix:// prefix); for
	// mode single only.
	Address string `json:"address"`
	// Addresses are the Sentinels (mode sentinel) or the seed nodes (mode cluster), host:port.
	Addresses []string `json:"addresses"`
	// MasterName is the name the Sentinels monitor the master under (mode sentinel).
	MasterName string `json:"master_name"`
	// Username and Password authenticate to the Redis servers (ACL user, or the default user
	// with requirepass). Password is normally a secret reference (${env:NAME}, ${file:/path}),
	// which the agent resolves when it loads the config.
	Username string `json:"username"`
	Password string `json:"password"`
	// PasswordEnv names the environment variable that holds the password: the older form of
	// password: ${env:NAME}.
	PasswordEnv string `json:"password_env"`
	// SentinelUsername and SentinelPassword authenticate to the Sentinels (mode sentinel);
	// Sentinels are often protected apart from the data nodes.
	SentinelUsername string `json:"sentinel_username"`
	SentinelPassword string `json:"sentinel_password"`
	DB               int    `json:"db"`
	// TLS, when present, encrypts every connection: to the servers and to the Sentinels.
	TLS *RedisTLSConfig `json:"tls"`
	// TimeoutMS bounds one decision: waiting for a connection, writing and reading. Past it
	// the request is decided by on_backend_error. A decision also ends early enough for the
	// answer to reach the kernel within the chain's deadline (policy.AnswerBy), whatever this
	// says.
	TimeoutMS int `json:"timeout_ms"`
	// DialTimeoutMS bounds opening one connection (TCP, TLS handshake, AUTH) and the
	// client's own queries to Sentinels and cluster nodes. Connections are opened in the
	// background: a decision waits for one at most TimeoutMS, and a dial that outlasts the
	// decision still fills the pool for the next.
	DialTimeoutMS int `json:"dial_timeout_ms"`
	// PoolSize is the most connections the agent opens to each server; 0 means go-redis's
	// default, ten per CPU.
	PoolSize int `json:"pool_size"`
	// KeyPrefix starts every key the policy writes.
	KeyPrefix string `json:"key_prefix"`
	// OverLimitCacheEntries bounds the keys refused by Redis that the agent remembers until
	// they would be allowed again, refusing them without a Redis call (overlimit.go); nil
	// means DefaultOverLimitCacheEntries, 0 turns the cache off.
	OverLimitCacheEntries *int `json:"over_limit_cache_entries"`
}

// RedisTLSConfig is redis.tls.
type RedisTLSConfig struct {
	// CAFile is a PEM file of the certificates that sign the servers'; empty means the
	// system's roots.
	CAFile string `json:"ca_file"`
	// CertFile and KeyFile are the client's certificate and key (PEM), for servers that
	// require client certificates (tls-auth-clients yes).
	CertFile string `json:"cert_file"`
	KeyFile  string `json:"key_file"`
	// ServerName is the name the servers' certificates must carry; empty means the host of
	// the address dialled.
	ServerName string `json:"server_name"`
}

// Redis modes.
const (
	RedisSingle   = "single"
	RedisSentinel = "sentinel"
	RedisCluster  = "cluster"
)

// Defaults and bounds of the Redis settings.
const (
	DefaultRedisTimeoutMS     = 20
	DefaultRedisDialTimeoutMS = 1000
	DefaultRedisKeyPrefix     = "policy-engine:ratelimit:"
	maxRedisTimeoutMS         = 1000
	maxRedisDialTimeoutMS     = 30000
)

// redisSetup is what New makes a client from: the validated settings with the secrets read.
type redisSetup struct {
	mode       string
	network    string
	addrs      []string
	password   string
	sentinelPW string
	tls        *tls.Config
	// tlsDigest is a digest of the TLS files' contents, so that a reload after a certificate
	// was renewed makes a new client.
	tlsDigest [sha256.Size]byte
}

// setup checks the settings, fills in defaults, and reads the password and the TLS files.
// Every problem is reported; none names a secret.
func (c *RedisConfig) setup() (*redisSetup, error) {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf("redis."+format, args...)) }
	s := &redisSetup{network: "tcp"}
	if c.Mode == "" {
		c.Mode = RedisSingle
	}
	s.mode = c.Mode
	checkHostPort := func(key, a string) {
		host, port, err := net.SplitHostPort(a)
		if err != nil || host == "" {
			bad("%s: want host:port, got %q", key, a)
			return
		}
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			bad("%s: want a port from 1 to 65535, got %q", key, a)
		}
	}
	switch c.Mode {
	case RedisSingle:
		if c.Address == "" {
			bad("address: required with mode single")
		}
		if len(c.Addresses) > 0 {
			bad("addresses: only for mode sentinel or cluster; mode single takes address")
		}
		addr := c.Address
		if p, ok := strings.CutPrefix(addr, "unix://"); ok {
			s.network, addr = "unix", p
		} else if strings.HasPrefix(addr, "/") {
			s.network = "unix"
		} else if addr != "" {
			checkHostPort("address", addr)
		}
		s.addrs = []string{addr}
	case RedisSentinel, RedisCluster:
		if c.Address != "" {
			bad("address: only for mode single; mode %s takes addresses", c.Mode)
		}
		if len(c.Addresses) == 0 {
			what := "the Sentinels"
			if c.Mode == RedisCluster {
				what = "seed nodes of the cluster"
			}
			bad("addresses: required with mode %s: %s, host:port", c.Mode, what)
		}
		seen := make(map[string]bool, len(c.Addresses))
		for i, a := range c.Addresses {
			checkHostPort(fmt.Sprintf("addresses[%d]", i), a)
			if seen[a] {
				bad("addresses[%d]: %q is listed twice", i, a)
			}
			seen[a] = true
		}
		s.addrs = c.Addresses
	default:
		bad("mode: want single, sentinel or cluster, got %q", c.Mode)
	}
	if c.Mode == RedisSentinel {
		if c.MasterName == "" {
			bad("master_name: required with mode sentinel")
		}
	} else {
		if c.MasterName != "" {
			bad("master_name: only for mode sentinel")
		}
		if c.SentinelUsername != "" || c.SentinelPassword != "" {
			bad("sentinel_username, sentinel_password: only for mode sentinel")
		}
	}
	if c.Mode == RedisCluster {
		if c.DB != 0 {
			bad("db: a Redis Cluster has only database 0, got %d", c.DB)
		}
		// Redis hashes only the part of a key between the first { and the next }: braces in
		// the prefix would put every bucket in one slot, on one node.
		if strings.ContainsAny(c.KeyPrefix, "{}") {
			bad("key_prefix: must not contain { or } with mode cluster (they would put every bucket in one hash slot), got %q", c.KeyPrefix)
		}
	}
	if n := c.OverLimitCacheEntries; n != nil && (*n < 0 || *n > maxOverLimitCacheEntries) {
		bad("over_limit_cache_entries: must be from 0 (off) to %d, got %d", maxOverLimitCacheEntries, *n)
	}
	if c.TimeoutMS == 0 {
		c.TimeoutMS = DefaultRedisTimeoutMS
	}
	if c.TimeoutMS < 0 || c.TimeoutMS > maxRedisTimeoutMS {
		bad("timeout_ms: want 1 to %d, got %d", maxRedisTimeoutMS, c.TimeoutMS)
	}
	if c.DialTimeoutMS == 0 {
		c.DialTimeoutMS = DefaultRedisDialTimeoutMS
	}
	if c.DialTimeoutMS < 0 || c.DialTimeoutMS > maxRedisDialTimeoutMS {
		bad("dial_timeout_ms: want 1 to %d, got %d", maxRedisDialTimeoutMS, c.DialTimeoutMS)
	}
	if c.DB < 0 {
		bad("db: must not be negative, got %d", c.DB)
	}
	if c.PoolSize < 0 {
		bad("pool_size: must not be negative, got %d", c.PoolSize)
	}
	if c.KeyPrefix == "" {
		c.KeyPrefix = DefaultRedisKeyPrefix
	}
	// The agent resolves secret references when it loads its config file; one still here
	// was not resolved (a config that did not come from a file), and is refused rather than
	// sent as a password.
	for key, v := range map[string]string{"password": c.Password, "sentinel_password": c.SentinelPassword} {
		if secrets.IsRef(v) {
			bad("%s: the secret reference %s was not resolved", key, v)
		}
	}
	s.password, s.sentinelPW = c.Password, c.SentinelPassword
	if c.PasswordEnv != "" {
		if c.Password != "" {
			bad("password_env: set password or password_env, not both")
		}
		v, ok := os.LookupEnv(c.PasswordEnv)
		if !ok || v == "" {
			bad("password_env: environment variable %q is not set", c.PasswordEnv)
		}
		s.password = v
	}
	if c.TLS != nil {
		if s.network == "unix" {
			bad("tls: not for a Unix socket address")
		}
		cfg, digest, err := c.TLS.config()
		if err != nil {
			errs = append(errs, err)
		}
		s.tls, s.tlsDigest = cfg, digest
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return s, nil
}

// config reads the TLS files. Errors name the files, never their contents.
func (c *RedisTLSConfig) config() (*tls.Config, [sha256.Size]byte, error) {
	var errs []error
	h := sha256.New()
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: c.ServerName}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			errs = append(errs, fmt.Errorf("redis.tls.ca_file: %w", err))
		} else {
			h.Write(pem)
			cfg.RootCAs = x509.NewCertPool()
			if !cfg.RootCAs.AppendCertsFromPEM(pem) {
				errs = append(errs, fmt.Errorf("redis.tls.ca_file: %s holds no PEM certificate", c.CAFile))
			}
		}
	}
	h.Write([]byte{0})
	switch {
	case c.CertFile != "" && c.KeyFile != "":
		certPEM, err1 := os.ReadFile(c.CertFile)
		keyPEM, err2 := os.ReadFile(c.KeyFile)
		if err1 != nil {
			errs = append(errs, fmt.Errorf("redis.tls.cert_file: %w", err1))
		}
		if err2 != nil {
			errs = append(errs, fmt.Errorf("redis.tls.key_file: %w", err2))
		}
		if err1 == nil && err2 == nil {
			h.Write(certPEM)
			h.Write([]byte{0})
			h.Write(keyPEM)
			cert, err := tls.X509KeyPair(certPEM, keyPEM)
			if err != nil {
				// The error of X509KeyPair describes the PEM blocks, never the key.
				errs = append(errs, fmt.Errorf("redis.tls.cert_file, key_file: %s and %s: %w", c.CertFile, c.KeyFile, err))
			}
			cfg.Certificates = []tls.Certificate{cert}
		}
	case c.CertFile != "" || c.KeyFile != "":
		errs = append(errs, errors.New("redis.tls.cert_file, key_file: set both or neither"))
	}
	var sum [sha256.Size]byte
	h.Sum(sum[:0])
	if len(errs) > 0 {
		return nil, sum, errors.Join(errs...)
	}
	return cfg, sum, nil
}

// key names the shared client in policy.Config.Shared: a reload with the same settings (and
// the same passwords and TLS files) keeps the client and its connections; any change makes a
// new one. Secrets go in as digests.
func (c *RedisConfig) key(s *redisSetup) string {
	pw := sha256.Sum256([]byte(s.password + "\x00" + s.sentinelPW))
	id, _ := json.Marshal([]any{s.mode, s.network, s.addrs, c.MasterName, c.Username, c.SentinelUsername,
		hex.EncodeToString(pw[:8]), c.DB, c.TimeoutMS, c.DialTimeoutMS, c.PoolSize,
		c.TLS != nil, tlsServerName(c.TLS), hex.EncodeToString(s.tlsDigest[:8])})
	return "rateLimit/redis\x00" + string(id)
}

func tlsServerName(c *RedisTLSConfig) string {
	if c == nil {
		return ""
	}
	return c.ServerName
}

// newClient makes the client of the mode. go-redis dials lazily: making it opens no
// connection, so an agent starts while Redis is away and decides by on_backend_error until
// Redis answers.
func (c *RedisConfig) newClient(s *redisSetup) redis.UniversalClient {
	timeout := time.Duration(c.TimeoutMS) * time.Millisecond
	dial := time.Duration(c.DialTimeoutMS) * time.Millisecond
	maint := &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}
	switch s.mode {
	case RedisSentinel:
		return redis.NewFailoverClient(&redis.FailoverOptions{
			MasterName:       c.MasterName,
			SentinelAddrs:    s.addrs,
			SentinelUsername: c.SentinelUsername,
			SentinelPassword: s.sentinelPW,
			Username:         c.Username,
			Password:         s.password,
			DB:               c.DB,
			Protocol:         2,
			DisableIdentity:  true,
			MaxRetries:       -1,
			DialerRetries:    1,
			DialTimeout:      dial,
			// Reads and writes of a decision are bounded by its context (timeout_ms);
			// these bound the client's own queries (to the Sentinels, AUTH on a new
			// connection), which have no context deadline.
			ReadTimeout:           dial,
			WriteTimeout:          dial,
			PoolTimeout:           timeout,
			ContextTimeoutEnabled: true,
			PoolSize:              c.PoolSize,
			TLSConfig:             s.tls,
		})
	case RedisCluster:
		cc := redis.NewClusterClient(&redis.ClusterOptions{
			Addrs:           s.addrs,
			Username:        c.Username,
			Password:        s.password,
			Protocol:        2,
			DisableIdentity: true,
			// MOVED and ASK are followed (MaxRedirects, default 3) within the decision's
			// deadline; nothing else is retried.
			MaxRetries:            -1,
			DialerRetries:         1,
			DialTimeout:           dial,
			ReadTimeout:           dial,
			WriteTimeout:          dial,
			PoolTimeout:           timeout,
			ContextTimeoutEnabled: true,
			PoolSize:              c.PoolSize,
			TLSConfig:             s.tls,
			// The routing policies look up COMMAND's reply on the first call, for up to
			// 5 s whatever the decision's deadline; the script's one key routes it alone.
			DisableRoutingPolicies:   true,
			MaintNotificationsConfig: maint,
		})
		// Load the slot map in the background now: until it is there, every decision
		// loads it itself, and an agent that starts under traffic would send Redis as many
		// CLUSTER SLOTS as it has requests in flight. A failure (Redis down) is left to
		// the decisions, which retry it.
		cc.ReloadState(context.Background())
		return cc
	}
	return redis.NewClient(&redis.Options{
		Network:  s.network,
		Addr:     s.addrs[0],
		Username: c.Username,
		Password: s.password,
		DB:       c.DB,
		// RESP2 and no CLIENT SETINFO: a new connection costs one round trip fewer, and
		// servers without HELLO answer the same.
		Protocol:                 2,
		DisableIdentity:          true,
		MaintNotificationsConfig: maint,
		// One attempt per decision: a retry could not finish within timeout_ms anyway, and
		// the caller's on_backend_error is the answer to a failure.
		MaxRetries:            -1,
		DialerRetries:         1,
		DialTimeout:           dial,
		ReadTimeout:           dial,
		WriteTimeout:          dial,
		PoolTimeout:           timeout,
		ContextTimeoutEnabled: true,
		PoolSize:              c.PoolSize,
		TLSConfig:             s.tls,
	})
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
	client redis.UniversalClient
	prefix string
	// cluster puts each key's digest in a hash tag, {…}: the slot is the digest's, whatever
	// the prefix, and every key a script touches is in it.
	cluster bool
	timeout time.Duration
	log     *logging.Logger
	// failing is set from a failed decision until the next good one, so that the start and
	// the end of an outage are logged once each; errLog throttles the reports in between.
	failing atomic.Bool
	errLog  *logging.Throttle
	// overLimit remembers the keys Redis refused; nil when off.
	overLimit *overLimitCache
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
// a fixed length, and key values (which may be credentials) are not stored. In cluster mode
// the digest is a hash tag: <prefix>{<digest>}.
func (r *redisStore) key(scope, ident string, kind byte, value string) string {
	h := sha256.New()
	h.Write([]byte(scope))
	h.Write([]byte{0})
	h.Write([]byte(ident))
	h.Write([]byte{kind})
	h.Write([]byte(value))
	var sum [sha256.Size]byte
	digest := h.Sum(sum[:0])[:16]
	var b strings.Builder
	b.Grow(len(r.prefix) + 2 + 2*len(digest))
	b.WriteString(r.prefix)
	if r.cluster {
		b.WriteByte('{')
	}
	var hx [32]byte
	hex.Encode(hx[:], digest)
	b.Write(hx[:])
	if r.cluster {
		b.WriteByte('}')
	}
	return b.String()
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

// ping checks that Redis answers: the server, the master the Sentinels name, or every
// master of the cluster (a bucket may be on any of them).
func (r *redisStore) ping(ctx context.Context) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, r.timeout)
		defer cancel()
	}
	var err error
	if cc, ok := r.client.(*redis.ClusterClient); ok {
		err = cc.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error {
			if err := c.Ping(ctx).Err(); err != nil {
				return fmt.Errorf("%s: %w", c.Options().Addr, err)
			}
			return nil
		})
	} else {
		err = r.client.Ping(ctx).Err()
	}
	if err != nil {
		return fmt.Errorf("redis ping: %w", err)
	}
	return nil
}
