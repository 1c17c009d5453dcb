package routetable

import "testing"

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

func BenchmarkByPath(b *testing.B) {
	tab := New(map[string]int{"/api/v1/users": 1, "/api/v1/admin": 2, "/healthz": 3})
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := tab.ByPath("/api/v1/users/12345/orders?limit=10"); !ok {
			b.Fatal("no match")
		}
	}
}
