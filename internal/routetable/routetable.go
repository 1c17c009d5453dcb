// Package routetable finds a route's policy chains: by the exact route name Envoy sends in the
// xds.route_name attribute, else by the longest route name that is a path prefix of the
// request's :path, on a segment boundary.
//
// A Table is built once per config snapshot and is read-only afterwards, so lookups take no
// locks and allocate nothing.
package routetable

import "strings"

// Table maps route names to values.
type Table[V any] struct {
	byName   map[string]V
	prefixes map[string]V // names that start with '/', for path matching
	maxLen   int
}

// New builds a table from route names to values.
func New[V any](routes map[string]V) *Table[V] {
	t := &Table[V]{byName: make(map[string]V, len(routes)), prefixes: map[string]V{}}
	for name, v := range routes {
		t.byName[name] = v
		if strings.HasPrefix(name, "/") {
			p := strings.TrimSuffix(name, "/")
			if p == "" {
				p = "/"
			}
			t.prefixes[p] = v
			t.maxLen = max(t.maxLen, len(p))
		}
	}
	return t
}

// Len returns the number of routes.
func (t *Table[V]) Len() int { return len(t.byName) }

// ByName returns the route with exactly this name.
func (t *Table[V]) ByName(name string) (V, bool) {
	v, ok := t.byName[name]
	return v, ok
}

// ByPath returns the route whose name is the longest prefix of path that ends on a segment
// boundary: "/api/v1/users" matches "/api/v1/users", "/api/v1/users/7" and
// "/api/v1/users?x=1", but not "/api/v1/usersettings". A route named "/" matches every path.
// The query string is never part of the match.
func (t *Table[V]) ByPath(path string) (V, bool) {
	if i := strings.IndexAny(path, "?#"); i >= 0 {
		path = path[:i]
	}
	if len(t.prefixes) == 0 || path == "" || path[0] != '/' {
		var zero V
		return zero, false
	}
	// Try the path without trailing slashes, then each shorter prefix that ends before a '/'.
	for p := strings.TrimRight(path, "/"); p != ""; p = p[:strings.LastIndexByte(p, '/')] {
		if len(p) <= t.maxLen {
			if v, ok := t.prefixes[p]; ok {
				return v, true
			}
		}
	}
	v, ok := t.prefixes["/"]
	return v, ok
}
