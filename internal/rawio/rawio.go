// Package rawio reads and writes sockets without telling the Go scheduler about the system
// call, for the connections between Envoy, the kernel and the agent.
//
// A read or write on a non-blocking socket returns at once, but the standard library makes it
// as a blocking system call: the runtime first marks the goroutine as in a system call, and when
// every processor was idle until then its monitor thread (sysmon) is asleep and the call wakes
// it. Between messages at a few thousand requests per second every processor is idle, so each
// message woke the monitor, which then polled every 20 µs until the process was idle again: a
// wake-up of a second thread and several more context switches per message, about a third of
// the kernel's and the agent's thread wake-ups (docs/performance.md, round 4).
//
// A Conn makes the same read(2) and write(2) through syscall.RawConn, which keeps the
// descriptor from being closed and reused while the call runs and waits for readiness in the
// network poller as the standard library does, but with syscall.RawSyscall inside, which the
// scheduler does not see. That is sound only because the socket is non-blocking: the call never
// waits, so no processor needs to be handed on while it runs.
package rawio

import (
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"unsafe"
)

// Conn is a TCP or Unix stream connection whose Read and Write bypass the scheduler's system
// call bookkeeping. Everything else is the wrapped connection's.
type Conn struct {
	net.Conn
	rc syscall.RawConn
	r  half
	w  half
}

// half is the state of one direction's call, kept in the Conn so that a read or write does not
// allocate a closure. Its lock makes concurrent Reads (or Writes) take turns, as the descriptor's
// own lock would.
type half struct {
	mu  sync.Mutex
	buf []byte
	n   int
	err syscall.Errno
	fn  func(fd uintptr) bool
}

// Wrap returns c as a Conn when it is a *net.TCPConn or *net.UnixConn, and c itself otherwise.
func Wrap(c net.Conn) net.Conn {
	switch c.(type) {
	case *net.TCPConn, *net.UnixConn:
	default:
		return c
	}
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		return c
	}
	rw := &Conn{Conn: c, rc: rc}
	rw.r.fn = rw.read
	rw.w.fn = rw.write
	return rw
}

// read makes one read(2); false asks the poller to wait until the socket is readable.
func (c *Conn) read(fd uintptr) bool {
	for {
		n, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(unsafe.SliceData(c.r.buf))), uintptr(len(c.r.buf)))
		switch e {
		case 0:
			c.r.n = int(n)
			return true
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		default:
			c.r.err = e
			return true
		}
	}
}

// write writes what is left of the buffer; false asks the poller to wait until the socket is
// writable again.
func (c *Conn) write(fd uintptr) bool {
	for len(c.w.buf) > 0 {
		n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(unsafe.SliceData(c.w.buf))), uintptr(len(c.w.buf)))
		switch e {
		case 0:
			c.w.n += int(n)
			c.w.buf = c.w.buf[n:]
		case syscall.EINTR:
		case syscall.EAGAIN:
			return false
		default:
			c.w.err = e
			return true
		}
	}
	return true
}

// Read reads into p as net.Conn does: io.EOF once the peer has closed its side.
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	n, err := c.call(&c.r, p, "read", c.rc.Read)
	switch {
	case err != nil:
		return 0, err
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// Write writes all of p, or returns how much it wrote and why it stopped.
func (c *Conn) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	return c.call(&c.w, p, "write", c.rc.Write)
}

// call makes one direction's system calls on p through run (the raw connection's Read or
// Write), and returns the bytes they moved and the error that stopped them.
func (c *Conn) call(h *half, p []byte, op string, run func(func(fd uintptr) bool) error) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.buf, h.n, h.err = p, 0, 0
	err := run(h.fn)
	n, errno := h.n, h.err
	h.buf = nil
	switch {
	case err != nil:
		return n, c.opError(op, err)
	case errno != 0:
		return n, c.opError(op, os.NewSyscallError(op, errno))
	}
	return n, nil
}

// opError wraps err as the standard library would. The raw connection reports a deadline or a
// closed connection as an error of its own operation ("raw-read"): it is named after ours.
func (c *Conn) opError(op string, err error) error {
	if oe, ok := err.(*net.OpError); ok {
		err = oe.Err
	}
	return &net.OpError{Op: op, Net: c.LocalAddr().Network(), Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}

// Listener wraps the connections a listener accepts.
type Listener struct{ net.Listener }

// Accept returns the next connection, wrapped.
func (l Listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return Wrap(c), nil
}
