package ratelimit

import (
	"testing"

	"github.com/policy-engine/policy-engine/agent/policy"
)

func TestForwardedFor(t *testing.T) {
	f := func(xff string, hops int, want string) {
		t.Helper()
		if got := forwardedFor(xff, hops); got != want {
			t.Fatalf("forwardedFor(%q, %d) = %q, want %q", xff, hops, got, want)
		}
	}
	// The entry hops from the right: what the trusted proxies saw.
	f("203.0.113.7", 1, "203.0.113.7")
	f("198.51.100.1, 203.0.113.7", 1, "203.0.113.7")
	f("198.51.100.1, 203.0.113.7", 2, "198.51.100.1")
	f("spoofed, 198.51.100.1,203.0.113.7, 10.0.0.1", 3, "198.51.100.1")
	f(" \t192.0.2.1 \t", 1, "192.0.2.1")
	// IPv6 in canonical form; mapped IPv4 as IPv4; zones dropped.
	f("2001:DB8:0:0::1", 1, "2001:db8::1")
	f("::ffff:192.0.2.1", 1, "192.0.2.1")
	f("fe80::1%eth0", 1, "fe80::1")
	// Too few entries, or not an address at that position: no answer (Envoy then uses the
	// connection's address).
	f("203.0.113.7", 2, "")
	f("", 1, "")
	f("1.2.3.4", 0, "")
	f("unknown, 203.0.113.7", 2, "")
	f("1.2.3.4:80", 1, "")
	f("[2001:db8::1]", 1, "")
	f("01.2.3.4", 1, "")
	f("1.2.3.4,", 1, "")
	f(",1.2.3.4", 2, "")
}

func TestKeyValue(t *testing.T) {
	ctx := &policy.Context{
		RouteName: "users",
		ClientIP:  "192.0.2.10",
		Headers:   map[string]string{"x-tenant": "acme", "x-forwarded-for": "203.0.113.5, 198.51.100.9"},
		State:     map[string]string{"user_id": "u-1"},
	}
	f := func(key string, hops int, c *policy.Context, want string, wantOK bool) {
		t.Helper()
		k, err := parseKey(key, hops)
		if err != nil {
			t.Fatalf("parseKey(%q, %d): %v", key, hops, err)
		}
		got, ok := k.value(c)
		if got != want || ok != wantOK {
			t.Fatalf("key %q hops %d: got (%q, %v), want (%q, %v)", key, hops, got, ok, want, wantOK)
		}
	}
	f("", 0, ctx, "192.0.2.10", true)
	f("client_ip", 0, ctx, "192.0.2.10", true)
	f("client_ip", 1, ctx, "198.51.100.9", true)
	f("client_ip", 2, ctx, "203.0.113.5", true)
	f("client_ip", 3, ctx, "192.0.2.10", true) // too few hops: the connection's address
	f("header:X-Tenant", 0, ctx, "acme", true)
	f("header:x-missing", 0, ctx, "", false)
	f("state:user_id", 0, ctx, "u-1", true)
	f("state:other", 0, ctx, "", false)
	f("route", 0, ctx, "", true)

	noIP := &policy.Context{Headers: map[string]string{}}
	f("client_ip", 0, noIP, "", false)
	f("client_ip", 1, noIP, "", false)
	f("client_ip", 0, &policy.Context{ClientIP: "::FFFF:10.0.0.1"}, "10.0.0.1", true)
	f("client_ip", 0, &policy.Context{ClientIP: "/run/envoy.sock"}, "/run/envoy.sock", true)
	f("state:user_id", 0, noIP, "", false)
}

func TestParseKeyErrors(t *testing.T) {
	f := func(key string, hops int, want string) {
		t.Helper()
		_, err := parseKey(key, hops)
		if err == nil || err.Error() != want {
			t.Fatalf("parseKey(%q, %d): got %v, want %q", key, hops, err, want)
		}
	}
	f("ip", 0, `key "ip": want client_ip, route, header:<name> or state:<key>`)
	f("header:", 0, `key "header:": invalid header name`)
	f("header:bad name", 0, `key "header:bad name": invalid header name`)
	f("header::authority", 0, `key "header::authority": invalid header name`)
	f("state:", 0, `key "state:": empty state key`)
	f("client_ip", -1, `trust_forwarded_for: want 0 to 64, got -1`)
	f("client_ip", 65, `trust_forwarded_for: want 0 to 64, got 65`)
	f("header:x-a", 1, `trust_forwarded_for: applies only to key client_ip, not "header:x-a"`)
}

func TestKeyString(t *testing.T) {
	for _, tc := range []struct {
		key  string
		hops int
		want string
	}{
		{"", 0, "client_ip"},
		{"client_ip", 2, "client_ip/xff2"},
		{"header:X-A", 0, "header:x-a"},
		{"state:user_id", 0, "state:user_id"},
		{"route", 0, "route"},
	} {
		k, err := parseKey(tc.key, tc.hops)
		if err != nil {
			t.Fatal(err)
		}
		if got := k.String(); got != tc.want {
			t.Fatalf("key %q hops %d: String() = %q, want %q", tc.key, tc.hops, got, tc.want)
		}
	}
}
