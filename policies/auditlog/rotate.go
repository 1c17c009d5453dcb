package auditlog

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"sync"
)

// rotatingFile appends to a file and rotates it by size: when a write would take the file past
// maxSize, the file becomes path.1, path.1 becomes path.2 and so on, path.<maxBackups> is
// deleted, and writing goes on in a new, empty path. A write larger than maxSize still goes to a
// file of its own, whole. Writes are buffered until Flush; it is safe for concurrent use.
type rotatingFile struct {
	mu         sync.Mutex
	path       string
	maxSize    int64
	maxBackups int
	f          *os.File
	bw         *bufio.Writer
	size       int64
}

// fileMode keeps audit records, which name users and paths, readable by the agent's user only.
const fileMode = 0o600

func newRotatingFile(path string, maxSize int64, maxBackups int) *rotatingFile {
	return &rotatingFile{path: path, maxSize: maxSize, maxBackups: maxBackups}
}

// Write appends p, rotating first when p would not fit.
func (r *rotatingFile) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.f == nil {
		if err := r.open(); err != nil {
			return 0, err
		}
	}
	if r.size > 0 && r.size+int64(len(p)) > r.maxSize {
		if err := r.rotate(); err != nil {
			return 0, err
		}
	}
	n, err := writeWhole(r.bw, p)
	r.size += int64(n)
	return n, err
}

// Flush writes the buffered records to the file.
func (r *rotatingFile) Flush() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.f == nil {
		return nil
	}
	if err := r.bw.Flush(); err != nil {
		// bufio.Writer keeps its first error for good: drop the buffer (its records are lost
		// and counted) and the file, so that the next record opens it again and a disk that
		// has room again is written to.
		r.bw.Reset(r.f)
		_ = r.f.Close()
		r.f = nil
		return fmt.Errorf("write audit log %q: %w", r.path, err)
	}
	return nil
}

// Close flushes and closes the file.
func (r *rotatingFile) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.closeFile()
}

func (r *rotatingFile) open() error {
	f, err := os.OpenFile(r.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, fileMode)
	if err != nil {
		return fmt.Errorf("open audit log: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("open audit log: %w", err)
	}
	r.f, r.size = f, st.Size()
	if r.bw == nil {
		r.bw = bufio.NewWriterSize(f, 64<<10)
	} else {
		r.bw.Reset(f)
	}
	return nil
}

func (r *rotatingFile) closeFile() error {
	if r.f == nil {
		return nil
	}
	err := r.bw.Flush()
	if cerr := r.f.Close(); err == nil {
		err = cerr
	}
	r.f = nil
	if err != nil {
		return fmt.Errorf("close audit log %q: %w", r.path, err)
	}
	return nil
}

func (r *rotatingFile) backup(i int) string { return r.path + "." + strconv.Itoa(i) }

func (r *rotatingFile) rotate() error {
	if err := r.closeFile(); err != nil {
		return err
	}
	if r.maxBackups == 0 {
		if err := os.Remove(r.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("rotate audit log: %w", err)
		}
		return r.open()
	}
	if err := os.Remove(r.backup(r.maxBackups)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("rotate audit log: %w", err)
	}
	for i := r.maxBackups - 1; i >= 1; i-- {
		if err := os.Rename(r.backup(i), r.backup(i+1)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("rotate audit log: %w", err)
		}
	}
	if err := os.Rename(r.path, r.backup(1)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("rotate audit log: %w", err)
	}
	return r.open()
}
