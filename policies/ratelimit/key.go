package ratelimit

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/policy-engine/policy-engine/agent/policy"
	"github.com/policy-engine/policy-engine/internal/headers"
)

type keyKind uint8

const (
	keyClientIP keyKind = iota
	keyHeader
	keyState
	keyRoute
)

// maxTrustedHops bounds trust_forwarded_for; no real proxy chain is that long.
const maxTrustedHops = 64

// keySpec says which value of a request names its bucket.
type keySpec struct {
	kind keyKind
	name string // header name (lowercase) or state key
	hops int    // trust_forwarded_for, for client_ip
}

// parseKey parses the key metadata: client_ip, route, header:<name> or state:<key>.
func parseKey(s string, hops int) (keySpec, error) {
	var k keySpec
	switch {
	case s == "" || s == "client_ip":
		k.kind = keyClientIP
	case s == "route":
		k.kind = keyRoute
	case strings.HasPrefix(s, "header:"):
		k.kind, k.name = keyHeader, strings.ToLower(strings.TrimPrefix(s, "header:"))
		if err := headers.ValidName(k.name); err != nil || strings.HasPrefix(k.name, ":") {
			return k, fmt.Errorf("key %q: invalid header name", s)
		}
	case strings.HasPrefix(s, "state:"):
		k.kind, k.name = keyState, strings.TrimPrefix(s, "state:")
		if k.name == "" {
			return k, fmt.Errorf("key %q: empty state key", s)
		}
	default:
		return k, fmt.Errorf("key %q: want client_ip, route, header:<name> or state:<key>", s)
	}
	if hops < 0 || hops > maxTrustedHops {
		return k, fmt.Errorf("trust_forwarded_for: want 0 to %d, got %d", maxTrustedHops, hops)
	}
	if hops > 0 && k.kind != keyClientIP {
		return k, fmt.Errorf("trust_forwarded_for: applies only to key client_ip, not %q", s)
	}
	k.hops = hops
	return k, nil
}

// String returns the key as written in metadata; it is part of a bucket's identity.
func (k keySpec) String() string {
	switch k.kind {
	case keyHeader:
		return "header:" + k.name
	case keyState:
		return "state:" + k.name
	case keyRoute:
		return "route"
	}
	if k.hops > 0 {
		return fmt.Sprintf("client_ip/xff%d", k.hops)
	}
	return "client_ip"
}

// value returns the request's key value; ok is false when the request has none.
func (k keySpec) value(c *policy.Context) (string, bool) {
	switch k.kind {
	case keyHeader:
		v := c.Headers[k.name]
		return v, v != ""
	case keyState:
		v := c.State[k.name]
		return v, v != ""
	case keyRoute:
		return "", true
	}
	if k.hops > 0 {
		if ip := forwardedFor(c.Headers["x-forwarded-for"], k.hops); ip != "" {
			return ip, true
		}
	}
	ip := canonicalIP(c.ClientIP)
	return ip, ip != ""
}

// forwardedFor returns the address hops entries from the right end of an x-forwarded-for
// value (1 is the last entry), the way Envoy's xff_num_trusted_hops picks the client: the
// entries right of it were appended by trusted proxies, everything left of it may be forged
// by the client. It returns "" when the header has too few entries or that entry is not an IP
// address; the caller then falls back to the connection's address, as Envoy does.
func forwardedFor(xff string, hops int) string {
	if xff == "" || hops < 1 {
		return ""
	}
	s := xff
	for i := 1; i < hops; i++ {
		j := strings.LastIndexByte(s, ',')
		if j < 0 {
			return ""
		}
		s = s[:j]
	}
	if j := strings.LastIndexByte(s, ','); j >= 0 {
		s = s[j+1:]
	}
	s = strings.Trim(s, " \t")
	a, err := netip.ParseAddr(s)
	if err != nil {
		return ""
	}
	return ipString(a, s)
}

// canonicalIP returns an IP address in its canonical form, so that one client has one bucket
// however its address was written; a value that is not an IP address (a Unix socket peer) is
// returned as it is.
func canonicalIP(s string) string {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return s
	}
	return ipString(a, s)
}

// ipString formats a: IPv4 addresses mapped into IPv6 become IPv4 and zones are dropped. s is
// a's text, returned without allocating when it is already canonical (every IPv4 address
// ParseAddr accepts is).
func ipString(a netip.Addr, s string) string {
	if a.Is4() {
		return s
	}
	return a.WithZone("").Unmap().String()
}
