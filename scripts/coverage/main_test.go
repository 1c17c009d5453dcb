package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestReport(t *testing.T) {
	profile := `mode: set
example.com/m/a/a.go:1.1,2.2 3 1
example.com/m/a/a.go:3.1,4.2 1 0
example.com/m/a/a.go:3.1,4.2 1 1
example.com/m/b/b.go:1.1,2.2 4 0
example.com/m/api/x.pb.go:1.1,2.2 100 0
garbage line
`
	p := filepath.Join(t.TempDir(), "c.out")
	os.WriteFile(p, []byte(profile), 0o600)
	var out strings.Builder
	if err := report(p, &out); err != nil {
		t.Fatal(err)
	}
	got := out.String()
	for _, want := range []string{"example.com/m/a", "100.0%  (4/4)", "example.com/m/b", "0.0%  (0/4)", "total statement coverage: 50.0% (4/8 statements)"} {
		if !strings.Contains(got, want) {
			t.Errorf("report lacks %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, "api") {
		t.Error("generated code must be left out")
	}
	if err := report(filepath.Join(t.TempDir(), "none"), &out); err == nil {
		t.Fatal("missing profile accepted")
	}
	if pct(0, 0) != 100 {
		t.Fatal("empty package counts as covered")
	}
}
