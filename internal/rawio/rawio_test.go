package rawio

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// pair returns a wrapped client and the server's end of a real connection of the network.
func pair(t *testing.T, network string) (*Conn, net.Conn) {
	t.Helper()
	addr := "127.0.0.1:0"
	if network == "unix" {
		addr = filepath.Join(t.TempDir(), "s.sock")
	}
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	wl := Listener{Listener: ln}
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := wl.Accept()
		if err != nil {
			t.Error(err)
		}
		accepted <- c
	}()
	c, err := net.Dial(network, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-accepted
	if _, ok := s.(*Conn); !ok {
		t.Fatalf("the listener accepted a %T, want a *Conn", s)
	}
	w, ok := Wrap(c).(*Conn)
	if !ok {
		t.Fatalf("Wrap(%T) is not a *Conn", c)
	}
	t.Cleanup(func() { w.Close(); s.Close() })
	return w, s
}

func TestConn(t *testing.T) {
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network, func(t *testing.T) {
			c, s := pair(t, network)
			// More than the socket buffers hold, both ways at once: writes find the socket
			// full and wait for the poller, reads come in pieces.
			data := make([]byte, 8<<20)
			rand.Read(data)
			echoed := make(chan error, 1)
			go func() { // the server echoes everything back
				_, err := io.Copy(s, s)
				echoed <- err
			}()
			wrote := make(chan error, 1)
			go func() {
				n, err := c.Write(data)
				if err == nil && n != len(data) {
					err = errors.New("short write without an error")
				}
				wrote <- err
			}()
			got := make([]byte, len(data))
			if _, err := io.ReadFull(c, got); err != nil {
				t.Fatal(err)
			}
			if err := <-wrote; err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatal("the bytes read back differ from the bytes written")
			}
			if n, err := c.Write(nil); n != 0 || err != nil {
				t.Fatalf("empty write: %d %v", n, err)
			}
			if n, err := c.Read(nil); n != 0 || err != nil {
				t.Fatalf("empty read: %d %v", n, err)
			}

			// A read deadline is honoured, as a timeout.
			c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
			_, err := c.Read(make([]byte, 10))
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() || !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("read past the deadline: %v", err)
			}
			var oe *net.OpError
			if !errors.As(err, &oe) || oe.Op != "read" {
				t.Fatalf("read past the deadline: %#v, want a read OpError", err)
			}
			c.SetReadDeadline(time.Time{})

			// The peer closes: its half of the echo ends, then ours reads EOF.
			s.(*Conn).Conn.(interface{ CloseWrite() error }).CloseWrite()
			if _, err := c.Read(make([]byte, 10)); err != io.EOF {
				t.Fatalf("read after the peer closed: %v, want io.EOF", err)
			}
			s.Close()
			<-echoed
			// Writing to a closed peer fails (EPIPE or ECONNRESET) within a few writes.
			var werr error
			for i := 0; i < 100 && werr == nil; i++ {
				_, werr = c.Write(make([]byte, 64<<10))
				time.Sleep(time.Millisecond)
			}
			if !errors.Is(werr, syscall.EPIPE) && !errors.Is(werr, syscall.ECONNRESET) {
				t.Fatalf("write to a closed peer: %v", werr)
			}
			if !errors.As(werr, &oe) || oe.Op != "write" {
				t.Fatalf("write error %#v, want a write OpError", werr)
			}
		})
	}
}

// A read waiting for data ends when the connection is closed, with net.ErrClosed.
func TestCloseEndsAWaitingRead(t *testing.T) {
	c, _ := pair(t, "unix")
	done := make(chan error, 1)
	go func() {
		_, err := c.Read(make([]byte, 10))
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	c.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("read on a closed connection: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("closing did not end the read")
	}
	if _, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("write on a closed connection: %v", err)
	}
}

// Connections that are not sockets of the kinds above are left as they are.
func TestWrapLeavesOthers(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if Wrap(a) != a {
		t.Fatal("Wrap changed a pipe")
	}
	l := Listener{Listener: failingListener{}}
	if _, err := l.Accept(); err == nil {
		t.Fatal("Accept hid the listener's error")
	}
}

type failingListener struct{ net.Listener }

func (failingListener) Accept() (net.Conn, error) { return nil, errors.New("accept failed") }

// A message written and read back costs no allocation.
func TestNoAllocations(t *testing.T) {
	c, s := pair(t, "unix")
	msg, buf := make([]byte, 512), make([]byte, 512)
	allocs := testing.AllocsPerRun(200, func() {
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(s, buf); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("%.1f allocations per message", allocs)
	}
}

// BenchmarkRoundTrip sends a 512-byte message and its echo over a Unix socket, with both ends
// wrapped (rawio) or not (net). Back to back the two make the same system calls; with a pause
// between messages (/idle, as at a few thousand requests per second) every processor goes
// idle, and the standard library's calls wake the runtime's monitor thread: cpu-ns/op is the
// process's CPU time per round trip (getrusage), which is where that shows.
func BenchmarkRoundTrip(b *testing.B) {
	for _, pause := range []time.Duration{0, 200 * time.Microsecond} {
		for _, wrapped := range []bool{true, false} {
			name := "net"
			if wrapped {
				name = "rawio"
			}
			if pause > 0 {
				name += "/idle"
			}
			b.Run(name, func(b *testing.B) { roundTrips(b, wrapped, pause) })
		}
	}
}

func roundTrips(b *testing.B, wrapped bool, pause time.Duration) {
	ln, err := net.Listen("unix", filepath.Join(b.TempDir(), "s.sock"))
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		s, err := ln.Accept()
		if err != nil {
			return
		}
		if wrapped {
			s = Wrap(s)
		}
		io.Copy(s, s)
		s.Close()
	}()
	c, err := net.Dial("unix", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	if wrapped {
		c = Wrap(c)
	}
	msg, buf := make([]byte, 512), make([]byte, 512)
	cpu := func() time.Duration {
		var ru syscall.Rusage
		syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	b.ReportAllocs()
	b.ResetTimer()
	start := cpu()
	for b.Loop() {
		if pause > 0 {
			time.Sleep(pause)
		}
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(cpu()-start)/float64(b.N), "cpu-ns/op")
}
