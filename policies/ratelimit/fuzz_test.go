package ratelimit

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/secrets"
)

// FuzzForwardedFor checks the x-forwarded-for reading against a plain reference: split on
// commas, count from the right, trim, parse. The answer is "" or a canonical IP address.
func FuzzForwardedFor(f *testing.F) {
	f.Add("203.0.113.7", 1)
	f.Add("198.51.100.1, 203.0.113.7", 2)
	f.Add("spoofed, 198.51.100.1,203.0.113.7, 10.0.0.1", 3)
	f.Add("2001:DB8::1, ::ffff:192.0.2.1", 1)
	f.Add("fe80::1%eth0", 1)
	f.Add(",,,", 2)
	f.Fuzz(func(t *testing.T, xff string, hops int) {
		got := forwardedFor(xff, hops)
		want := ""
		if parts := strings.Split(xff, ","); xff != "" && hops >= 1 && hops <= len(parts) {
			if a, err := netip.ParseAddr(strings.Trim(parts[len(parts)-hops], " \t")); err == nil {
				want = a.WithZone("").Unmap().String()
			}
		}
		if got != want {
			t.Fatalf("forwardedFor(%q, %d) = %q, want %q", xff, hops, got, want)
		}
		if got != "" {
			a, err := netip.ParseAddr(got)
			if err != nil || a.String() != got || a.Is4In6() || a.Zone() != "" {
				t.Fatalf("forwardedFor(%q, %d) = %q: not a canonical address", xff, hops, got)
			}
		}
	})
}

// FuzzBuild decodes fuzzed metadata (the kernel's map<string,string>, here one "key=value"
// per line) and runs what compiles: Build never panics, a compiled limit is sane, and the
// first request of a fresh key is allowed.
func FuzzBuild(f *testing.F) {
	f.Add("requests_per_second=10\nburst=20")
	f.Add("requests_per_second=0.5\nkey=header:X-Tenant\non_missing_key=deny")
	f.Add("requests_per_second=1e9\nburst=1000000000\nkey=client_ip\ntrust_forwarded_for=2")
	f.Add("requests_per_second=3\nkey=state:user_id\nscope=partners\nresponse_headers=true")
	f.Add("requests_per_second=1\nbackend=redis\non_backend_error=deny")
	f.Add("requests_per_second=NaN")
	f.Add("requests_per_second=1e-300\nburst=1")
	f.Add("")
	f.Fuzz(func(t *testing.T, text string) {
		fac := &Factory{local: newLocalStore(1000, newManualClock().Now)}
		md := map[string]string{}
		for line := range strings.SplitSeq(text, "\n") {
			if k, v, ok := strings.Cut(line, "="); ok {
				md[k] = v
			}
		}
		p, err := fac.Build(md)
		if err != nil {
			return
		}
		rl := p.(*RateLimit)
		if rl.responseOnly {
			return
		}
		l := rl.limit
		if l.interval < 1 || l.burst < 1 || l.tau/l.burst != l.interval {
			t.Fatalf("metadata %q compiled to a broken limit %+v", md, l)
		}
		c := &policy.Context{
			Phase: agentv1.PolicyPhase_REQUEST, RouteName: "fuzz", ClientIP: "192.0.2.1",
			Headers: map[string]string{"x-forwarded-for": "203.0.113.1", "x-tenant": "t"},
			State:   map[string]string{"user_id": "u"},
		}
		r, err := p.Execute(context.Background(), c)
		if err != nil {
			t.Fatalf("metadata %q: Execute: %v", md, err)
		}
		if _, ok := rl.key.value(c); !ok && rl.onMissing == missingDeny {
			if immediate(r).GetStatusCode() != 429 {
				t.Fatalf("metadata %q: request without a key: got %v, want 429", md, r)
			}
			return
		}
		// A fresh store has every bucket full, so the first request passes.
		if r.Status != agentv1.StatusCode_OK {
			t.Fatalf("metadata %q: first request got %v", md, r)
		}
	})
}

