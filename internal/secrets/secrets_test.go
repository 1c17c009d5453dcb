package secrets

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

var fake = Lookup{
	Env: func(k string) (string, bool) {
		v, ok := map[string]string{"TOKEN": "s3cret", "EMPTY": ""}[k]
		return v, ok
	},
	File: func(p string) ([]byte, error) {
		if p == "/run/secrets/key" {
			return []byte("filesecret\n"), nil
		}
		return nil, &fs.PathError{Op: "open", Path: p, Err: fs.ErrNotExist}
	},
}

func TestResolve(t *testing.T) {
	f := func(in, want, wantErr string) {
		t.Helper()
		got, err := fake.Resolve(in)
		if wantErr != "" {
			if err == nil || err.Error() != wantErr {
				t.Fatalf("Resolve(%q) error = %v, want %q", in, err, wantErr)
			}
			if strings.Contains(err.Error(), "s3cret") || strings.Contains(err.Error(), "filesecret") {
				t.Fatalf("error leaks a secret: %v", err)
			}
			return
		}
		if err != nil || got != want {
			t.Fatalf("Resolve(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	f("plain", "plain", "")
	f("", "", "")
	f("${env:TOKEN}", "s3cret", "")
	f("${env:EMPTY}", "", "")
	f("${file:/run/secrets/key}", "filesecret", "")
	f("$${env:TOKEN}", "${env:TOKEN}", "")
	f("${env:TOKEN} and more", "${env:TOKEN} and more", "")
	f("${vault:x}", "${vault:x}", "")
	f("${env:}", "${env:}", "")
	f("${env:TOKEN", "${env:TOKEN", "")
	f("${env:MISSING}", "", "secret ${env:MISSING}: environment variable not set")
	f("${file:/nope}", "", "secret ${file:/nope}: open /nope: file does not exist")
	if !IsRef("${env:X}") || IsRef("x") {
		t.Fatal("IsRef")
	}
}

func TestResolveMap(t *testing.T) {
	got, err := fake.ResolveMap(map[string]string{"authorization": "${env:TOKEN}", "x": "y"})
	if err != nil || got["authorization"] != "s3cret" || got["x"] != "y" {
		t.Fatalf("ResolveMap = %v, %v", got, err)
	}
	_, err = fake.ResolveMap(map[string]string{"b": "${env:NO_B}", "a": "${env:NO_A}"})
	if err == nil || err.Error() != "key \"a\": secret ${env:NO_A}: environment variable not set\nkey \"b\": secret ${env:NO_B}: environment variable not set" {
		t.Fatalf("ResolveMap errors = %v", err)
	}
	if m, err := fake.ResolveMap(nil); m != nil || err != nil {
		t.Fatal("ResolveMap(nil)")
	}
}

func TestResolveJSON(t *testing.T) {
	f := func(in, want, wantErr string) {
		t.Helper()
		got, err := fake.ResolveJSON([]byte(in))
		if wantErr != "" {
			if err == nil || err.Error() != wantErr {
				t.Fatalf("ResolveJSON(%s) error = %v, want %q", in, err, wantErr)
			}
			return
		}
		if err != nil || string(got) != want {
			t.Fatalf("ResolveJSON(%s) = %s, %v; want %s", in, got, err, want)
		}
	}
	f(`{"keys":[{"key":"x"}]}`, `{"keys":[{"key":"x"}]}`, "")
	f(``, ``, "")
	f(`{"keys":[{"key":"${env:TOKEN}","n":12345678901234567890}],"f":"${file:/run/secrets/key}"}`,
		`{"f":"filesecret","keys":[{"key":"s3cret","n":12345678901234567890}]}`, "")
	f(`{"a":"${env:NOPE}","b":["${file:/x}"]}`, "",
		"a: secret ${env:NOPE}: environment variable not set\nb[0]: secret ${file:/x}: open /x: file does not exist")
	f(`{"a":"${env:TOKEN}"`, "", "parse JSON: unexpected EOF")
}

func TestOS(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "tok")
	if err := os.WriteFile(p, []byte("from-file\r\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("POLICY_ENGINE_TEST_SECRET", "from-env")
	for in, want := range map[string]string{"${env:POLICY_ENGINE_TEST_SECRET}": "from-env", "${file:" + p + "}": "from-file"} {
		got, err := Resolve(in)
		if err != nil || got != want {
			t.Fatalf("Resolve(%q) = %q, %v", in, got, err)
		}
	}
	if _, err := Resolve("${env:POLICY_ENGINE_TEST_UNSET}"); !errors.Is(err, ErrNotSet) {
		t.Fatalf("unset variable: %v", err)
	}
}

// FuzzResolve checks that resolving never panics, that a string that is not a reference comes
// back unchanged, and that an error never carries the secret's value.
func FuzzResolve(f *testing.F) {
	for _, s := range []string{"", "x", "${env:TOKEN}", "${file:/run/secrets/key}", "$${env:A}", "${env:", "${file:}", "${:}", "${env:A:B}"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, err := fake.Resolve(s)
		if err != nil {
			if strings.Contains(err.Error(), "s3cret") || strings.Contains(err.Error(), "filesecret") {
				t.Fatalf("error leaks a secret: %v", err)
			}
			return
		}
		if !IsRef(s) && !strings.HasPrefix(s, "$${") && got != s {
			t.Fatalf("Resolve(%q) = %q; a plain string must stay as it is", s, got)
		}
	})
}

// FuzzResolveJSON checks that any JSON document either fails cleanly or comes back as JSON.
func FuzzResolveJSON(f *testing.F) {
	for _, s := range []string{`{}`, `{"a":"${env:TOKEN}"}`, `["${file:/run/secrets/key}",1,true,null]`, `"${env:X}"`, `{"a":`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, doc []byte) {
		out, err := fake.ResolveJSON(doc)
		if err != nil {
			return
		}
		if len(doc) > 0 && len(out) == 0 {
			t.Fatalf("ResolveJSON(%q) returned nothing", doc)
		}
	})
}

// TestReadFileRefuses shows that a file reference reads only a regular file within the cap:
// a device, a FIFO (which would block a plain open), a directory and a file over the cap are
// refused with the path and the reason, never with any content.
func TestReadFileRefuses(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	big := filepath.Join(dir, "big")
	if err := os.WriteFile(big, []byte(strings.Repeat("B", MaxFileSize+1)), 0o600); err != nil {
		t.Fatal(err)
	}
	atCap := filepath.Join(dir, "atcap")
	if err := os.WriteFile(atCap, []byte(strings.Repeat("A", MaxFileSize)), 0o600); err != nil {
		t.Fatal(err)
	}
	f := func(path string, want error, wantMsg string) {
		t.Helper()
		got, err := OS.Resolve("${file:" + path + "}")
		if !errors.Is(err, want) || err.Error() != wantMsg {
			t.Fatalf("Resolve(%s) = %d bytes, %v; want %q", path, len(got), err, wantMsg)
		}
	}
	f("/dev/zero", ErrNotRegular, "secret ${file:/dev/zero}: /dev/zero: not a regular file (a character device)")
	f(fifo, ErrNotRegular, "secret ${file:"+fifo+"}: "+fifo+": not a regular file (a FIFO)")
	f(dir, ErrNotRegular, "secret ${file:"+dir+"}: "+dir+": not a regular file (a directory)")
	f(big, ErrTooLarge, "secret ${file:"+big+"}: "+big+": larger than 1048576 bytes")
	if got, err := OS.Resolve("${file:" + atCap + "}"); err != nil || len(got) != MaxFileSize {
		t.Fatalf("a file of exactly the cap: %d bytes, %v", len(got), err)
	}
}
