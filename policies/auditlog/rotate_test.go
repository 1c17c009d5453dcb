package auditlog

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// readLines returns the lines of a file, or nil when it does not exist.
func readLines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

func files(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	return names
}

func TestRotatingFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.log")
	r := newRotatingFile(path, 100, 2)
	// Records of 20 bytes: five fit in a file of 100.
	for i := 0; i < 23; i++ {
		if _, err := fmt.Fprintf(r, "record %012d\n", i); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if got, want := files(t, dir), []string{"audit.log", "audit.log.1", "audit.log.2"}; !equal(got, want) {
		t.Fatalf("files = %v, want %v", got, want)
	}
	// The newest records are in audit.log, the older ones in .1 and .2; the oldest are gone.
	want := map[string][2]int{"audit.log": {20, 22}, "audit.log.1": {15, 19}, "audit.log.2": {10, 14}}
	for name, span := range want {
		lines := readLines(t, filepath.Join(dir, name))
		if len(lines) != span[1]-span[0]+1 {
			t.Fatalf("%s has %d lines, want %d", name, len(lines), span[1]-span[0]+1)
		}
		for i, l := range lines {
			if l != fmt.Sprintf("record %012d", span[0]+i) {
				t.Fatalf("%s line %d = %q", name, i, l)
			}
		}
		st, _ := os.Stat(filepath.Join(dir, name))
		if st.Size() > 100 || st.Mode().Perm() != fileMode {
			t.Fatalf("%s: size %d, mode %v", name, st.Size(), st.Mode())
		}
	}

	// Reopening appends to the existing file and rotates when it is full.
	r = newRotatingFile(path, 100, 2)
	for i := 23; i < 26; i++ {
		fmt.Fprintf(r, "record %012d\n", i)
	}
	r.Close()
	if lines := readLines(t, path); len(lines) != 1 || lines[0] != "record 000000000025" {
		t.Fatalf("after reopening: %q", lines)
	}
	if lines := readLines(t, path+".1"); len(lines) != 5 || lines[4] != "record 000000000024" {
		t.Fatalf("after reopening, .1: %q", lines)
	}
}

func TestRotatingFileNoBackups(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.log")
	r := newRotatingFile(path, 50, 0)
	for i := 0; i < 7; i++ {
		fmt.Fprintf(r, "record %012d\n", i)
	}
	// A record larger than the maximum gets a file of its own, whole.
	big := strings.Repeat("x", 120) + "\n"
	r.Write([]byte(big))
	fmt.Fprintf(r, "record %012d\n", 7)
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if got := files(t, dir); !equal(got, []string{"audit.log"}) {
		t.Fatalf("files = %v", got)
	}
	if lines := readLines(t, path); len(lines) != 1 || lines[0] != "record 000000000007" {
		t.Fatalf("lines = %q", lines)
	}
	// Close twice is fine; Flush of a closed file is a no-op.
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r.Flush(); err != nil {
		t.Fatal(err)
	}
}

func TestRotatingFileErrors(t *testing.T) {
	dir := t.TempDir()
	// The path is a directory: opening fails.
	r := newRotatingFile(dir, 100, 1)
	if _, err := r.Write([]byte("x\n")); err == nil || !strings.Contains(err.Error(), "open audit log") {
		t.Fatalf("Write to a directory: %v", err)
	}
	// A backup that cannot be replaced: audit.log.1 is a non-empty directory.
	path := filepath.Join(dir, "audit.log")
	if err := os.MkdirAll(filepath.Join(path+".1", "d"), 0o755); err != nil {
		t.Fatal(err)
	}
	r = newRotatingFile(path, 10, 1)
	if _, err := r.Write([]byte("0123456789\n")); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Write([]byte("x\n")); err == nil || !strings.Contains(err.Error(), "rotate audit log") {
		t.Fatalf("rotation onto a directory: %v", err)
	}
	for _, backups := range []int{0, 2} {
		r = newRotatingFile(path, 10, backups)
		os.WriteFile(path, []byte("0123456789\n"), 0o600)
		if backups == 2 {
			os.MkdirAll(filepath.Join(path+".2", "d"), 0o755)
		}
		if backups == 0 {
			// The file cannot be removed when its directory is read-only.
			os.Chmod(dir, 0o500)
		}
		_, err := r.Write([]byte("x\n"))
		os.Chmod(dir, 0o700)
		r.Close()
		if os.Geteuid() == 0 && backups == 0 {
			continue // root ignores directory permissions
		}
		if err == nil || !strings.Contains(err.Error(), "rotate audit log") {
			t.Fatalf("max_backups %d: rotation error = %v", backups, err)
		}
	}
}

