// Package fsperm checks that the files a process trusts cannot be replaced by any user of the
// machine: a config file, or a directory that holds a config or a Unix socket, that every user
// may write to lets any of them change the policies in force, or put their own socket where the
// kernel sends every request (with its API keys and tokens) to be judged.
//
// Both processes make these checks at start-up (and refuse to start) as well as under
// --validate. A path on a file system mounted read-only is accepted whatever its mode: no one
// can write to it. That is how Kubernetes mounts ConfigMaps and Secrets (a 0777 or 1777
// directory behind symlinks, on a read-only mount). So is the root of a Kubernetes emptyDir
// volume: the kubelet makes it mode 0777, but only the containers of the pod mount it, so only
// they can write there; it is the normal place for the sockets a pod's containers share. It is
// told apart from an ordinary world-writable directory by /proc/self/mountinfo: the directory
// is a mount point whose source, on the node, lies under a pod's
// volumes/kubernetes.io~empty-dir/ (a disk-backed emptyDir; one of medium Memory is a tmpfs
// that looks like any other and is refused). A directory below it is judged by its own mode.
package fsperm

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// readOnly reports whether path is on a file system mounted read-only; a test may replace it.
var readOnly = func(path string) bool {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false
	}
	return st.Flags&unix.ST_RDONLY != 0
}

// mountInfo returns the text of /proc/self/mountinfo; a test may replace it.
var mountInfo = func() ([]byte, error) { return os.ReadFile("/proc/self/mountinfo") }

// emptyDirMark is the part of an emptyDir volume's path on a Kubernetes node.
const emptyDirMark = "/volumes/kubernetes.io~empty-dir/"

// podVolume reports whether path is the mount point of a pod's emptyDir volume: a line of
// mountinfo whose mount point (field 5) is path and whose root within its file system (field 4)
// lies under a pod's emptyDir directory.
func podVolume(path string) bool {
	data, err := mountInfo()
	if err != nil {
		return false
	}
	clean := filepath.Clean(path)
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 || unescapeMount(f[4]) != clean {
			continue
		}
		if strings.Contains(unescapeMount(f[3]), emptyDirMark) {
			return true
		}
	}
	return false
}

// unescapeMount undoes mountinfo's octal escapes of space, tab, newline and backslash.
func unescapeMount(s string) string {
	if !strings.Contains(s, "\\") {
		return s
	}
	return strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`).Replace(s)
}

// writable reports whether every user may write to path, whose mode fi holds: the mode says
// so, its file system is not mounted read-only, and it is not the root of a pod's emptyDir.
func writable(path string, fi fs.FileInfo) bool {
	return fi.Mode().Perm()&0o002 != 0 && !readOnly(path) && !(fi.IsDir() && podVolume(path))
}

// CheckDir fails when dir is writable by every user (whatever its sticky bit, which stops no one
// from creating a file that is not there yet), unless its file system is mounted read-only. A directory that does not exist yet is judged by
// its nearest existing ancestor, where it would be created. what names the directory's role in
// the error, such as "config directory".
func CheckDir(what, dir string) error {
	d := filepath.Clean(dir)
	for {
		fi, err := os.Stat(d)
		if err == nil {
			if !writable(d, fi) {
				return nil
			}
			where := fmt.Sprintf("%s %q", what, d)
			if d != filepath.Clean(dir) {
				where = fmt.Sprintf("%q, the nearest existing directory above the %s %q,", d, what, filepath.Clean(dir))
			}
			return fmt.Errorf("%s is writable by every user (mode %s): any user could replace what the process trusts there; remove their write permission (chmod o-w %s)", where, mode(fi), d)
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("check %s %q: %w", what, d, err)
		}
		parent := filepath.Dir(d)
		if parent == d {
			return nil
		}
		d = parent
	}
}

// CheckFile fails when the file at path is writable by every user, unless its file system is
// mounted read-only; a missing file is no problem of permissions.
func CheckFile(what, path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("check %s %q: %w", what, path, err)
	}
	if writable(path, fi) {
		return fmt.Errorf("%s %q is writable by every user (mode %s); remove their write permission (chmod o-w %s)", what, path, mode(fi), path)
	}
	return nil
}

// CheckConfig checks a config file and its directory.
func CheckConfig(path string) error {
	return errors.Join(CheckFile("config file", path), CheckDir("config directory", filepath.Dir(path)))
}

// CheckSocket checks the directory of a Unix socket.
func CheckSocket(socketPath string) error {
	return CheckDir("socket directory", filepath.Dir(socketPath))
}

// mode formats permission bits the way chmod takes them, sticky bit included.
func mode(fi fs.FileInfo) string {
	m := uint32(fi.Mode().Perm())
	if fi.Mode()&fs.ModeSticky != 0 {
		m |= 0o1000
	}
	if fi.Mode()&fs.ModeSetgid != 0 {
		m |= 0o2000
	}
	if fi.Mode()&fs.ModeSetuid != 0 {
		m |= 0o4000
	}
	return fmt.Sprintf("%04o", m)
}
