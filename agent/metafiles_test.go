package agent

import (
	"context"
	"slices"
	"testing"
)

// TestDropEntriesNaming: compiling an entry records the files its metadata names (once each,
// signalled once), and dropping by file removes only the entries that name it.
func TestDropEntriesNaming(t *testing.T) {
	e, _ := newTestExecutor(t, testCore())
	run := func(md ...string) {
		t.Helper()
		e.Execute(context.Background(), req(p("t.setHeader", append([]string{"key", "x", "value", "1"}, md...)...)))
	}
	select {
	case <-e.MetadataFilesGrew():
		t.Fatal("signalled before any file was named")
	default:
	}
	run("jwks_file", "/keys/a.json")
	run("jwks_file", "/keys/a.json", "bogus", "1") // another entry naming the same file
	run("jwks_file", "/keys/b.json")
	run()
	if got := e.MetadataFiles(); !slices.Equal(got, []string{"/keys/a.json", "/keys/b.json"}) {
		t.Fatalf("files %q", got)
	}
	select {
	case <-e.MetadataFilesGrew():
	default:
		t.Fatal("not signalled")
	}
	before := e.snap.Load().cached.Load()
	if n := e.DropEntriesNaming([]string{"/keys/a.json"}); n != 2 {
		t.Errorf("dropped %d entries, want 2", n)
	}
	if after := e.snap.Load().cached.Load(); after != before-2 {
		t.Errorf("cached %d after, %d before", after, before)
	}
	if n := e.DropEntriesNaming([]string{"/keys/a.json"}); n != 0 {
		t.Errorf("dropped %d again", n)
	}
	run("jwks_file", "/keys/a.json")
	if after := e.snap.Load().cached.Load(); after != before-1 {
		t.Errorf("the entry was not compiled again: cached %d", after)
	}
	e.Close()
	if n := e.DropEntriesNaming([]string{"/keys/b.json"}); n != 0 {
		t.Errorf("no config: dropped %d", n)
	}
}
