package testenv

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// KubeDir is a directory laid out as the kubelet lays out a ConfigMap or Secret volume: each
// version of the files in a directory of its own ("..2026_12_06_14_00_00.123456789"), a
// "..data" symlink to the current one, and every file a symlink through "..data". Update swaps
// "..data" as the kubelet does: a "..data_tmp" symlink renamed over it.
type KubeDir struct {
	Dir string
	n   int
}

// NewKubeDir makes a KubeDir in dir holding files (name → content).
func NewKubeDir(t testing.TB, dir string, files map[string]string) *KubeDir {
	t.Helper()
	k := &KubeDir{Dir: dir}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	k.Update(t, files)
	for name := range files {
		if err := os.Symlink(filepath.Join("..data", name), filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	return k
}

// Path is the path of a file as a program reads it.
func (k *KubeDir) Path(name string) string { return filepath.Join(k.Dir, name) }

// Update writes a new version of the files and swaps "..data" to it atomically.
func (k *KubeDir) Update(t testing.TB, files map[string]string) {
	t.Helper()
	k.n++
	ver := fmt.Sprintf("..2026_12_06_14_00_00.%09d", k.n)
	if err := os.Mkdir(filepath.Join(k.Dir, ver), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(k.Dir, ver, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	tmp := filepath.Join(k.Dir, "..data_tmp")
	if err := os.Symlink(ver, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(k.Dir, "..data")); err != nil {
		t.Fatal(err)
	}
}
