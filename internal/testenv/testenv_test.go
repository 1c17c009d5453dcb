package testenv

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// recorder is a testing.TB that records Errorf and Fatalf instead of failing the test; Fatalf
// ends the goroutine, as the real one does, so calls that may fail run through record.
type recorder struct {
	testing.TB
	mu   sync.Mutex
	msgs []string
}

func (r *recorder) Helper() {}

func (r *recorder) Errorf(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, fmt.Sprintf(format, args...))
}

func (r *recorder) Fatalf(format string, args ...any) {
	r.Errorf(format, args...)
	runtime.Goexit()
}

func (r *recorder) Fatal(args ...any) { r.Fatalf("%s", fmt.Sprint(args...)) }

// record runs f with a recorder on its own goroutine and returns what it reported.
func record(t *testing.T, f func(tb testing.TB)) []string {
	t.Helper()
	r := &recorder{TB: t}
	done := make(chan struct{})
	go func() { defer close(done); f(r) }()
	<-done
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.msgs
}

func TestSyncBufferAndHeader(t *testing.T) {
	var b SyncBuffer
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() { defer wg.Done(); fmt.Fprint(&b, "ab") }()
	}
	wg.Wait()
	if b.String() != strings.Repeat("ab", 8) {
		t.Fatalf("SyncBuffer = %q", b.String())
	}
	hs := [][2]string{{"Content-Type", "text/plain"}, {"x-a", "1"}, {"X-A", "2"}}
	f := func(name, want string) {
		t.Helper()
		if got := Header(hs, name); got != want {
			t.Errorf("Header(%q) = %q, want %q", name, got, want)
		}
	}
	f("content-type", "text/plain")
	f("X-A", "1") // the first one
	f("missing", "")
}

func TestDialAndHTTPGet(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusTeapot)
		io.WriteString(w, "path "+r.URL.Path)
	}))
	defer srv.Close()
	addr := srv.Listener.Addr().String()
	if !Dialable("tcp", addr) {
		t.Fatal("a listening server is not dialable")
	}
	if code, body := HTTPGet(srv.URL + "/x"); code != http.StatusTeapot || body != "path /x" {
		t.Fatalf("HTTPGet = %d %q", code, body)
	}
	free := FreeAddr(t)
	if Dialable("tcp", free) {
		t.Fatalf("FreeAddr %s is in use", free)
	}
	if code, body := HTTPGet("http://" + free + "/"); code != 0 || !strings.Contains(body, "refused") {
		t.Fatalf("HTTPGet of nothing = %d %q", code, body)
	}
	if code, _ := HTTPGet("http://bad host/"); code != 0 {
		t.Fatalf("HTTPGet of a bad URL = %d", code)
	}

	// WaitDial returns once the address serves, and fails at once, with the output, when the
	// process ends first.
	WaitDial(t, fakeRunning{}, "tcp", addr)
	msgs := record(t, func(tb testing.TB) { WaitDial(tb, fakeRunning{exited: true, out: "boom"}, "tcp", free) })
	if len(msgs) != 1 || !strings.Contains(msgs[0], "ended before serving on "+free) || !strings.Contains(msgs[0], "boom") {
		t.Fatalf("WaitDial of an ended process: %q", msgs)
	}
	msgs = record(t, func(tb testing.TB) { WaitFor(tb, 50*time.Millisecond, "never", func() bool { return false }) })
	if len(msgs) != 1 || !strings.Contains(msgs[0], "waiting for never") {
		t.Fatalf("WaitFor timeout: %q", msgs)
	}
}

type fakeRunning struct {
	exited bool
	out    string
}

func (f fakeRunning) Exited() bool   { return f.exited }
func (f fakeRunning) Output() string { return f.out }

// hupMain is a MainFunc that logs "ready", then "reloaded N" on each SIGHUP, and returns the
// error its args name when cancelled.
func hupMain(ctx context.Context, args []string, stderr io.Writer) error {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	fmt.Fprintln(stderr, "ready")
	for n := 1; ; n++ {
		select {
		case <-hup:
			fmt.Fprintf(stderr, "reloaded %d\n", n)
		case <-ctx.Done():
			if len(args) > 0 {
				return errors.New(args[0])
			}
			return nil
		}
	}
}

