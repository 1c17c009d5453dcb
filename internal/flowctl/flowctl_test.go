package flowctl

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// recorder keeps what a connection read: the server's frames, as the client sees them.
type recorder struct {
	net.Conn
	mu  sync.Mutex
	buf bytes.Buffer
}

func (r *recorder) Read(p []byte) (int, error) {
	n, err := r.Conn.Read(p)
	r.mu.Lock()
	r.buf.Write(p[:n])
	r.mu.Unlock()
	return n, err
}

// pings counts the PING frames (not acknowledgements) the server sent over 20 calls made one
// after another, with and without the fixed windows on both sides.
func pings(t *testing.T, fixed bool) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var sopts []grpc.ServerOption
	dopts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if fixed {
		sopts = ServerOptions()
		dopts = append(dopts, DialOptions()...)
	}
	srv := grpc.NewServer(sopts...)
	healthpb.RegisterHealthServer(srv, health.NewServer())
	go func() { _ = srv.Serve(ln) }()
	defer srv.Stop()
	rec := &recorder{}
	dopts = append(dopts, grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		rec.Conn = c
		return rec, err
	}))
	conn, err := grpc.NewClient(ln.Addr().String(), dopts...)
	if err != nil {
		t.Fatal(err)
	}
	client := healthpb.NewHealthClient(conn)
	for range 20 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := client.Check(ctx, &healthpb.HealthCheckRequest{})
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Millisecond) // the connection goes idle between calls
	}
	conn.Close()
	rec.mu.Lock()
	defer rec.mu.Unlock()
	fr := http2.NewFramer(io.Discard, bytes.NewReader(rec.buf.Bytes()))
	n := 0
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("frames: %v", err)
			}
			return n
		}
		if p, ok := f.(*http2.PingFrame); ok && !p.IsAck() {
			n++
		}
	}
}

// TestFixedWindowsSendNoPings: grpc-go's window estimation pings on received data; with fixed
// windows the server sends no PING at all.
func TestFixedWindowsSendNoPings(t *testing.T) {
	if n := pings(t, false); n == 0 {
		t.Log("grpc-go's defaults sent no PING: the comparison shows nothing on this version")
	} else {
		t.Logf("grpc-go's defaults: %d PINGs over 20 calls", n)
	}
	if n := pings(t, true); n != 0 {
		t.Fatalf("fixed windows: %d PINGs over 20 calls, want none", n)
	}
}
