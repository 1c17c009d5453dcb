package testenv

import (
	"context"
	"io"
	"os"
	"sync"
	"syscall"
	"testing"
)

// MainFunc is the shape of kernel.Main and agent.Main: the whole process but for the signals
// that cancel ctx.
type MainFunc func(ctx context.Context, args []string, stderr io.Writer) error

// InProc is a MainFunc running on a goroutine of the test's process, for tests that want the
// whole process without building its binary (and with its coverage).
type InProc struct {
	// Logs collects what Main writes to stderr.
	Logs   *SyncBuffer
	cancel context.CancelFunc
	stop   sync.Once
	ending
}

// RunMain runs main with args until Stop, which the end of the test calls.
func RunMain(t testing.TB, main MainFunc, args ...string) *InProc {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &InProc{Logs: &SyncBuffer{}, cancel: cancel, ending: newEnding()}
	go func() { r.end(main(ctx, args, r.Logs)) }()
	t.Cleanup(func() { r.Stop(t) })
	return r
}

// Cancel asks Main to return, as SIGTERM does to the process.
func (r *InProc) Cancel() { r.cancel() }

// Output returns what Main has logged so far.
func (r *InProc) Output() string { return r.Logs.String() }

// Stop cancels Main and waits up to StartTimeout for it to return; the test fails when it
// does not, or returns an error. Only the first call does anything.
func (r *InProc) Stop(t testing.TB) {
	t.Helper()
	r.stop.Do(func() {
		r.cancel()
		err, ok := r.Wait(StartTimeout)
		switch {
		case !ok:
			t.Errorf("Main did not return within %v of its cancellation", StartTimeout)
		case err != nil:
			t.Errorf("Main returned %v", err)
		}
	})
}

// Reload sends SIGHUP to the test's process, which every Main running in it receives, and
// waits until this Main's log holds one more line with any of want; it returns the one that
// came.
func (r *InProc) Reload(t testing.TB, want ...string) string {
	t.Helper()
	return signalAndWait(t, r.Logs, func() error { return syscall.Kill(os.Getpid(), syscall.SIGHUP) }, want)
}
