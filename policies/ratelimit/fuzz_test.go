package ratelimit

import (
	"context"
	"net/netip"
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
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