func equal(a, b []string) bool {
	return strings.Join(a, "\x00") == strings.Join(b, "\x00")
}

// TestFileSinkRotation writes through the policy's file sink with max_size_mb 1 and
// max_backups 1, from many goroutines: the files stay within 1 MiB, there is one backup, and
// every record is a whole JSON line.
func TestFileSinkRotation(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.log")
	raw := `{"sink":"file","path":"` + path + `","max_size_mb":1,"max_backups":1,"queue_size":100000}`
	fac, err := New(policy.Config{Raw: json.RawMessage(raw)})
	if err != nil {
		t.Fatal(err)
	}
	f := fac.(*Factory)
	line := []byte(`{"pad":"` + strings.Repeat("p", 1000) + `"}` + "\n")
	const writers, each = 4, 800 // 3.2 MB in all
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				f.sink.enqueue(line)
			}
		}()
	}
	wg.Wait()
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.HealthCheck(t.Context()); err != nil {
		t.Fatal(err)
	}
	if got := files(t, dir); !equal(got, []string{"audit.log", "audit.log.1"}) {
		t.Fatalf("files = %v", got)
	}
	// Whole records fill each file up to 1 MiB; the two oldest files are gone.
	per := (1 << 20) / len(line)
	for name, want := range map[string]int{path: writers * each % per, path + ".1": per} {
		fh, err := os.Open(name)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		sc := bufio.NewScanner(fh)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			if !json.Valid(sc.Bytes()) {
				t.Fatalf("%s: a line is not JSON: %.60q", name, sc.Text())
			}
			n++
		}
		fh.Close()
		if n != want {
			t.Errorf("%s: %d records, want %d", name, n, want)
		}
	}
}

// TestFileSinkHealth shows a failing sink in HealthCheck and in the error counter.
func TestFileSinkHealth(t *testing.T) {
	dir := t.TempDir()
	// The path is a directory, so opening it for writing fails.
	target := filepath.Join(dir, "audit.log")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	logs := &testenv.SyncBuffer{}
	level, _ := logging.ParseLevel("info")
	fac, err := New(policy.Config{Raw: json.RawMessage(`{"sink":"file","path":"` + target + `"}`), Log: logging.New(logs, "agent", level)})
	if err != nil {
		t.Fatal(err)
	}
	f := fac.(*Factory)
	before := writeErrors.Get()
	f.sink.enqueue([]byte(`{"user_id":"SECRET-RECORD"}` + "\n"))
	// The writer works in the background; Close waits for it.
	f.Close()
	if !strings.Contains(logs.String(), "audit log write failed; records lost") || strings.Contains(logs.String(), "SECRET-RECORD") {
		t.Fatalf("logs = %s", logs.String())
	}
	if writeErrors.Get() == before {
		t.Fatal("write error not counted")
	}
	if err := f.HealthCheck(t.Context()); err == nil || !strings.Contains(err.Error(), "audit log sink: open audit log") {
		t.Fatalf("HealthCheck = %v", err)
	}
}

// switchWriter fails every write while broken is set, as a full disk does.
type switchWriter struct {
	mu     sync.Mutex
	broken bool
	out    strings.Builder
}

func (w *switchWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.broken {
		return 0, syscall.ENOSPC
	}
	return w.out.Write(p)
}

func (w *switchWriter) set(broken bool) {
	w.mu.Lock()
	w.broken = broken
	w.mu.Unlock()
}

