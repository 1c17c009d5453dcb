package routetable

import (
	"strings"
	"testing"
)

func norm(path string) string {
	buf := make([]byte, len(path))
	return string(buf[:normalize(buf, path)])
}

func TestNormalize(t *testing.T) {
	f := func(in, want string) {
		t.Helper()
		if got := norm(in); got != want {
			t.Errorf("normalize(%q) = %q, want %q", in, got, want)
		}
		if got := norm(want); got != want {
			t.Errorf("normalize(%q) = %q: not stable", want, got)
		}
	}
	f("/", "/")
	f("/api/v1/admin", "/api/v1/admin")
	f("/api/v1/admin/", "/api/v1/admin/")
	f("//api//v1///admin", "/api/v1/admin")
	f("/api/v1/admin//", "/api/v1/admin/")
	f("/./api/./v1/.", "/api/v1/")
	f("/api/v1/x/../admin", "/api/v1/admin")
	f("/api/v1/x/..", "/api/v1/")
	f("/../../api", "/api")
	f("/..", "/")
	f("/.", "/")
	f("//", "/")
	f("/a/b/../../..", "/")
	f("/api/v1/%2e/admin", "/api/v1/admin")
	f("/api/v1/x/%2E%2e/admin", "/api/v1/admin")
	f("/%61pi/%7E%5f%2D%2E%30", "/api/~_-.0")
	f("/API/V1/%41dmin", "/API/V1/Admin") // case is kept; matching folds it
	f("/api/v1/admin;jsessionid=1", "/api/v1/admin")
	f("/api;x/v1;/admin;/users", "/api/v1/admin/users")
	f("/public/..;/admin", "/admin")
	f("/api/;x/admin", "/api/admin")
	f("/api%2Fv1%2fadmin", "/api/v1/admin")
	f("/api/v1%5Cadmin%5c", "/api/v1/admin/")
	f("/api\\v1\\..\\admin", "/api/admin")
	f("/api/x/..%2Fadmin", "/api/admin")
	f("/a%252Fb", "/a%252Fb")
	f("/a%3Bb%3F%20%00", "/a%3bb%3f%20%00")
	f("/a%", "/a%")
	f("/a%4", "/a%4")
	f("/a%zz%4g", "/a%zz%4g")
	f("/a%%61", "/a%a")
	f("/é/%C3%A9", "/é/%c3%a9")
}

func TestCanonical(t *testing.T) {
	for _, p := range []string{"/", "/api", "/api/v1/users/", "/a.b/..c/.d/c..", "/~user/x-y_z"} {
		if !canonical(p) {
			t.Errorf("canonical(%q) = false", p)
		}
	}
	for _, p := range []string{"//", "/a//b", "/.", "/./a", "/a/.", "/a/..", "/../a", "/A", "/a%61", "/a\\b", "/a;b"} {
		if canonical(p) {
			t.Errorf("canonical(%q) = true", p)
		}
	}
}

// reference is normalize written plainly, for the fuzz target to compare with.
func reference(path string) string {
	var d strings.Builder
	for i := 0; i < len(path); i++ {
		c := path[i]
		if c == '%' && i+2 < len(path) && isHex(path[i+1]) && isHex(path[i+2]) {
			v := unhex(path[i+1])<<4 | unhex(path[i+2])
			switch {
			case unreserved(v):
				d.WriteByte(v)
			case v == '/' || v == '\\':
				d.WriteByte('/')
			default:
				d.WriteString(strings.ToLower(path[i : i+3]))
			}
			i += 2
			continue
		}
		if c == '\\' {
			c = '/'
		}
		d.WriteByte(c)
	}
	var out []string
	segs := strings.Split(d.String()[1:], "/")
	trailing := false
	for _, s := range segs {
		s, _, _ = strings.Cut(s, ";")
		switch s {
		case "", ".":
			trailing = true
		case "..":
			if len(out) > 0 {
				out = out[:len(out)-1]
			}
			trailing = true
		default:
			out = append(out, s)
			trailing = false
		}
	}
	r := "/" + strings.Join(out, "/")
	if trailing && r != "/" {
		r += "/"
	}
	return r
}

func FuzzNormalize(f *testing.F) {
	for _, s := range []string{"/", "/api/v1/admin", "//a/./b/../c;x=1/%2e%2E/%61%2F%5c\\d?q", "/%%61", "/a/..;/b", "/%C3%A9%252F"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, path string) {
		path = "/" + cut(path)
		got := norm(path)
		if want := reference(path); got != want {
			t.Fatalf("normalize(%q) = %q, reference %q", path, got, want)
		}
		if got[0] != '/' || strings.Contains(got, "//") || strings.ContainsAny(got, "\\;") {
			t.Fatalf("normalize(%q) = %q: not normal", path, got)
		}
		for _, seg := range strings.Split(got, "/") {
			if seg == "." || seg == ".." {
				t.Fatalf("normalize(%q) = %q: dot segment", path, got)
			}
		}
		if canonical(path) && got != path {
			t.Fatalf("canonical(%q), but normalize gives %q", path, got)
		}
		if lower := strings.ToLower(got); canonical(lower) != !strings.Contains(lower, "%") {
			t.Fatalf("normalize(%q) = %q: canonical(%q) = %v", path, got, lower, canonical(lower))
		}
		if !strings.Contains(path, "%") && norm(got) != got {
			t.Fatalf("normalize(%q) = %q, which normalizes to %q", path, got, norm(got))
		}
	})
}
