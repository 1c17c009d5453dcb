package testenv

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// Two test processes running at once are never handed the same port: each takes ports from
// blocks it holds alone.
func TestFreeAddrIsExclusiveAcrossProcesses(t *testing.T) {
	if os.Getenv("TESTENV_PORT_CHILD") == "1" {
		for range 3 {
			fmt.Println("port", FreeAddr(t))
		}
		return
	}
	mine := map[string]bool{}
	for range 3 {
		mine[FreeAddr(t)] = true
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestFreeAddrIsExclusiveAcrossProcesses$", "-test.count=1")
	cmd.Env = append(os.Environ(), "TESTENV_PORT_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	var theirs []string
	for _, line := range strings.Split(string(out), "\n") {
		if addr, ok := strings.CutPrefix(line, "port "); ok {
			theirs = append(theirs, addr)
		}
	}
	if len(theirs) != 3 {
		t.Fatalf("child printed %q", out)
	}
	ports.Lock()
	held := append([]int(nil), ports.blocks...)
	ports.Unlock()
	for _, addr := range theirs {
		if mine[addr] {
			t.Fatalf("both processes were handed %s", addr)
		}
		_, p, _ := net.SplitHostPort(addr)
		n, _ := strconv.Atoi(p)
		for _, b := range held {
			if lo := portBase + b*portBlock; n >= lo && n < lo+portBlock {
				t.Fatalf("the child was handed %s from block %d, which this process holds", addr, b)
			}
		}
	}
}
