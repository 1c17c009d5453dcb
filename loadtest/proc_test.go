package loadtest

import (
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParseStatCPU(t *testing.T) {
	f := func(line string, want time.Duration) {
		t.Helper()
		got, err := parseStatCPU([]byte(line))
		if err != nil {
			t.Fatalf("parseStatCPU(%q): %v", line, err)
		}
		if got != want {
			t.Fatalf("parseStatCPU(%q) = %s, want %s", line, got, want)
		}
	}
	// utime 250 and stime 50 ticks: 3 s. The command name holds spaces and parentheses.
	f("1234 (policy kernel (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 12 0 100 1000 200", 3*time.Second)
	f("7 (a) R 1 7 7 0 -1 0 0 0 0 0 1 0 0 0 20 0 1 0 1 1 1", 10*time.Millisecond)

	bad := func(line, want string) {
		t.Helper()
		_, err := parseStatCPU([]byte(line))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("parseStatCPU(%q): err = %v, want it to mention %q", line, err, want)
		}
	}
	bad("no command name at all", "no command name")
	bad("1 (a) S 1 2 3", "fields after the command name")
	bad("1 (a) S 1 1 1 0 -1 0 0 0 0 0 x 50 0 0 20", "utime")
	bad("1 (a) S 1 1 1 0 -1 0 0 0 0 0 5 y 0 0 20", "stime")
	bad(strings.Repeat("z", 100), "...")
}

func TestParseStatusKB(t *testing.T) {
	status := "Name:\tpolicy-kernel\nVmPeak:\t  900000 kB\nVmHWM:\t   51200 kB\nVmRSS:\t   40960 kB\n"
	if got, err := parseStatusKB([]byte(status), "VmHWM:"); err != nil || got != 50<<20 {
		t.Fatalf("VmHWM = %d, %v; want %d", got, err, 50<<20)
	}
	if got, err := parseStatusKB([]byte(status), "VmRSS:"); err != nil || got != 40<<20 {
		t.Fatalf("VmRSS = %d, %v; want %d", got, err, 40<<20)
	}
	for _, c := range []struct{ data, want string }{
		{"Name: x\n", "no VmHWM: line"},
		{"VmHWM:\t12 MB\n", "want a number of kB"},
		{"VmHWM:\tlots kB\n", "parse /proc status VmHWM:"},
	} {
		if _, err := parseStatusKB([]byte(c.data), "VmHWM:"); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("parseStatusKB(%q): err = %v, want %q", c.data, err, c.want)
		}
	}
}

// burn uses CPU for about d.
func burn(d time.Duration) int {
	n := 0
	for start := time.Now(); time.Since(start) < d; {
		for i := range 10000 {
			n += i * i
		}
	}
	return n
}

func TestProcOfThisProcess(t *testing.T) {
	pid := os.Getpid()
	// Busy work until the process has used 200ms more CPU; /proc must agree with getrusage,
	// which the kernel keeps from the same accounting, within a few ticks.
	var ru0 syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru0); err != nil {
		t.Fatal(err)
	}
	c0, err := CPUTime(pid)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	var c1 time.Duration
	for c1-c0 < 200*time.Millisecond && time.Now().Before(deadline) {
		_ = burn(20 * time.Millisecond)
		if c1, err = CPUTime(pid); err != nil {
			t.Fatal(err)
		}
	}
	var ru1 syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru1); err != nil {
		t.Fatal(err)
	}
	tv := func(r syscall.Rusage) time.Duration {
		return time.Duration(r.Utime.Nano() + r.Stime.Nano())
	}
	got, want := c1-c0, tv(ru1)-tv(ru0)
	if got < 200*time.Millisecond || (got-want).Abs() > 60*time.Millisecond {
		t.Errorf("/proc counted %s of CPU, getrusage %s", got, want)
	}
	// Touch 64 MiB, let it go, and check that the peak shows it until it is reset.
	big := make([]byte, 64<<20)
	for i := 0; i < len(big); i += 4096 {
		big[i] = 1
	}
	peak, err := PeakRSS(pid)
	if err != nil {
		t.Fatal(err)
	}
	if peak < 64<<20 {
		t.Fatalf("peak rss %d after touching 64 MiB", peak)
	}
	big = nil
	runtime.GC()
	debug.FreeOSMemory()
	rss, err := RSS(pid)
	if err != nil {
		t.Fatal(err)
	}
	if rss <= 0 || rss > peak-32<<20 {
		t.Fatalf("rss %d after freeing 64 MiB, peak %d", rss, peak)
	}
	if err := ResetPeakRSS(pid); err != nil {
		t.Fatal(err)
	}
	after, err := PeakRSS(pid)
	if err != nil {
		t.Fatal(err)
	}
	if after > peak-32<<20 {
		t.Errorf("peak after reset %d, before %d: the reset did not take", after, peak)
	}
	_ = big
}

