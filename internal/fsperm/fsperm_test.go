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

// TestPodEmptyDir: the root of a pod's emptyDir volume (mode 0777, made by the kubelet, shared
// by the pod's containers only) is accepted as a socket directory; an ordinary world-writable
// directory, a tmpfs mount, a mount of another volume kind, and a directory below the emptyDir's
// root that is itself world-writable are refused.
func TestPodEmptyDir(t *testing.T) {
	root := t.TempDir()
	run := filepath.Join(root, "run")
	if err := os.Mkdir(run, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(run, 0o777); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(run, "agents", "agent.sock")
	line := func(src, mnt string) string {
		return "1234 1000 253:1 " + src + " " + mnt + " rw,relatime - ext4 /dev/vda1 rw\n"
	}
	f := func(name, mountinfo string, path string, wantErr bool) {
		t.Helper()
		saved := mountInfo
		mountInfo = func() ([]byte, error) { return []byte(mountinfo), nil }
		defer func() { mountInfo = saved }()
		err := CheckSocket(path)
		if (err != nil) != wantErr {
			t.Errorf("%s: %v, want error %v", name, err, wantErr)
		}
	}
	const kubelet = "/var/lib/kubelet/pods/6f1c/volumes/kubernetes.io~empty-dir/run"
	f("not a mount", line("/", "/"), sock, true)
	f("a pod's emptyDir", line("/", "/")+line(kubelet, run), sock, false)
	f("a pod's emptyDir, escaped path", line("/", "/")+line(kubelet, strings.ReplaceAll(run, " ", `\040`)), sock, false)
	f("tmpfs (medium Memory or any tmpfs)", "1234 1000 0:55 / "+run+" rw - tmpfs tmpfs rw\n", sock, true)
	f("another volume kind", line("/var/lib/kubelet/pods/6f1c/volumes/kubernetes.io~nfs/run", run), sock, true)
	f("the emptyDir mounted elsewhere", line(kubelet, filepath.Join(root, "other")), sock, true)

	// A world-writable directory below the emptyDir's root is judged by its own mode.
	sub := filepath.Join(run, "agents")
	if err := os.Mkdir(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(sub, 0o777); err != nil {
		t.Fatal(err)
	}
	f("a world-writable directory inside it", line(kubelet, run), sock, true)

	// A real bind mount from a path shaped like the kubelet's, where the test may make one.
	if err := os.Remove(sub); err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(root, "node", "pods", "6f1c", "volumes", "kubernetes.io~empty-dir", "run")
	if err := os.MkdirAll(src, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(src, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(src, run, "", unix.MS_BIND, ""); err != nil {
		t.Logf("no bind mount here (%v): the real mount is skipped", err)
		return
	}
	defer unix.Unmount(run, unix.MNT_DETACH)
	if err := CheckSocket(sock); err != nil {
		t.Errorf("a bind mount of a pod's emptyDir: %v", err)
	}
	if err := CheckSocket(filepath.Join(src, "agent.sock")); err == nil {
		t.Error("the emptyDir's directory on the node, not a mount point, was accepted")
	}
}
