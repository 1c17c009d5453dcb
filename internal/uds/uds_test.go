package uds

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestPath(t *testing.T) {
	for in, want := range map[string]string{"unix:///a/b.sock": "/a/b.sock", "unix:/a.sock": "/a.sock", "/x.sock": "/x.sock", "rel.sock": "rel.sock"} {
		if got := Path(in); got != want {
			t.Errorf("Path(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestListenModeAndPrefix(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "sub", "a.sock")
	ln, err := Listen("unix://" + p)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %o, want 600", fi.Mode().Perm())
	}
	c, err := net.Dial("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
}

func TestStaleSocketRemoved(t *testing.T) {
	p := filepath.Join(t.TempDir(), "s.sock")
	ln, err := net.Listen("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	// Leave the file behind, as a killed process does.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("stale socket not left behind: %v", err)
	}
	ln2, err := Listen(p)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	ln2.Close()
}

func TestLiveSocketRefused(t *testing.T) {
	p := filepath.Join(t.TempDir(), "s.sock")
	ln, err := Listen(p)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	if _, err := Listen(p); err == nil || !strings.Contains(err.Error(), "in use by another process") {
		t.Fatalf("second listener on a live socket: %v", err)
	}
}

func TestNotASocket(t *testing.T) {
	p := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(p); err == nil || !strings.Contains(err.Error(), "is not a socket") {
		t.Fatalf("regular file: %v", err)
	}
	if _, err := Listen(""); err == nil {
		t.Fatal("empty path accepted")
	}
	if _, err := Listen("unix://"); err == nil {
		t.Fatal("empty unix:// path accepted")
	}
}

func TestDirectoryNotCreatable(t *testing.T) {
	f := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(f, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(filepath.Join(f, "x.sock")); err == nil || !strings.Contains(err.Error(), "create socket directory") {
		t.Fatalf("got %v", err)
	}
}

// TestListenModeShared: a socket shared with another user of the same group gets the mode asked
// for; a stale one is still replaced.
func TestListenModeShared(t *testing.T) {
	p := filepath.Join(t.TempDir(), "k.sock")
	ln, err := ListenMode("unix://"+p, 0o660)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket mode %o, want 660", fi.Mode().Perm())
	}
	if _, err := ListenMode(p, 0o660); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("a live socket was not refused: %v", err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	ln, err = ListenMode(p, 0o660)
	if err != nil {
		t.Fatalf("a stale socket was not replaced: %v", err)
	}
	ln.Close()
}
