// Package uds listens on Unix domain sockets the way both processes need: a "unix://" prefix is
// accepted, a stale socket file left by a dead process is removed, a live one is refused, and
// the socket is made readable and writable by its owner only (0600), or given the mode asked for.
package uds

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Path strips an optional unix:// or unix: prefix.
func Path(addr string) string {
	if p, ok := strings.CutPrefix(addr, "unix://"); ok {
		return p
	}
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		return p
	}
	return addr
}

// Listen listens on the socket at addr, mode 0600.
func Listen(addr string) (net.Listener, error) { return ListenMode(addr, 0o600) }

// ListenMode listens on the socket at addr and gives it mode (permission bits only).
func ListenMode(addr string, mode fs.FileMode) (net.Listener, error) {
	path := Path(addr)
	if path == "" {
		return nil, errors.New("empty socket path")
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("socket path %q exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
			c.Close()
			return nil, fmt.Errorf("socket %q is in use by another process", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket %q: %w", path, err)
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, mode.Perm()); err != nil {
		ln.Close()
		return nil, fmt.Errorf("set mode of socket %q: %w", path, err)
	}
	return ln, nil
}
