// Package watch notices that a set of files changed, so that a process reloads its config
// without a signal: Kubernetes updates a mounted ConfigMap or Secret by swapping a "..data"
// symlink in the volume's directory, and a sidecar cannot send SIGHUP to another container
// without a shared process namespace.
//
// It polls. Every interval it takes a stamp of each file: the path the symlinks lead to, the
// device and inode, the size and the modification time of what that path names (os.Stat follows
// symlinks). The "..data" swap changes the target and the inode, an atomic rename the inode, a
// write in place the size or the time. Polling a handful of files costs a few system calls a
// second, works on every file system (inotify misses changes on NFS, FUSE and some overlay
// mounts, and a watch on a file is lost when the file is replaced), and nothing on the request
// path. A change is reported once the stamps have stayed the same for one more interval, so that
// a file written in several steps is read when it is complete, unless it keeps changing for
// maxSettle intervals; the reader validates it either way.
package watch

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"
)

// maxSettle bounds how many intervals a change may keep changing before it is reported anyway.
const maxSettle = 10

// stamp is what is known of a file without reading it.
type stamp struct {
	target     string
	dev, ino   uint64
	size       int64
	mtime      int64
	mode       fs.FileMode
	missingErr bool
}

func stampOf(path string) stamp {
	var s stamp
	if t, err := filepath.EvalSymlinks(path); err == nil {
		s.target = t
	}
	fi, err := os.Stat(path)
	if err != nil {
		s.missingErr = true
		return s
	}
	s.size, s.mtime, s.mode = fi.Size(), fi.ModTime().UnixNano(), fi.Mode()
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.dev, s.ino = uint64(st.Dev), uint64(st.Ino)
	}
	return s
}

// Watcher reports changes of a set of files on C. The zero value and a nil *Watcher are
// switched off: their methods do nothing and C never delivers.
type Watcher struct {
	interval time.Duration
	ch       chan []string

	mu      sync.Mutex
	base    map[string]stamp // stamps when last reported or synced
	last    map[string]stamp // stamps at the previous poll
	settled int              // polls the current change has lasted
}

// New watches files every interval (at least 10 ms). Run starts it.
func New(interval time.Duration, files ...string) *Watcher {
	w := &Watcher{interval: max(interval, 10*time.Millisecond), ch: make(chan []string, 1)}
	w.Set(files)
	return w
}

// C delivers the files that changed, once they have settled; nil when w is nil.
func (w *Watcher) C() <-chan []string {
	if w == nil {
		return nil
	}
	return w.ch
}

// Set replaces the set of files. A file already watched keeps its stamp, so that a change
// that came meanwhile is still reported; a new one is stamped now.
func (w *Watcher) Set(files []string) {
	if w == nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	base := make(map[string]stamp, len(files))
	for _, f := range files {
		if s, ok := w.base[f]; ok {
			base[f] = s
		} else {
			base[f] = stampOf(f)
		}
	}
	w.base, w.last, w.settled = base, nil, 0
}

// Sync takes the files as they are now as unchanged: a reload that is about to read them (on
// SIGHUP) sees what the watcher saw, so the watcher does not ask for the same reload again.
func (w *Watcher) Sync() {
	if w == nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for f := range w.base {
		w.base[f] = stampOf(f)
	}
	w.last, w.settled = nil, 0
	select {
	case <-w.ch: // a report not taken yet is now stale
	default:
	}
}

// Run polls until ctx ends.
func (w *Watcher) Run(ctx context.Context) {
	if w == nil {
		return
	}
	t := time.NewTicker(w.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if changed := w.poll(); len(changed) > 0 {
				select {
				case w.ch <- changed:
				case <-ctx.Done():
					return
				}
			}
		}
	}
}

// poll stamps every file and returns the changed ones once they are stable.
func (w *Watcher) poll() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	cur := make(map[string]stamp, len(w.base))
	var changed []string
	for f, s := range w.base {
		c := stampOf(f)
		cur[f] = c
		if c != s {
			changed = append(changed, f)
		}
	}
	if len(changed) == 0 {
		w.last, w.settled = nil, 0
		return nil
	}
	stable := w.last != nil && equal(cur, w.last)
	w.last = cur
	w.settled++
	if !stable && w.settled < maxSettle {
		return nil
	}
	w.base, w.last, w.settled = cur, nil, 0
	slices.Sort(changed)
	return changed
}

func equal(a, b map[string]stamp) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}
