package routetable

import (
	"strings"
	"testing"
)

func TestByPath(t *testing.T) {
	tab := New(map[string]string{
		"/api/v1/users":  "users",
		"/api/v1/admin/": "admin",
		"/api":           "api",
		"named-route":    "named",
	})
	f := func(path, want string, wantOK bool) {
		t.Helper()
		got, ok := tab.ByPath(path)
		if ok != wantOK || got != want {
			t.Errorf("ByPath(%q) = %q, %v; want %q, %v", path, got, ok, want, wantOK)
		}
	}
	f("/api/v1/users", "users", true)
	f("/api/v1/users/", "users", true)
	f("/api/v1/users/42/orders", "users", true)
	f("/api/v1/users?limit=1", "users", true)
	f("/api/v1/users#frag", "users", true)
	f("/api/v1/usersettings", "api", true)
	f("/api/v1/admin", "admin", true)
	f("/api/v1/admin/x", "admin", true)
	f("/api/v2", "api", true)
	f("/api", "api", true)
	f("/apis", "", false)
	f("/other", "", false)
	f("", "", false)
	f("relative", "", false)
	f("/", "", false)
}

// TestByPathSpellings sends spellings of /api/v1/admin that Envoy without path normalisation
// would pass on, and that upstreams read as that path: each must take the admin route.
func TestByPathSpellings(t *testing.T) {
	tab := New(map[string]string{"/api/v1/admin": "admin", "/api/v1": "v1", "/": "root"})
	f := func(path, want string) {
		t.Helper()
		if got, ok := tab.ByPath(path); !ok || got != want {
			t.Errorf("ByPath(%q) = %q, %v; want %q", path, got, ok, want)
		}
	}
	for _, p := range []string{
		"/api/v1/admin", "//api/v1/admin", "/api//v1/admin", "/api/v1/admin//x", "/./api/v1/admin",
		"/api/v1/./admin", "/api/v1/x/../admin", "/../api/v1/admin", "/api/v1/%2e/admin", "/api/v1/x/%2E%2E/admin",
		"/%61pi/v1/admin", "/api/v1/%61%64%6D%69%6E", "/API/V1/ADMIN", "/Api/v1/Admin/x", "/api/v1/admin;jsessionid=1",
		"/api/v1;x=1/admin", "/api/v1/users/..;/admin", "/api/v1/admin%2Fusers", "/api%2Fv1%2Fadmin", "/api/v1%5Cadmin",
		"/api/v1\\admin", "/api/v1/admin?x=/../..", "/api/v1/admin#/..", "/api/v1/x/..%2Fadmin",
		"/" + strings.Repeat("x/", 200) + strings.Repeat("../", 200) + "api/v1/admin", // past the stack buffer
	} {
		f(p, "admin")
	}
	f("/api/v1/administer", "v1")
	f("/api/v1/admin%252F", "v1") // decoded once: the segment is "admin%252F"
	f("/api/v1/admin/../users", "v1")
	f("/api/v1/%2e%2e/v1/admin", "admin")
	f("/api/v1/../../api/v1/admin", "admin")
	f("/api/v2", "root")
}

// TestByPathCase checks that names that differ only in case keep their own spelling, and that
// any other spelling takes the first in byte order.
func TestByPathCase(t *testing.T) {
	tab := New(map[string]string{"/Admin": "upper", "/admin": "lower", "/API/V1/%61dmin//": "api"})
	for path, want := range map[string]string{
		"/Admin/x": "upper", "/admin": "lower", "/ADMIN": "upper", "/aDmin": "upper", "/%41dmin": "upper",
		"/api/v1/admin": "api", "/API/v1/ADMIN/x": "api",
	} {
		if got, ok := tab.ByPath(path); !ok || got != want {
			t.Errorf("ByPath(%q) = %q, %v; want %q", path, got, ok, want)
		}
	}
}

func TestByPathAllocations(t *testing.T) {
	tab := New(map[string]int{"/api/v1/users": 1, "/api/v1/admin": 2, "/Healthz": 3, "/healthz": 4})
	for _, path := range []string{"/api/v1/users/12345/orders?limit=10", "/API//v1/./%61dmin;x=1/", "/healthz", "/nothing/here"} {
		if n := testing.AllocsPerRun(100, func() { tab.ByPath(path) }); n != 0 {
			t.Errorf("ByPath(%q): %v allocations", path, n)
		}
	}
}

func TestRootRoute(t *testing.T) {
	tab := New(map[string]int{"/": 1, "/a": 2})
	for path, want := range map[string]int{"/": 1, "/x": 1, "/a": 2, "/a/b": 2, "/ab": 1} {
		if got, ok := tab.ByPath(path); !ok || got != want {
			t.Errorf("ByPath(%q) = %d, %v; want %d", path, got, ok, want)
		}
	}
}

func TestByName(t *testing.T) {
	tab := New(map[string]int{"r1": 1, "/p": 2})
	if v, ok := tab.ByName("r1"); !ok || v != 1 {
		t.Fatalf("ByName(r1) = %d, %v", v, ok)
	}
	if _, ok := tab.ByName("/p/x"); ok {
		t.Fatal("ByName must match exactly")
	}
	if tab.Len() != 2 {
		t.Fatalf("Len = %d", tab.Len())
	}
	if _, ok := tab.ByPath("r1"); ok {
		t.Fatal("a name without a leading slash is not a path prefix")
	}
}

// BenchmarkByPath is the path fallback on a path already in normal form and on one that must be
// normalised. Compare two runs with benchstat: go test -run '^$' -bench ByPath -count 10.
func BenchmarkByPath(b *testing.B) {
	tab := New(map[string]int{"/api/v1/users": 1, "/api/v1/admin": 2, "/healthz": 3})
	for _, bc := range []struct{ name, path string }{
		{"canonical", "/api/v1/users/12345/orders?limit=10"},
		{"normalised", "/API/v1//users/./12345;x=1/%6Frders?limit=10"},
		{"long", "/api/v1/users/" + strings.Repeat("Segment/", 40)},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, ok := tab.ByPath(bc.path); !ok {
					b.Fatal("no match")
				}
			}
		})
	}
}
