package kernel

import (
	"io"
	"io/fs"
	"strings"
	"testing"
	"time"
)

func TestParseSocketMode(t *testing.T) {
	f := func(in string, want fs.FileMode, ok bool) {
		t.Helper()
		got, err := ParseSocketMode(in)
		if (err == nil) != ok || got != want {
			t.Fatalf("ParseSocketMode(%q) = %o, %v; want %o, ok %v", in, got, err, want, ok)
		}
	}
	f("0600", 0o600, true)
	f("600", 0o600, true)
	f("0660", 0o660, true)
	f("0640", 0o640, true)
	f("0700", 0o700, true)
	f("0666", 0, false)
	f("0601", 0, false)
	f("0400", 0, false)
	f("1660", 0, false)
	f("00660", 0, false)
	f("0x1b0", 0, false)
	f("", 0, false)
	f("rw-rw----", 0, false)
}

func TestExtProcAddr(t *testing.T) {
	kc := &KernelConfig{Server: ServerConfig{Address: "0.0.0.0", Port: 9001}}
	f := func(listen, socket, want string) {
		t.Helper()
		kc.Server.SocketPath = socket
		if got := extProcAddr(kc, &flags{listen: listen}); got != want {
			t.Fatalf("listen %q, socket_path %q: %q, want %q", listen, socket, got, want)
		}
	}
	f("", "", "0.0.0.0:9001")
	f("", "/run/pe/k.sock", "unix:///run/pe/k.sock")
	f("", "unix:///run/pe/k.sock", "unix:///run/pe/k.sock")
	f("127.0.0.1:1", "/run/pe/k.sock", "127.0.0.1:1")
	f("unix:///tmp/x.sock", "", "unix:///tmp/x.sock")
}

// FuzzParseSocketMode: whatever the text, an accepted mode lets the owner read and write and
// gives other users nothing.
func FuzzParseSocketMode(f *testing.F) {
	for _, s := range []string{"0600", "0660", "0666", "777", "-1", "0o660", "١٢٣"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		m, err := ParseSocketMode(s)
		if err != nil {
			return
		}
		if m&0o600 != 0o600 || m&0o007 != 0 || m&^fs.ModePerm != 0 {
			t.Fatalf("%q accepted as %o", s, m)
		}
	})
}

func TestWatchFlags(t *testing.T) {
	f, err := parseFlags(nil, io.Discard)
	if err != nil || !f.watch || f.watchEvery != time.Second {
		t.Fatalf("defaults: %+v, %v", f, err)
	}
	f, err = parseFlags([]string{"-watch-config=false", "-listen", "unix:///run/k.sock"}, io.Discard)
	if err != nil || f.watch || !isUnix(f.listen) {
		t.Fatalf("off: %+v, %v", f, err)
	}
	if _, err := parseFlags([]string{"-watch-interval", "1ms"}, io.Discard); err == nil || !strings.Contains(err.Error(), "-watch-interval must be at least 10ms") {
		t.Fatalf("a 1ms interval: %v", err)
	}
}
