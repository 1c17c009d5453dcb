package fsperm

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestCheckDir(t *testing.T) {
	root := t.TempDir()
	mk := func(name string, mode os.FileMode) string {
		t.Helper()
		p := filepath.Join(root, name)
		if err := os.Mkdir(p, 0o700); err != nil {
			t.Fatal(err)
		}
		// Chmod, not Mkdir's mode, so that the umask does not change the test.
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	f := func(dir, want string) {
		t.Helper()
		err := CheckDir("socket directory", dir)
		if want == "" {
			if err != nil {
				t.Errorf("%s: %v", dir, err)
			}
			return
		}
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: got %v, want %q", dir, err, want)
		}
	}
	private := mk("private", 0o700)
	shared := mk("shared", 0o755)
	group := mk("group", 0o770)
	open := mk("open", 0o777)
	sticky := mk("sticky", os.ModeSticky|0o777)
	f(private, "")
	f(shared, "")
	f(group, "")
	f(open, `socket directory "`+open+`" is writable by every user (mode 0777)`)
	f(open, "chmod o-w "+open)
	f(sticky, "(mode 1777)")
	// A directory still to be created is judged where it would be made.
	f(filepath.Join(private, "a", "b"), "")
	f(filepath.Join(open, "a", "b"), `"`+open+`", the nearest existing directory above the socket directory "`+filepath.Join(open, "a", "b")+`", is writable by every user`)
	f("relative-dir-that-does-not-exist", "")
	// The modes of directories above the one checked do not matter.
	f(mk("open/inner", 0o755), "")
	// A path through a file cannot be checked.
	file := filepath.Join(private, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	f(filepath.Join(file, "x"), `check socket directory "`+filepath.Join(file, "x")+`"`)
}

func TestCheckConfigAndSocket(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "kernel.yaml")
	if err := os.WriteFile(cfg, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := CheckConfig(cfg); err != nil {
		t.Fatal(err)
	}
	if err := CheckSocket(filepath.Join(dir, "agents", "a.sock")); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(cfg, 0o666); err != nil {
		t.Fatal(err)
	}
	if err := CheckConfig(cfg); err == nil || !strings.Contains(err.Error(), `config file "`+cfg+`" is writable by every user (mode 0666)`) {
		t.Fatalf("world-writable file: %v", err)
	}
	if err := os.Chmod(dir, os.ModeSetgid|0o777); err != nil {
		t.Fatal(err)
	}
	err := CheckConfig(cfg)
	if err == nil || !strings.Contains(err.Error(), `config directory "`+dir+`" is writable by every user (mode 2777)`) || !strings.Contains(err.Error(), "config file") {
		t.Fatalf("both problems at once: %v", err)
	}
	if err := CheckSocket(filepath.Join(dir, "a.sock")); err == nil || !strings.Contains(err.Error(), "socket directory") {
		t.Fatalf("socket: %v", err)
	}
	if err := CheckFile("config file", filepath.Join(dir, "missing.yaml")); err != nil {
		t.Fatalf("missing file: %v", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "kernel.yaml")
	if err := CheckFile("config file", filepath.Join(file, "x")); err == nil || !strings.Contains(err.Error(), "check config file") {
		t.Fatalf("path through a file: %v", err)
	}
}

// TestReadOnlyMount: a world-writable directory or file that no one can write, because its
// file system is mounted read-only (how Kubernetes mounts ConfigMaps and Secrets), is
// accepted; the same on a writable mount is refused.
func TestReadOnlyMount(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "etc")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, os.ModeSticky|0o777); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "kernel.yaml")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(file, 0o666); err != nil {
		t.Fatal(err)
	}
	f := func(name string, ro func(string) bool, wantErr bool) {
		t.Helper()
		saved := readOnly
		readOnly = ro
		defer func() { readOnly = saved }()
		err := CheckConfig(file)
		if (err != nil) != wantErr {
			t.Errorf("%s: %v, want error %v", name, err, wantErr)
		}
	}
	f("writable mount", func(string) bool { return false }, true)
	f("read-only mount", func(string) bool { return true }, false)
	f("only the directory's file system read-only", func(p string) bool { return p == dir }, true)

	// A real read-only bind mount, where the test may make one (root, with CAP_SYS_ADMIN).
	ro := filepath.Join(root, "ro")
	if err := os.Mkdir(ro, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(dir, ro, "", unix.MS_BIND, ""); err != nil {
		t.Logf("no bind mount here (%v): the real read-only case is skipped", err)
		return
	}
	defer unix.Unmount(ro, unix.MNT_DETACH)
	if err := unix.Mount("", ro, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
		t.Logf("no read-only remount here (%v): the real read-only case is skipped", err)
		return
	}
	if err := CheckConfig(filepath.Join(ro, "kernel.yaml")); err != nil {
		t.Errorf("config on a read-only bind mount of a 1777 directory: %v", err)
	}
	if err := CheckConfig(file); err == nil {
		t.Error("the same directory on its writable mount was accepted")
	}
}