func TestProcErrors(t *testing.T) {
	old := procRoot
	procRoot = t.TempDir()
	defer func() { procRoot = old }()
	if _, err := CPUTime(1); err == nil || !strings.Contains(err.Error(), "pid 1") {
		t.Errorf("CPUTime: err = %v", err)
	}
	if _, err := PeakRSS(1); err == nil {
		t.Error("PeakRSS of a missing process succeeded")
	}
	if _, err := RSS(1); err == nil {
		t.Error("RSS of a missing process succeeded")
	}
	if err := ResetPeakRSS(1); err == nil {
		t.Error("ResetPeakRSS of a missing process succeeded")
	}
	// A fixture process.
	dir := filepath.Join(procRoot, "42")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "stat"), []byte("42 (x) S 1 1 1 0 -1 0 0 0 0 0 100 100 0 0 20 0 1 0 1 1 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := CPUTime(42); err != nil || got != 2*time.Second {
		t.Errorf("CPUTime(fixture) = %s, %v; want 2s", got, err)
	}
}

func TestContextSwitches(t *testing.T) {
	old := procRoot
	procRoot = t.TempDir()
	defer func() { procRoot = old }()
	if _, err := ContextSwitches(7); err == nil || !strings.Contains(err.Error(), "threads of pid 7") {
		t.Errorf("ContextSwitches of a missing process: err = %v", err)
	}
	thread := func(tid, status string) {
		t.Helper()
		dir := filepath.Join(procRoot, "7", "task", tid)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "status"), []byte(status), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	thread("7", "Name:\tx\nvoluntary_ctxt_switches:\t100\nnonvoluntary_ctxt_switches:\t5\n")
	thread("8", "Name:\tx\nvoluntary_ctxt_switches:\t20\nnonvoluntary_ctxt_switches:\t1\n")
	// A thread that ended between listing and reading is skipped.
	if err := os.MkdirAll(filepath.Join(procRoot, "7", "task", "9"), 0o755); err != nil {
		t.Fatal(err)
	}
	if got, err := ContextSwitches(7); err != nil || got != 126 {
		t.Fatalf("ContextSwitches = %d, %v; want 126 (two threads, both kinds)", got, err)
	}
	thread("8", "Name:\tx\nvoluntary_ctxt_switches:\tmany\n")
	if _, err := ContextSwitches(7); err == nil || !strings.Contains(err.Error(), `voluntary_ctxt_switches: "many"`) {
		t.Errorf("a malformed count: err = %v", err)
	}
	thread("8", "Name:\tx\n")
	if _, err := ContextSwitches(7); err == nil || !strings.Contains(err.Error(), "no voluntary_ctxt_switches: line") {
		t.Errorf("a missing count: err = %v", err)
	}

	// This process: threads that sleep and are woken are counted.
	procRoot = old
	before, err := ContextSwitches(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	for range 50 {
		time.Sleep(time.Millisecond)
	}
	after, err := ContextSwitches(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if after-before < 50 {
		t.Errorf("50 sleeps made %d context switches", after-before)
	}
}

func TestIOSyscalls(t *testing.T) {
	old := procRoot
	procRoot = t.TempDir()
	defer func() { procRoot = old }()
	if _, err := IOSyscalls(7); err == nil || !strings.Contains(err.Error(), "i/o counts of pid 7") {
		t.Errorf("IOSyscalls of a missing process: err = %v", err)
	}
	write := func(s string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Join(procRoot, "7"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(procRoot, "7", "io"), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("rchar: 100\nwchar: 50\nsyscr: 30\nsyscw: 12\nread_bytes: 0\n")
	if got, err := IOSyscalls(7); err != nil || got != 42 {
		t.Fatalf("IOSyscalls = %d, %v; want 42 (reads and writes)", got, err)
	}
	write("rchar: 100\nsyscr: 30\n")
	if _, err := IOSyscalls(7); err == nil || !strings.Contains(err.Error(), "no syscw: line") {
		t.Errorf("a missing count: err = %v", err)
	}

	// This process: reads of a file are counted.
	procRoot = old
	before, err := IOSyscalls(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(f, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	for range 20 {
		if _, err := os.ReadFile(f); err != nil {
			t.Fatal(err)
		}
	}
	after, err := IOSyscalls(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if after-before < 21 {
		t.Errorf("a write and 20 reads of a file made %d read and write system calls", after-before)
	}
}