// FuzzParseFields checks the parsing of the state value the response phase reads: no panic,
// and what parses formats back to the same text.
func FuzzParseFields(f *testing.F) {
	f.Add("10 9 1767225600000")
	f.Add("1 0 0")
	f.Add("10 11 1")
	f.Add("+1 0 0")
	f.Fuzz(func(t *testing.T, s string) {
		fl, ok := parseFields(s)
		if !ok {
			return
		}
		if fl.limit < 1 || fl.remaining < 0 || fl.remaining > fl.limit || fl.resetAtMS < 0 {
			t.Fatalf("parseFields(%q) accepted %+v", s, fl)
		}
		back, ok := parseFields(formatFields(fl))
		if !ok || back != fl {
			t.Fatalf("parseFields(%q) = %+v does not round-trip: %+v", s, fl, back)
		}
	})
}

// FuzzRedisConfig checks the redis section's validation on any JSON: it never panics, an
// accepted config is one the client can be made from (a known mode, addresses, bounded
// timeouts, a cluster prefix without braces, so that each key has one hash tag, the digest),
// and no error repeats the password. The TLS files are left out: reading arbitrary paths is
// not the point.
func FuzzRedisConfig(f *testing.F) {
	f.Add(`{"address": "127.0.0.1:6379", "password": "hunter2-secret"}`)
	f.Add(`{"mode": "sentinel", "master_name": "m", "addresses": ["a:1", "b:2"], "sentinel_password": "s3cret-pass"}`)
	f.Add(`{"mode": "cluster", "addresses": ["a:1"], "key_prefix": "x{y}:", "db": 1, "password": "p4ssword!"}`)
	f.Add(`{"mode": "cluster", "addresses": ["[::1]:7000", "h:65536"], "timeout_ms": -1, "dial_timeout_ms": 99999}`)
	f.Add(`{"address": "unix:///run/r.sock", "tls": {"server_name": "r"}}`)
	f.Fuzz(func(t *testing.T, raw string) {
		var c RedisConfig
		if err := json.Unmarshal([]byte(raw), &c); err != nil {
			return
		}
		if c.TLS != nil {
			c.TLS.CAFile, c.TLS.CertFile, c.TLS.KeyFile = "", "", ""
		}
		c.PasswordEnv = ""
		// The errors do not depend on the passwords (other than an unresolved reference).
		other := c
		if c.Password != "" && !secrets.IsRef(c.Password) {
			other.Password = "another password"
		}
		if c.SentinelPassword != "" && !secrets.IsRef(c.SentinelPassword) {
			other.SentinelPassword = "another password"
		}
		_, otherErr := other.setup()
		s, err := c.setup()
		if fmt.Sprint(err) != fmt.Sprint(otherErr) {
			t.Fatalf("the error depends on the password:\n%v\n%v", err, otherErr)
		}
		if err != nil {
			return
		}
		if len(s.addrs) == 0 || (s.mode != RedisSingle && s.mode != RedisSentinel && s.mode != RedisCluster) ||
			c.TimeoutMS < 1 || c.TimeoutMS > maxRedisTimeoutMS || c.DialTimeoutMS < 1 || c.DialTimeoutMS > maxRedisDialTimeoutMS {
			t.Fatalf("accepted %+v as %+v", c, s)
		}
		st := &redisStore{prefix: c.KeyPrefix, cluster: s.mode == RedisCluster}
		k := st.key("scope", "ident", kindValue, "v")
		if st.cluster && (strings.Count(k, "{") != 1 || !strings.HasSuffix(k, "}") || len(k) != len(c.KeyPrefix)+34) {
			t.Fatalf("cluster key %q: want one hash tag, the digest", k)
		}
		if !strings.HasPrefix(k, c.KeyPrefix) {
			t.Fatalf("key %q lacks the prefix %q", k, c.KeyPrefix)
		}
	})
}
