// Package routetable finds a route's policy chains: by the exact route name Envoy sends in the
// xds.route_name attribute, else by the longest route name that is a path prefix of the
// request's :path, on a segment boundary, after both are normalised (see normalize.go) and
// compared without regard to ASCII case.
//
// A Table is built once per config snapshot and is read-only afterwards, so lookups take no
// locks and allocate nothing (but for a path longer than 256 bytes that is not already in its
// normal form).
package routetable

import (
	"sort"
	"strings"
	"unsafe"
)

// Table maps route names to values.
type Table[V any] struct {
	byName map[string]V
	// folded holds the names that start with '/', normalised and lowercased, for path
	// matching; of names that fold to one key, the first in byte order.
	folded map[string]V
	// exact holds, only for names that fold to the same key as another, their normalised
	// form with its case, so that a path spelt as one of them takes that one.
	exact  map[string]V
	maxLen int
}

// New builds a table from route names to values.
func New[V any](routes map[string]V) *Table[V] {
	t := &Table[V]{byName: make(map[string]V, len(routes)), folded: map[string]V{}}
	names := make([]string, 0, len(routes))
	for name, v := range routes {
		t.byName[name] = v
		if strings.HasPrefix(name, "/") {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	byKey := map[string][]string{}
	for _, name := range names {
		buf := make([]byte, len(name))
		p := string(buf[:normalize(buf, cut(name))])
		if p != "/" {
			p = strings.TrimRight(p, "/")
		}
		key := strings.ToLower(p)
		if _, dup := t.folded[key]; !dup {
			t.folded[key] = routes[name]
		}
		byKey[key] = append(byKey[key], name)
		t.maxLen = max(t.maxLen, len(p))
	}
	for _, group := range byKey {
		if len(group) < 2 {
			continue
		}
		if t.exact == nil {
			t.exact = map[string]V{}
		}
		for _, name := range group {
			buf := make([]byte, len(name))
			p := string(buf[:normalize(buf, cut(name))])
			if p != "/" {
				p = strings.TrimRight(p, "/")
			}
			if _, dup := t.exact[p]; !dup {
				t.exact[p] = routes[name]
			}
		}
	}
	return t
}

// cut returns path without its query string and fragment.
func cut(path string) string {
	if i := strings.IndexAny(path, "?#"); i >= 0 {
		return path[:i]
	}
	return path
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
//
// Both the path and the names are normalised first (normalize.go: dot segments, "//", escapes
// of unreserved characters, %2F and %5C, '\', ';' path parameters), and compared without
// regard to ASCII case, so that "/API//v1/./%61dmin;x=1" takes the route "/api/v1/admin": when
// the upstream may read a spelling as a protected path, the more specific route wins. Of two
// names that differ only in case, a path spelt exactly as one takes it, any other spelling the
// first in byte order.
func (t *Table[V]) ByPath(path string) (V, bool) {
	if len(t.folded) == 0 || path == "" || path[0] != '/' {
		var zero V
		return zero, false
	}
	end, ok := scan(path)
	if ok {
		return t.lookup(path[:end], path[:end])
	}
	return t.byNormalPath(path[:end])
}

// byNormalPath is ByPath on a path, cut at '?' and '#', that is not in normal form.
func (t *Table[V]) byNormalPath(path string) (V, bool) {
	var bufs [2][stackPath]byte
	orig, lower := bufs[0][:], bufs[1][:]
	if len(path) > stackPath {
		orig, lower = make([]byte, len(path)), make([]byte, len(path))
	}
	n := normalize(orig, path)
	lowerInto(lower[:n], orig[:n])
	// The strings only live for the lookups, which keep nothing of them.
	return t.lookup(unsafe.String(&orig[0], n), unsafe.String(&lower[0], n))
}

// lookup finds the longest route prefix of a normalised path; lower is path lowercased.
func (t *Table[V]) lookup(path, lower string) (V, bool) {
	// Try the path without trailing slashes, then each shorter prefix that ends before a '/'.
	p := strings.TrimRight(lower, "/")
	if len(p) > t.maxLen {
		// No name is longer: start at the last segment boundary within maxLen.
		p = p[:max(strings.LastIndexByte(p[:t.maxLen+1], '/'), 0)]
	}
	for ; p != ""; p = p[:strings.LastIndexByte(p, '/')] {
		if t.exact != nil {
			if v, ok := t.exact[path[:len(p)]]; ok {
				return v, true
			}
		}
		if v, ok := t.folded[p]; ok {
			return v, true
		}
	}
	v, ok := t.folded["/"]
	return v, ok
}
