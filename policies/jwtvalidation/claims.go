package jwtvalidation

import (
	"bytes"
	"encoding/json"
	"sort"
	"strconv"
	"strings"
)

// LookupClaim finds a claim by path. A claim whose name is the whole path is taken first, so
// that names holding dots ("https://example.com/roles") work; otherwise the path is split on
// dots and followed through nested objects ("realm_access.roles").
func LookupClaim(claims map[string]any, path string) (any, bool) {
	if v, ok := claims[path]; ok {
		return v, true
	}
	var cur any = claims
	for part := range strings.SplitSeq(path, ".") {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = m[part]; !ok {
			return nil, false
		}
	}
	return cur, true
}

// headerValue renders a claim as a header value: strings as they are, numbers and booleans as
// their JSON text, a list of such values joined with ",", anything else as compact JSON. A
// null or empty claim gives false.
func headerValue(v any) (string, bool) {
	switch x := v.(type) {
	case nil:
		return "", false
	case string:
		return x, x != ""
	case json.Number:
		return x.String(), true
	case bool:
		return strconv.FormatBool(x), true
	case []any:
		parts := make([]string, 0, len(x))
		for _, e := range x {
			switch s := e.(type) {
			case string:
				parts = append(parts, s)
			case json.Number:
				parts = append(parts, s.String())
			case bool:
				parts = append(parts, strconv.FormatBool(s))
			default:
				return compactJSON(x)
			}
		}
		return strings.Join(parts, ","), len(parts) > 0
	default:
		return compactJSON(x)
	}
}

func compactJSON(v any) (string, bool) {
	b, err := marshalJSON(v)
	if err != nil {
		return "", false
	}
	return string(b), true
}

// marshalJSON encodes v without HTML escaping and without a trailing newline.
func marshalJSON(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// encodeClaims renders the claims as compact JSON of at most max bytes. When the whole set is
// larger, claims are taken in name order and each one that would overflow is left out, so the
// result is still one valid JSON object and the small claims (iss, sub, roles...) survive a
// large one.
func encodeClaims(claims map[string]any, max int) (string, error) {
	all, err := marshalJSON(claims)
	if err != nil {
		return "", err
	}
	if len(all) <= max {
		return string(all), nil
	}
	names := make([]string, 0, len(claims))
	for k := range claims {
		names = append(names, k)
	}
	sort.Strings(names)
	out := make([]byte, 0, max)
	out = append(out, '{')
	for _, k := range names {
		kb, err := marshalJSON(k)
		if err != nil {
			return "", err
		}
		vb, err := marshalJSON(claims[k])
		if err != nil {
			return "", err
		}
		sep := 0
		if len(out) > 1 {
			sep = 1
		}
		if len(out)+sep+len(kb)+1+len(vb)+1 > max {
			continue
		}
		if sep == 1 {
			out = append(out, ',')
		}
		out = append(append(append(out, kb...), ':'), vb...)
	}
	return string(append(out, '}')), nil
}
