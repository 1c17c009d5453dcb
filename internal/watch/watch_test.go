package watch

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Kubelet lays out a ConfigMap volume as versioned directories, a "..data" symlink to the
// current one, and one symlink per key through "..data"; an update writes a new directory and
// renames a "..data_tmp" symlink over "..data".
type kubeDir struct {
	t   *testing.T
	dir string
	n   int
}

func newKubeDir(t *testing.T, name, content string) *kubeDir {
	k := &kubeDir{t: t, dir: t.TempDir()}
	k.update(name, content)
	if err := os.Symlink(filepath.Join("..data", name), filepath.Join(k.dir, name)); err != nil {
		t.Fatal(err)
	}
	return k
}

func (k *kubeDir) update(name, content string) {
	k.t.Helper()
	k.n++
	ver := "..2026_12_06_14_00_00." + time.Now().Format("150405.000000000") + string(rune('a'+k.n))
	if err := os.Mkdir(filepath.Join(k.dir, ver), 0o755); err != nil {
		k.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(k.dir, ver, name), []byte(content), 0o644); err != nil {
		k.t.Fatal(err)
	}
	tmp := filepath.Join(k.dir, "..data_tmp")
	if err := os.Symlink(ver, tmp); err != nil {
		k.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(k.dir, "..data")); err != nil {
		k.t.Fatal(err)
	}
}

func expect(t *testing.T, w *Watcher, want string, within time.Duration) {
	t.Helper()
	select {
	case got := <-w.C():
		if want == "" {
			t.Fatalf("unexpected change %q", got)
		}
		if len(got) != 1 || got[0] != want {
			t.Fatalf("changed %q, want [%q]", got, want)
		}
	case <-time.After(within):
		if want != "" {
			t.Fatalf("no change of %s reported within %v", want, within)
		}
	}
}

func TestWatchKubeletSwap(t *testing.T) {
	k := newKubeDir(t, "kernel-config.yaml", "a: 1\n")
	file := filepath.Join(k.dir, "kernel-config.yaml")
	other := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(other, []byte("s1"), 0o600); err != nil {
		t.Fatal(err)
	}
	w := New(20*time.Millisecond, file, other)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go w.Run(ctx)

	expect(t, w, "", 150*time.Millisecond)
	// Same size, new directory: the swap is seen through the symlinks.
	k.update("kernel-config.yaml", "a: 2\n")
	expect(t, w, file, 2*time.Second)
	expect(t, w, "", 150*time.Millisecond)

	// A write in place, in two steps with a pause longer than the interval, is reported once
	// it has settled; the first half may be reported too, but the last report is the whole.
	if err := os.WriteFile(other, []byte("s2-half"), 0o600); err != nil {
		t.Fatal(err)
	}
	expect(t, w, other, 2*time.Second)
	f, err := os.OpenFile(other, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("-and-the-rest")
	f.Close()
	expect(t, w, other, 2*time.Second)

	// Sync before a reload of its own swallows the change the reload reads.
	k.update("kernel-config.yaml", "a: 3\n")
	w.Sync()
	expect(t, w, "", 150*time.Millisecond)

	// A removed file is a change; so is its return.
	os.Remove(other)
	expect(t, w, other, 2*time.Second)
	os.WriteFile(other, []byte("s3"), 0o600)
	expect(t, w, other, 2*time.Second)
}

func TestWatchSettles(t *testing.T) {
	file := filepath.Join(t.TempDir(), "f")
	os.WriteFile(file, []byte("0"), 0o600)
	w := New(time.Hour, file)
	for i := 1; i <= 3; i++ { // changes at every poll: not reported
		os.WriteFile(file, []byte("x"+string(rune('0'+i))), 0o600)
		os.Chtimes(file, time.Now(), time.Unix(int64(1000+i), 0))
		if got := w.poll(); got != nil {
			t.Fatalf("poll %d reported %q while the file changes", i, got)
		}
	}
	if got := w.poll(); len(got) != 1 {
		t.Fatalf("a settled change was not reported: %q", got)
	}
	if got := w.poll(); got != nil {
		t.Fatalf("reported twice: %q", got)
	}
	// A file that never settles is reported after maxSettle polls.
	n := 0
	for i := 0; i < maxSettle; i++ {
		os.Chtimes(file, time.Now(), time.Unix(int64(5000+i), 0))
		if w.poll() != nil {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("a file that keeps changing was reported %d times in %d polls, want 1", n, maxSettle)
	}
}

func TestWatchOff(t *testing.T) {
	var w *Watcher
	w.Set([]string{"x"})
	w.Sync()
	w.Run(context.Background())
	if w.C() != nil {
		t.Fatal("a nil watcher has a channel")
	}
}