func TestRunMain(t *testing.T) {
	r := RunMain(t, hupMain)
	WaitFor(t, 5*time.Second, "ready", func() bool { return strings.Contains(r.Output(), "ready") })
	if r.Exited() {
		t.Fatal("exited while running")
	}
	if got := r.Reload(t, "never logged", "reloaded"); got != "reloaded" {
		t.Fatalf("Reload = %q", got)
	}
	r.Reload(t, "reloaded") // one more line each time
	if !strings.Contains(r.Logs.String(), "reloaded 2") {
		t.Fatalf("logs: %s", r.Logs.String())
	}
	r.Stop(t)
	if !r.Exited() {
		t.Fatal("not exited after Stop")
	}
	r.Stop(t) // only the first call does anything
	if err, ok := r.Wait(time.Second); !ok || err != nil {
		t.Fatalf("Wait = %v, %v", err, ok)
	}

	// A Main that returns an error fails the test when stopped.
	msgs := record(t, func(tb testing.TB) {
		r := RunMain(t, hupMain, "bad exit")
		r.Stop(tb)
	})
	if len(msgs) != 1 || msgs[0] != "Main returned bad exit" {
		t.Fatalf("Stop of a failing Main: %q", msgs)
	}
	// Cancel alone ends it too; Wait sees the end.
	r = RunMain(t, hupMain)
	if _, ok := r.Wait(10 * time.Millisecond); ok {
		t.Fatal("Wait returned before the end")
	}
	r.Cancel()
	if err, ok := r.Wait(5 * time.Second); !ok || err != nil {
		t.Fatalf("after Cancel: %v, %v", err, ok)
	}
}

func TestProc(t *testing.T) {
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh")
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "s.sock")
	// A process that logs each SIGHUP, and a Unix socket the test serves for WaitDial.
	p := Start(t, sh, []string{"TESTENV_X=1"}, "-c", `trap 'echo "hup $TESTENV_X"' HUP; trap 'exit 0' TERM; echo started; while :; do sleep 0.05; done`)
	WaitFor(t, 5*time.Second, "the shell to start", func() bool { return strings.Contains(p.Output(), "started") })
	if got := p.Reload(t, "hup 1"); got != "hup 1" {
		t.Fatalf("Reload = %q", got)
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	WaitDial(t, p, "unix", sock)
	if p.PID() <= 0 || p.Exited() {
		t.Fatal("not running")
	}
	p.Stop(t)
	if !p.Exited() {
		t.Fatal("running after Stop")
	}
	p.Stop(t) // nothing to do

	q := Start(t, sh, nil, "-c", "exec sleep 30")
	q.Kill()
	if err, ok := q.Wait(time.Second); !ok || err == nil {
		t.Fatalf("after Kill: %v, %v", err, ok)
	}
	msgs := record(t, func(tb testing.TB) { Start(tb, filepath.Join(dir, "missing"), nil) })
	if len(msgs) != 1 || !strings.HasPrefix(msgs[0], "start ") {
		t.Fatalf("Start of a missing binary: %q", msgs)
	}
}

func TestRedis(t *testing.T) {
	r := StartRedis(t, "")
	if !r.answers() || r.PID() <= 0 {
		t.Fatal("not answering after StartRedis")
	}
	r.Pause()
	if r.answers() {
		t.Fatal("answering while paused")
	}
	r.Resume()
	if !r.answers() {
		t.Fatal("not answering after Resume")
	}
	r.Kill()
	if Dialable("tcp", r.Addr) {
		t.Fatal("listening after Kill")
	}
	r.Kill() // nothing to do
	r.Start()
	if !r.answers() {
		t.Fatal("not answering after a restart on the same address")
	}
	msgs := record(t, func(tb testing.TB) { (&Redis{Addr: "no-port", t: tb}).Start() })
	if len(msgs) != 1 || !strings.Contains(msgs[0], `redis-server address "no-port"`) {
		t.Fatalf("Start on a bad address: %q", msgs)
	}
}

func TestCheckAuditLog(t *testing.T) {
	const logs = `{"level":"info","metadata":{"audit":true,"v":"1"},"message":"config reloaded"}
{"level":"error","message":"config reload failed"}
{"level":"info","metadata":{"audit":true,"v":"2"},"message":"config reloaded"}
`
	lines := CheckAuditLog(t, logs, map[string]string{"config reloaded": "info"})
	if got := lines["config reloaded"]; got.Metadata["v"] != "2" || !got.Audit() || !strings.HasPrefix(got.Text, `{"level":"info"`) {
		t.Fatalf("last line: %+v", got)
	}
	if LogLines(t, "\n") != nil {
		t.Fatal("lines in an empty log")
	}
	msgs := record(t, func(tb testing.TB) {
		CheckAuditLog(tb, logs+`{"level":"warn","message":"agent unhealthy"}`, map[string]string{"config reloaded": "warn", "absent": "info"})
	})
	want := []string{
		`a line below error that is not an audit line: {"level":"warn","message":"agent unhealthy"}`,
		`"absent": "" (found false), want an audit line at info`,
		`"config reloaded": "{\"level\":\"info\",\"metadata\":{\"audit\":true,\"v\":\"2\"},\"message\":\"config reloaded\"}" (found true), want an audit line at warn`,
	}
	slices.Sort(msgs)
	slices.Sort(want)
	if !slices.Equal(msgs, want) {
		t.Fatalf("failures:\n%s\nwant:\n%s", strings.Join(msgs, "\n"), strings.Join(want, "\n"))
	}
	msgs = record(t, func(tb testing.TB) { LogLines(tb, "not json\n") })
	if len(msgs) != 1 || !strings.Contains(msgs[0], `log line "not json" is not a JSON object`) {
		t.Fatalf("a line that is not JSON: %q", msgs)
	}
}
