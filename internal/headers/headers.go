// Package headers holds the header rules that Envoy applies to what an ext_proc server sends
// back (ENVOY-EXTPROC.md rules 11-13), so that the engine never sends a mutation that Envoy
// would drop or turn into a 500.
package headers

import (
	"errors"
	"fmt"
	"strings"
)

// tokenChars marks the bytes allowed in an HTTP header name (RFC 9110 token).
var tokenChars = func() (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
	}
	for c := 'A'; c <= 'Z'; c++ {
		t[c] = true
	}
	for _, c := range "!#$%&'*+-.^_`|~" {
		t[c] = true
	}
	return t
}()

// ValidName checks a header name: a token, optionally after one leading ':' (pseudo-headers).
func ValidName(name string) error {
	n := strings.TrimPrefix(name, ":")
	if n == "" {
		return fmt.Errorf("invalid header name %q: empty", name)
	}
	for i := 0; i < len(n); i++ {
		if !tokenChars[n[i]] {
			return fmt.Errorf("invalid header name %q: byte 0x%02x is not allowed", name, n[i])
		}
	}
	return nil
}

// ErrInvalidValue is returned for a header value that Envoy refuses.
var ErrInvalidValue = errors.New("invalid header value: control characters other than horizontal tab, and DEL, are not allowed")

// validValueBytes marks the bytes Envoy allows in a header value (HeaderUtility::
// headerValueIsValid, RFC 9110 field-value): horizontal tab, space, visible ASCII and obs-text
// (0x80-0xff). NUL, CR, LF, every other control byte and DEL are refused, and a mutation that
// holds one fails the whole ext_proc reply with a 500.
var validValueBytes = func() (t [256]bool) {
	t['\t'] = true
	for c := 0x20; c < 0x100; c++ {
		t[c] = c != 0x7f
	}
	return t
}()

// ValidValue checks a header value by Envoy's rule: no control byte but horizontal tab, no DEL.
func ValidValue(v string) error {
	for i := 0; i < len(v); i++ {
		if !validValueBytes[v[i]] {
			return ErrInvalidValue
		}
	}
	return nil
}

// SetAllowed reports whether Envoy's default mutation rules let an ext_proc server set the
// header with the given lowercase name: host, :authority, :method, :scheme and x-envoy-* may
// not be set; :path and :status may (a :status value is checked by ValidStatus); other
// pseudo-headers may not.
func SetAllowed(name string) bool {
	switch name {
	case "host", ":authority", ":method", ":scheme":
		return false
	case ":path", ":status":
		return true
	}
	if strings.HasPrefix(name, ":") || strings.HasPrefix(name, "x-envoy-") {
		return false
	}
	return true
}

// RemoveAllowed reports whether Envoy lets an ext_proc server remove the header: pseudo-headers
// and host may never be removed, and x-envoy-* fall under the default rules too.
func RemoveAllowed(name string) bool {
	if name == "host" || strings.HasPrefix(name, ":") || strings.HasPrefix(name, "x-envoy-") {
		return false
	}
	return true
}

// ValidStatus checks a :status value set by a mutation: a number from 200 to 999.
func ValidStatus(v string) bool {
	if len(v) != 3 {
		return false
	}
	n := 0
	for i := 0; i < 3; i++ {
		if v[i] < '0' || v[i] > '9' {
			return false
		}
		n = n*10 + int(v[i]-'0')
	}
	return n >= 200
}

// SameName compares two header names as an upstream may read them: ASCII case folded and
// '_' read as '-' (x_user_id, X-User_Id and x-user-id are one name to many servers).
func SameName(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		if foldNameByte(a[i]) != foldNameByte(b[i]) {
			return false
		}
	}
	return true
}

func foldNameByte(c byte) byte {
	switch {
	case c >= 'A' && c <= 'Z':
		return c + ('a' - 'A')
	case c == '_':
		return '-'
	}
	return c
}
