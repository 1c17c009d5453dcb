package redact

import (
	"slices"
	"testing"
)

func TestRedactor(t *testing.T) {
	r := New([]string{"X-Partner"})
	for name, want := range map[string]bool{
		"authorization": true, "X-API-Key": true, "x-partner": true, "x-session-id": true, "private-token": true,
		"x-client-secret": true, "content-type": false, "x-user-id": false,
	} {
		if got := r.Sensitive(name); got != want {
			t.Errorf("Sensitive(%q) = %v", name, got)
		}
	}
	if got := r.Path("/a?key=k1&page=2&access-token=t&sig"); got != "/a?key=[redacted]&page=2&access-token=[redacted]&sig" {
		t.Errorf("Path: %s", got)
	}
	if got := r.Value("cookie", "c=1"); got != Redacted {
		t.Errorf("Value: %s", got)
	}
}

func TestHeaders(t *testing.T) {
	in := [][2]string{{"X-API-Key", "k1"}, {"accept", "*/*"}, {"x-tenant-key", "t1"}}
	got := New([]string{"X-Tenant-Key"}).Headers(in)
	want := [][2]string{{"X-API-Key", Redacted}, {"accept", "*/*"}, {"x-tenant-key", Redacted}}
	if !slices.Equal(got, want) {
		t.Fatalf("Headers = %q, want %q", got, want)
	}
	if in[0][1] != "k1" {
		t.Fatal("Headers changed its argument")
	}
}
