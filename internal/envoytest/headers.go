package envoytest

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"

	mutationrulesv3 "github.com/envoyproxy/go-control-plane/envoy/config/common/mutation_rules/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
)

// Limits of Envoy's header maps with the default HTTP connection manager settings
// (common_http_protocol_options.max_headers_count and max_request_headers_kb). A header
// mutation that leaves a map over either limit is an error.
const (
	maxHeadersCount = 100
	maxHeadersBytes = 60 * 1024
)

type header struct{ key, value string }

// headerMap is an ordered multi-map modelled on Envoy's HeaderMapImpl: pseudo-headers
// stay in front of ordinary headers, repeated keys are separate entries, and setting a
// key removes every existing entry before adding the new one.
type headerMap struct {
	entries []header
}

func (h *headerMap) get(key string) (string, bool) {
	for _, e := range h.entries {
		if e.key == key {
			return e.value, true
		}
	}
	return "", false
}

func (h *headerMap) has(key string) bool {
	_, ok := h.get(key)
	return ok
}

func (h *headerMap) remove(key string) {
	kept := h.entries[:0]
	for _, e := range h.entries {
		if e.key != key {
			kept = append(kept, e)
		}
	}
	h.entries = kept
}

// add appends an entry; a pseudo-header goes after the last pseudo-header.
func (h *headerMap) add(key, value string) {
	if !strings.HasPrefix(key, ":") {
		h.entries = append(h.entries, header{key, value})
		return
	}
	i := 0
	for i < len(h.entries) && strings.HasPrefix(h.entries[i].key, ":") {
		i++
	}
	h.entries = append(h.entries, header{})
	copy(h.entries[i+1:], h.entries[i:])
	h.entries[i] = header{key, value}
}

func (h *headerMap) set(key, value string) {
	h.remove(key)
	h.add(key, value)
}

func (h *headerMap) byteSize() int {
	n := 0
	for _, e := range h.entries {
		n += len(e.key) + len(e.value)
	}
	return n
}

// proto renders the map the way Envoy sends it: every entry, in order, with the value
// only in raw_value.
func (h *headerMap) proto() *corev3.HeaderMap {
	out := &corev3.HeaderMap{Headers: make([]*corev3.HeaderValue, 0, len(h.entries))}
	for _, e := range h.entries {
		out.Headers = append(out.Headers, &corev3.HeaderValue{Key: e.key, RawValue: []byte(e.value)})
	}
	return out
}

// pairs returns the entries that are not pseudo-headers.
func (h *headerMap) pairs() [][2]string {
	var out [][2]string
	for _, e := range h.entries {
		if !strings.HasPrefix(e.key, ":") {
			out = append(out, [2]string{e.key, e.value})
		}
	}
	return out
}

func mapFromPairs(pairs [][2]string) *headerMap {
	h := &headerMap{}
	for _, p := range pairs {
		h.add(strings.ToLower(p[0]), p[1])
	}
	return h
}

// isTchar reports whether c is an RFC 7230 token character.
func isTchar(c byte) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

// headerNameIsValid follows Envoy's HeaderUtility::headerNameIsValid: a pseudo-header
// name must be a non-empty lowercase token after the colon (HTTP/2 rules); any other
// name must be a token, uppercase letters included, since Envoy lowercases it next.
// An empty name is refused as well: it is not a token.
func headerNameIsValid(name string) bool {
	if name == "" {
		return false
	}
	if name[0] == ':' {
		rest := name[1:]
		if rest == "" {
			return false
		}
		for i := 0; i < len(rest); i++ {
			c := rest[i]
			if !isTchar(c) || (c >= 'A' && c <= 'Z') {
				return false
			}
		}
		return true
	}
	for i := 0; i < len(name); i++ {
		if !isTchar(name[i]) {
			return false
		}
	}
	return true
}

// headerValueIsValid follows Envoy's HeaderUtility::headerValueIsValid: horizontal tab,
// visible ASCII, space and obs-text (0x80-0xff) are allowed; NUL, CR, LF, the other
// control characters and DEL are not.
func headerValueIsValid(v string) bool {
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c == '\t' || (c >= 0x20 && c != 0x7f) {
			continue
		}
		return false
	}
	return true
}

func authorityIsValid(v string) bool {
	if v == "" {
		return false
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
			continue
		}
		if strings.IndexByte("!$&'()*+,-.:;=[]_~%@", c) < 0 {
			return false
		}
	}
	return true
}

type checkOp int

const (
	opSet checkOp = iota
	opAppend
	opRemove
)

type checkResult int

const (
	checkOK checkResult = iota
	checkIgnore
	checkFail
)

// checker implements envoy.config.common.mutation_rules.v3.HeaderMutationRules as
// Envoy's filters/common/mutation_rules Checker does.
type checker struct {
	allowAllRouting bool
	allowEnvoy      bool
	disallowSystem  bool
	disallowAll     bool
	disallowIsError bool
	allowExpr       *regexp.Regexp
	disallowExpr    *regexp.Regexp
}

func newChecker(rules *mutationrulesv3.HeaderMutationRules, disallowIsError bool) (*checker, error) {
	c := &checker{
		allowAllRouting: rules.GetAllowAllRouting().GetValue(),
		allowEnvoy:      rules.GetAllowEnvoy().GetValue(),
		disallowSystem:  rules.GetDisallowSystem().GetValue(),
		disallowAll:     rules.GetDisallowAll().GetValue(),
		disallowIsError: disallowIsError || rules.GetDisallowIsError().GetValue(),
	}
	// Envoy's regex matchers match the whole header name.
	if e := rules.GetAllowExpression(); e != nil {
		re, err := regexp.Compile("^(?:" + e.GetRegex() + ")$")
		if err != nil {
			return nil, fmt.Errorf("envoytest: mutation rules allow_expression: %w", err)
		}
		c.allowExpr = re
	}
	if e := rules.GetDisallowExpression(); e != nil {
		re, err := regexp.Compile("^(?:" + e.GetRegex() + ")$")
		if err != nil {
			return nil, fmt.Errorf("envoytest: mutation rules disallow_expression: %w", err)
		}
		c.disallowExpr = re
	}
	return c, nil
}

