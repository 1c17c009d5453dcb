package loadtest

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// clockTicks is USER_HZ, the unit of the CPU times in /proc/<pid>/stat; Linux fixes it at 100
// on every architecture Go supports.
const clockTicks = 100

// procRoot is where the proc file system is mounted; tests point it at fixtures.
var procRoot = "/proc"

// CPUTime returns the user plus system CPU time a process has used so far, from
// /proc/<pid>/stat.
func CPUTime(pid int) (time.Duration, error) {
	data, err := os.ReadFile(fmt.Sprintf("%s/%d/stat", procRoot, pid))
	if err != nil {
		return 0, fmt.Errorf("read cpu time of pid %d: %w", pid, err)
	}
	return parseStatCPU(data)
}

// parseStatCPU reads utime and stime (fields 14 and 15) of a /proc/<pid>/stat line. The
// command name (field 2) is in parentheses and may hold spaces and parentheses itself, so
// fields are counted from the last ')'.
func parseStatCPU(data []byte) (time.Duration, error) {
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0, fmt.Errorf("parse /proc stat %q: no command name", truncate(data))
	}
	// After ") " come field 3 (state) onwards; utime is field 14, so index 11 here.
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("parse /proc stat %q: %d fields after the command name, want at least 13", truncate(data), len(f))
	}
	utime, err := strconv.ParseUint(f[11], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("parse /proc stat utime %q: %w", f[11], err)
	}
	stime, err := strconv.ParseUint(f[12], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("parse /proc stat stime %q: %w", f[12], err)
	}
	return time.Duration(utime+stime) * time.Second / clockTicks, nil
}

// ContextSwitches returns how many times the threads of a process have left their CPU so far,
// voluntarily (to wait: each is a wake-up later) or not, summed over /proc/<pid>/task/*/status.
// Threads that ended earlier are not counted; Go keeps its threads, so over a phase the sum
// grows by the switches of the phase.
func ContextSwitches(pid int) (int64, error) {
	tasks, err := os.ReadDir(fmt.Sprintf("%s/%d/task", procRoot, pid))
	if err != nil {
		return 0, fmt.Errorf("read threads of pid %d: %w", pid, err)
	}
	var sum int64
	for _, t := range tasks {
		data, err := os.ReadFile(fmt.Sprintf("%s/%d/task/%s/status", procRoot, pid, t.Name()))
		if err != nil {
			continue // the thread ended meanwhile
		}
		for _, key := range []string{"voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"} {
			n, err := parseStatusCount(data, key)
			if err != nil {
				return 0, fmt.Errorf("pid %d thread %s: %w", pid, t.Name(), err)
			}
			sum += n
		}
	}
	return sum, nil
}

// IOSyscalls returns how many read and write system calls a process has made so far (the
// syscr and syscw of /proc/<pid>/io: read(2), write(2) and their kin, on sockets as on files;
// epoll and futex calls are not among them). Over a phase, per request, it counts what a
// message costs in socket reads and writes, including the reads that find nothing yet.
func IOSyscalls(pid int) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("%s/%d/io", procRoot, pid))
	if err != nil {
		return 0, fmt.Errorf("read i/o counts of pid %d: %w", pid, err)
	}
	var sum int64
	for _, key := range []string{"syscr:", "syscw:"} {
		n, err := parseStatusCount(data, key)
		if err != nil {
			return 0, fmt.Errorf("pid %d: %w", pid, err)
		}
		sum += n
	}
	return sum, nil
}

// parseStatusCount reads a plain number of a /proc status file.
func parseStatusCount(data []byte, key string) (int64, error) {
	for line := range strings.SplitSeq(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, key); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(rest), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("parse /proc status %s %q: %w", key, strings.TrimSpace(rest), err)
			}
			return n, nil
		}
	}
	return 0, fmt.Errorf("parse /proc status: no %s line", key)
}

// PeakRSS returns the peak resident set size of a process in bytes (VmHWM of
// /proc/<pid>/status).
func PeakRSS(pid int) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("%s/%d/status", procRoot, pid))
	if err != nil {
		return 0, fmt.Errorf("read peak rss of pid %d: %w", pid, err)
	}
	return parseStatusKB(data, "VmHWM:")
}

// RSS returns the current resident set size of a process in bytes (VmRSS).
func RSS(pid int) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("%s/%d/status", procRoot, pid))
	if err != nil {
		return 0, fmt.Errorf("read rss of pid %d: %w", pid, err)
	}
	return parseStatusKB(data, "VmRSS:")
}

// ResetPeakRSS sets a process's VmHWM back to its current RSS, so that the peak of one phase
// is not the peak of an earlier one. Only the process's owner (or root) may do it.
func ResetPeakRSS(pid int) error {
	if err := os.WriteFile(fmt.Sprintf("%s/%d/clear_refs", procRoot, pid), []byte("5"), 0); err != nil {
		return fmt.Errorf("reset peak rss of pid %d: %w", pid, err)
	}
	return nil
}

func parseStatusKB(data []byte, key string) (int64, error) {
	for line := range strings.SplitSeq(string(data), "\n") {
		rest, ok := strings.CutPrefix(line, key)
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("parse /proc status %s %q: want a number of kB", key, strings.TrimSpace(rest))
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parse /proc status %s %q: %w", key, f[0], err)
		}
		return n << 10, nil
	}
	return 0, fmt.Errorf("parse /proc status: no %s line", key)
}

func truncate(b []byte) string {
	if len(b) > 80 {
		return string(b[:80]) + "..."
	}
	return string(b)
}