// TestOnSinkError: once a write has failed, every exchange is refused with 503 under
// on_sink_error: deny (the default), or let through and counted once under continue; when the
// disk has room again the next record is written and exchanges pass again.
func TestOnSinkError(t *testing.T) {
	for _, mode := range []string{"", SinkErrorDeny, SinkErrorContinue} {
		t.Run("mode="+mode, func(t *testing.T) {
			raw := `{}`
			if mode != "" {
				raw = `{"on_sink_error":"` + mode + `"}`
			}
			fac := newFactory(t, raw)
			w := &switchWriter{}
			fac.sink = newSink(stdoutWriter{bufio.NewWriterSize(w, 256), w}, 16, nil)
			t.Cleanup(func() { fac.sink.Close() })
			p := mustBuild(t, fac, nil)
			reqCtx := func() *policy.Context {
				return &policy.Context{Phase: agentv1.PolicyPhase_REQUEST, RouteName: "/r", State: map[string]string{}}
			}
			exchange := func() (policy.Result, policy.Result) {
				c := reqCtx()
				req, _ := p.Execute(t.Context(), c)
				p.ObserveChain(c, policy.Outcome{Status: req.Status})
				if req.Status != agentv1.StatusCode_OK {
					return req, policy.Result{}
				}
				c.Phase = agentv1.PolicyPhase_RESPONSE
				for _, in := range req.Instructions {
					if st := in.GetState(); st != nil {
						c.State[st.GetKey()] = st.GetValue()
					}
				}
				c.Response = &policy.ResponseContext{Status: 200}
				resp, _ := p.Execute(t.Context(), c)
				p.ObserveChain(c, policy.Outcome{Status: resp.Status})
				return req, resp
			}
			waitFailing := func(want bool) {
				t.Helper()
				testenv.WaitFor(t, 5*time.Second, "the sink's state", func() bool { return fac.sink.failing.Load() == want })
			}
			w.set(true)
			if req, _ := exchange(); req.Status != agentv1.StatusCode_OK {
				t.Fatal("the first exchange is refused before any write failed")
			}
			waitFailing(true)
			if err := fac.HealthCheck(t.Context()); err == nil {
				t.Fatal("HealthCheck: nil with a failing sink")
			}
			deny, cont := sinkFailingDeny.Get(), sinkFailingContinue.Get()
			req, resp := exchange()
			if mode == SinkErrorContinue {
				if req.Status != agentv1.StatusCode_OK || resp.Status != agentv1.StatusCode_OK {
					t.Fatalf("continue: %v %v", req, resp)
				}
				if n := sinkFailingContinue.Get() - cont; n != 1 {
					t.Fatalf("continue counted %d times for one exchange", n)
				}
			} else {
				ir := req.Instructions[0].GetImmediateResponse()
				if req.Status != agentv1.StatusCode_POLICY_DENIED || ir.GetStatusCode() != 503 || !strings.Contains(string(ir.GetBody()), "audit_log_unavailable") {
					t.Fatalf("deny: %+v", req)
				}
				if n := sinkFailingDeny.Get() - deny; n != 1 {
					t.Fatalf("deny counted %d times", n)
				}
			}
			// The disk has room again: the next record is written and the sink recovers.
			w.set(false)
			exchange()
			waitFailing(false)
			if req, resp := exchange(); req.Status != agentv1.StatusCode_OK || resp.Status != agentv1.StatusCode_OK {
				t.Fatalf("after recovery: %v %v", req, resp)
			}
		})
	}
}

// TestRotatingFileRecovers: after a flush fails (the disk is full), the file is reopened by the
// next record instead of failing for good (bufio.Writer keeps its first error).
func TestRotatingFileRecovers(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	r := newRotatingFile(path, 1<<20, 1)
	defer r.Close()
	if _, err := r.Write([]byte("a\n")); err != nil {
		t.Fatal(err)
	}
	// Make the open file unwritable, as a full disk would be.
	r.f.Close()
	if err := r.Flush(); err == nil {
		t.Fatal("Flush to a closed file succeeded")
	}
	if _, err := r.Write([]byte("b\n")); err != nil {
		t.Fatalf("Write after a failed flush: %v", err)
	}
	if err := r.Flush(); err != nil {
		t.Fatalf("Flush after a failed flush: %v", err)
	}
	if got := readLines(t, path); !equal(got, []string{"b"}) {
		t.Fatalf("file holds %q", got)
	}
}
