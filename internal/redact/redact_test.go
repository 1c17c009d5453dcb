package redact

import "testing"

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
