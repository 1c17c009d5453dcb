// Package secrets resolves references to secrets in config values, so that a config file never
// holds a secret itself: a string value that is exactly ${env:NAME} becomes the value of the
// environment variable NAME, and ${file:/path} the contents of the file at /path, without its
// trailing newline (Kubernetes and Docker secrets are files). Any other string is kept as it is;
// $${ at the start escapes a literal ${.
//
// Errors name the reference (the variable or the file), never a secret.
//
// A file reference reads a regular file of at most MaxFileSize bytes: a device (/dev/zero), a
// FIFO or a directory is refused before it is read, so a mistyped path can neither hang the
// load nor fill the process's memory.
package secrets

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"syscall"
)

// MaxFileSize is the largest file a ${file:...} reference reads: secrets are keys, tokens and
// certificates, far smaller.
const MaxFileSize = 1 << 20

// ErrNotRegular is returned for a file reference to something other than a regular file.
var ErrNotRegular = errors.New("not a regular file")

// ErrTooLarge is returned for a file reference to a file larger than MaxFileSize.
var ErrTooLarge = fmt.Errorf("larger than %d bytes", MaxFileSize)

// ErrNotSet is returned for a reference to an environment variable that is not set.
var ErrNotSet = errors.New("environment variable not set")

// Lookup reads the environment and the file system; tests replace it.
type Lookup struct {
	Env  func(string) (string, bool)
	File func(string) ([]byte, error)
}

// OS reads the real environment and file system.
var OS = Lookup{Env: os.LookupEnv, File: ReadFile}

// ReadFile reads a secret file: a regular file of at most MaxFileSize bytes. The file is opened
// without blocking (a FIFO would otherwise wait for a writer), checked on the open descriptor,
// and read through a limit, so a file that grows after the check is still cut off.
func ReadFile(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: %w (%s)", path, ErrNotRegular, kind(st.Mode()))
	}
	if st.Size() > MaxFileSize {
		return nil, fmt.Errorf("%s: %w", path, ErrTooLarge)
	}
	b, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, err
	}
	if len(b) > MaxFileSize {
		return nil, fmt.Errorf("%s: %w", path, ErrTooLarge)
	}
	return b, nil
}

// kind names the type of a file that is not regular.
func kind(m os.FileMode) string {
	switch {
	case m.IsDir():
		return "a directory"
	case m&os.ModeNamedPipe != 0:
		return "a FIFO"
	case m&os.ModeCharDevice != 0:
		return "a character device"
	case m&os.ModeDevice != 0:
		return "a device"
	case m&os.ModeSocket != 0:
		return "a socket"
	}
	return "type " + m.Type().String()
}

// IsRef reports whether s is a secret reference.
func IsRef(s string) bool {
	_, _, ok := parseRef(s)
	return ok
}

// parseRef splits ${kind:arg}.
func parseRef(s string) (kind, arg string, ok bool) {
	body, ok := strings.CutPrefix(s, "${")
	if !ok {
		return "", "", false
	}
	body, ok = strings.CutSuffix(body, "}")
	if !ok {
		return "", "", false
	}
	kind, arg, ok = strings.Cut(body, ":")
	if !ok || arg == "" || (kind != "env" && kind != "file") {
		return "", "", false
	}
	return kind, arg, true
}

// FileRef returns the path of a ${file:/path} reference.
func FileRef(s string) (string, bool) {
	kind, arg, ok := parseRef(s)
	if !ok || kind != "file" {
		return "", false
	}
	return arg, true
}

// Resolve returns the value a config string stands for.
func (l Lookup) Resolve(s string) (string, error) {
	if rest, ok := strings.CutPrefix(s, "$${"); ok {
		return "${" + rest, nil
	}
	kind, arg, ok := parseRef(s)
	if !ok {
		return s, nil
	}
	switch kind {
	case "env":
		v, set := l.Env(arg)
		if !set {
			return "", fmt.Errorf("secret ${env:%s}: %w", arg, ErrNotSet)
		}
		return v, nil
	default:
		b, err := l.File(arg)
		if err != nil {
			return "", fmt.Errorf("secret ${file:%s}: %w", arg, err)
		}
		return strings.TrimRight(string(b), "\r\n"), nil
	}
}

// Resolve resolves s with the real environment and file system.
func Resolve(s string) (string, error) { return OS.Resolve(s) }

// ResolveMap returns a copy of m with every value resolved; every problem is reported.
func (l Lookup) ResolveMap(m map[string]string) (map[string]string, error) {
	if m == nil {
		return nil, nil
	}
	out := make(map[string]string, len(m))
	var errs []error
	for _, k := range slices.Sorted(maps.Keys(m)) {
		r, err := l.Resolve(m[k])
		if err != nil {
			errs = append(errs, fmt.Errorf("key %q: %w", k, err))
			continue
		}
		out[k] = r
	}
	return out, errors.Join(errs...)
}

// ResolveJSON resolves every string of a JSON document, at any depth, and returns the new
// document; a document without references comes back unchanged.
func (l Lookup) ResolveJSON(doc []byte) ([]byte, error) {
	if len(doc) == 0 || !bytes.Contains(doc, []byte("${")) {
		return doc, nil
	}
	dec := json.NewDecoder(bytes.NewReader(doc))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, fmt.Errorf("parse JSON: %w", err)
	}
	var errs []error
	v = l.walk(v, "", &errs)
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return json.Marshal(v)
}

func (l Lookup) walk(v any, path string, errs *[]error) any {
	switch x := v.(type) {
	case string:
		r, err := l.Resolve(x)
		if err != nil {
			*errs = append(*errs, fmt.Errorf("%s: %w", strings.TrimPrefix(path, "."), err))
			return x
		}
		return r
	case map[string]any:
		for _, k := range slices.Sorted(maps.Keys(x)) {
			x[k] = l.walk(x[k], path+"."+k, errs)
		}
	case []any:
		for i, e := range x {
			x[i] = l.walk(e, fmt.Sprintf("%s[%d]", path, i), errs)
		}
	}
	return v
}
