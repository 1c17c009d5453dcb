package testenv

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
)

// The ports FreeAddr hands out lie in [portBase, portBase+portBlocks*portBlock), below Linux's
// ephemeral range (32768 on), so that no outgoing connection of this machine takes one between
// the moment a test picks it and the moment the process it starts binds it.
//
// `go test ./...` runs several test processes at once, each starting servers on ports it chose
// by probing: two processes probing the same free port would both be handed it. So every test
// process first claims a block of ports of its own by holding an exclusive flock on the block's
// lock file (the kernel releases it when the process ends, however it ends), and hands out
// ports of its blocks only, each probed once more in case something else listens there.
const (
	portBase   = 20000
	portBlock  = 200
	portBlocks = 60
)

var ports struct {
	sync.Mutex
	blocks []int // the blocks this process holds, in the order claimed
	next   int   // the next port to try in the last block, relative to its start
	locks  []*os.File
}

// FreeAddr returns a free 127.0.0.1 address that no other test process is handed.
func FreeAddr(t testing.TB) string {
	t.Helper()
	ports.Lock()
	defer ports.Unlock()
	for {
		if len(ports.blocks) == 0 || ports.next == portBlock {
			if !claimBlock() {
				break
			}
		}
		p := portBase + ports.blocks[len(ports.blocks)-1]*portBlock + ports.next
		ports.next++
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err == nil {
			addr := ln.Addr().String()
			ln.Close()
			return addr
		}
	}
	// Every block is taken (hundreds of test processes at once): let the kernel choose.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// claimBlock takes the first block no test process holds, starting after the ones this process
// already used. It reports false when none is left.
func claimBlock() bool {
	dir := filepath.Join(os.TempDir(), "policy-engine-test-ports")
	if err := os.MkdirAll(dir, 0o777); err != nil {
		return false
	}
	first := 0
	if n := len(ports.blocks); n > 0 {
		first = ports.blocks[n-1] + 1
	}
	for b := first; b < portBlocks; b++ {
		f, err := os.OpenFile(filepath.Join(dir, fmt.Sprintf("block-%02d.lock", b)), os.O_CREATE|os.O_RDWR, 0o666)
		if err != nil {
			continue
		}
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			f.Close()
			continue
		}
		// Held (the file stays open) until the process ends.
		ports.locks = append(ports.locks, f)
		ports.blocks = append(ports.blocks, b)
		ports.next = 0
		return true
	}
	return false
}