func isRoutingHeader(name string) bool {
	switch name {
	case "host", ":authority", ":method", ":scheme":
		return true
	}
	return false
}

func (c *checker) check(op checkOp, name, value string) checkResult {
	if c.isAllowed(op, name) && (op == opRemove || c.isValidValue(name, value)) {
		return checkOK
	}
	if c.disallowIsError {
		return checkFail
	}
	return checkIgnore
}

func (c *checker) isAllowed(op checkOp, name string) bool {
	if op == opRemove && (strings.HasPrefix(name, ":") || name == "host") {
		return false
	}
	if c.disallowExpr != nil && c.disallowExpr.MatchString(name) {
		return false
	}
	if c.allowExpr != nil && c.allowExpr.MatchString(name) {
		return true
	}
	if c.disallowAll {
		return false
	}
	if !c.allowAllRouting && isRoutingHeader(name) {
		return false
	}
	if strings.HasPrefix(name, ":") && (op == opAppend || c.disallowSystem) {
		return false
	}
	if !c.allowEnvoy && strings.HasPrefix(name, "x-envoy") {
		return false
	}
	return true
}

func (c *checker) isValidValue(name, value string) bool {
	if !strings.HasPrefix(name, ":") && !headerValueIsValid(value) {
		return false
	}
	switch name {
	case "host", ":authority":
		return authorityIsValid(value)
	case ":scheme":
		return strings.EqualFold(value, "http") || strings.EqualFold(value, "https")
	case ":status":
		n, err := strconv.ParseUint(strings.TrimPrefix(strings.TrimSpace(value), "+"), 10, 32)
		return err == nil && n >= 200
	}
	return true
}

// errMutation is an invalid-argument error from a header mutation; Envoy answers it with
// a local reply whose details are the message.
type errMutation struct{ msg string }

func (e *errMutation) Error() string { return e.msg }

// applyHeaderMutation applies m to h as Envoy's MutationUtils::applyHeaderMutations does.
// replacing is true for a CONTINUE_AND_REPLACE reply, which may change :method;
// removeContentLength skips any attempt to set content-length. On error the mutations
// made before the failing entry stay applied, as in Envoy.
func applyHeaderMutation(m *extprocv3.HeaderMutation, h *headerMap, replacing bool, c *checker, removeContentLength bool) error {
	removes, sets := len(m.GetRemoveHeaders()), len(m.GetSetHeaders())
	if removes > maxHeadersCount || sets > maxHeadersCount {
		return &errMutation{fmt.Sprintf("Header mutation remove header count %d or set header count %d exceed the HCM header countlimit %d",
			removes, sets, maxHeadersCount)}
	}
	for _, name := range m.GetRemoveHeaders() {
		if !headerNameIsValid(name) {
			return &errMutation{"Invalid character in remove_headers mutation."}
		}
		name = strings.ToLower(name)
		switch c.check(opRemove, name, "") {
		case checkOK:
			h.remove(name)
		case checkFail:
			return &errMutation{"Invalid attempt to remove " + name}
		}
	}
	for _, opt := range m.GetSetHeaders() {
		hv := opt.GetHeader()
		if hv == nil {
			continue
		}
		if removeContentLength && strings.EqualFold(hv.GetKey(), "content-length") {
			continue
		}
		if hv.GetValue() != "" && len(hv.GetRawValue()) > 0 {
			return &errMutation{"Only one of value or raw_value in the HeaderValue message should be set."}
		}
		// Envoy reads raw_value only; a header carrying just `value` is set to "".
		value := string(hv.GetRawValue())
		if !headerNameIsValid(hv.GetKey()) || !headerValueIsValid(value) {
			return &errMutation{"Invalid character in set_headers mutation."}
		}
		name := strings.ToLower(hv.GetKey())
		// append_action is not consulted; only the append BoolValue (default false).
		appendValue := opt.GetAppend().GetValue()
		op := opSet
		if appendValue && h.has(name) {
			op = opAppend
		}
		res := c.check(op, name, value)
		if replacing && name == ":method" {
			res = checkOK
		}
		switch res {
		case checkOK:
			if appendValue {
				h.add(name, value)
			} else {
				h.set(name, value)
			}
		case checkFail:
			return &errMutation{"Invalid attempt to modify " + name}
		}
	}
	if len(h.entries) > maxHeadersCount || h.byteSize() > maxHeadersBytes {
		return &errMutation{fmt.Sprintf("Header mutation causes end result header count %d or header size %d bytes, exceeding the count limit %d or the size limit %d kilobytes",
			len(h.entries), h.byteSize(), maxHeadersCount, maxHeadersBytes/1024)}
	}
	return nil
}

// applyBodyMutation returns the body after m, as Envoy's MutationUtils::applyBodyMutations:
// body replaces, clear_body (when true) empties, anything else leaves the data alone.
func applyBodyMutation(m *extprocv3.BodyMutation, data []byte) []byte {
	switch mm := m.GetMutation().(type) {
	case *extprocv3.BodyMutation_Body:
		return append([]byte(nil), mm.Body...)
	case *extprocv3.BodyMutation_ClearBody:
		if mm.ClearBody {
			return nil
		}
	}
	return data
}

var errUnsupported = errors.New("envoytest: unsupported body send mode")
