package kernel

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/policy-engine/policy-engine/internal/logging"
)

// TestLimitListener: connections past the limit are closed at once and counted; closing one
// gives its place back, once however often it is closed.
func TestLimitListener(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := newKernelMetrics()
	l := newLimitListener(inner, 2, m, logging.New(io.Discard, "kernel", zerolog.InfoLevel))
	defer l.Close()
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	dial := func() net.Conn {
		t.Helper()
		c, err := net.Dial("tcp", inner.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	dial()
	dial()
	a, b := <-accepted, <-accepted
	third := dial()
	third.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := third.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("third connection: %v, want closed (EOF)", err)
	}
	if l.active.Load() != 2 || m.connRefused.Get() != 1 {
		t.Fatalf("active %d refused %d", l.active.Load(), m.connRefused.Get())
	}
	a.Close()
	a.Close()
	if l.active.Load() != 1 {
		t.Fatalf("after closing one twice: active %d, want 1", l.active.Load())
	}
	dial()
	c := <-accepted
	if l.active.Load() != 2 {
		t.Fatalf("active %d", l.active.Load())
	}
	b.Close()
	c.Close()
}

// endRecorder is a transport stream's WriteStatus, recorded.
type endRecorder struct{ got []*status.Status }

func (r *endRecorder) WriteStatus(st *status.Status) error {
	r.got = append(r.got, st)
	return nil
}

// TestIdleSweep: the sweeper ends a stream whose last activity is older than the timeout, once,
// with DeadlineExceeded written as its status, and leaves a recent one alone.
func TestIdleSweep(t *testing.T) {
	m := newKernelMetrics()
	var logs bytes.Buffer
	s := newIdleStreams(time.Second, m, logging.New(&logs, "kernel", zerolog.InfoLevel))
	mk := func() (*idleStream, *endRecorder) {
		r := &endRecorder{}
		is := &idleStream{owner: s, end: r}
		is.last.Store(s.clock.Load())
		s.add(is)
		return is, r
	}
	old, oldEnd := mk()
	fresh, freshEnd := mk()
	now := s.clock.Load()
	fresh.last.Store(now + int64(2*time.Second))
	s.sweep(now + int64(1500*time.Millisecond))
	if len(oldEnd.got) != 1 || oldEnd.got[0].Code() != codes.DeadlineExceeded || len(freshEnd.got) != 0 {
		t.Fatalf("old ended with %v, fresh with %v", oldEnd.got, freshEnd.got)
	}
	if !old.ended.Load() || fresh.ended.Load() {
		t.Fatal("ended marks")
	}
	s.sweep(now + int64(1600*time.Millisecond))
	if len(oldEnd.got) != 1 || m.streamsIdleClosed.Get() != 1 {
		t.Fatalf("ended %d times, counted %d, want once", len(oldEnd.got), m.streamsIdleClosed.Get())
	}
	if !strings.Contains(logs.String(), "stream_idle_timeout_ms") {
		t.Fatalf("not logged: %s", logs.String())
	}
	for _, e := range s.ending[:cap(s.ending)] {
		if e != nil {
			t.Fatal("the sweeper keeps an ended stream alive")
		}
	}
	s.remove(old)
	s.remove(fresh)
	for i := range s.shards {
		if s.shards[i].head != nil {
			t.Fatal("a removed stream is still listed")
		}
	}
}

// extProcClient serves the bench kernel (its agent answering from memory) on a loopback gRPC
// server with opts, and returns a client of it; both are stopped when tb ends.
func extProcClient(tb testing.TB, opts ...grpc.ServerOption) extprocv3.ExternalProcessorClient {
	tb.Helper()
	srv := grpc.NewServer(opts...)
	extprocv3.RegisterExternalProcessorServer(srv, benchServer(tb, "unused.sock", cannedAgent{}))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	go srv.Serve(ln)
	tb.Cleanup(srv.Stop)
	cc, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cc.Close() })
	return extprocv3.NewExternalProcessorClient(cc)
}

// idleLimited serves the bench kernel with an idle-stream limit of timeout, its sweeper
// running, and returns a client, the limit's metrics and a context that ends after within
// (or with the test).
func idleLimited(t *testing.T, timeout, within time.Duration) (extprocv3.ExternalProcessorClient, *kernelMetrics, context.Context) {
	t.Helper()
	m := newKernelMetrics()
	idle := newIdleStreams(timeout, m, logging.New(io.Discard, "kernel", zerolog.InfoLevel))
	ctx, cancel := context.WithTimeout(context.Background(), within)
	t.Cleanup(cancel)
	go idle.run(ctx)
	return extProcClient(t, idle.serverOptions()...), m, ctx
}

// TestIdleLimitOverGRPC runs the limit on a real gRPC server serving the kernel: a stream that
// sends nothing, and one that is answered and then waits for its response phase, are ended
// with DeadlineExceeded (gRPC's transport stream must let the sweeper write a status); a
// stream that keeps sending is served.
func TestIdleLimitOverGRPC(t *testing.T) {
	const timeout = 600 * time.Millisecond
	client, m, ctx := idleLimited(t, timeout, 10*time.Second)
	silent, err := client.Process(ctx)
	if err != nil {
		t.Fatal(err)
	}
	parked, err := client.Process(ctx)
	if err != nil {
		t.Fatal(err)
	}
	busy, err := client.Process(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range []extprocv3.ExternalProcessor_ProcessClient{parked, busy} {
		if err := st.Send(envoyRequest()); err != nil {
			t.Fatal(err)
		}
		if r, err := st.Recv(); err != nil || r.GetRequestHeaders() == nil {
			t.Fatalf("request headers: %v %v", r, err)
		}
	}
	start := time.Now()
	done := make(chan error, 1)
	go func() {
		// Its response phase at 0.6 of the limit, then its end at 1.2: more than the limit
		// after its first message, never as long without one.
		time.Sleep(timeout * 6 / 10)
		if err := busy.Send(envoyResponse()); err != nil {
			done <- err
			return
		}
		if _, err := busy.Recv(); err != nil {
			done <- err
			return
		}
		time.Sleep(timeout * 6 / 10)
		if err := busy.CloseSend(); err != nil {
			done <- err
			return
		}
		if _, err := busy.Recv(); err != io.EOF {
			done <- err
			return
		}
		done <- nil
	}()
	for name, st := range map[string]extprocv3.ExternalProcessor_ProcessClient{"silent": silent, "parked": parked} {
		_, err := st.Recv()
		if status.Code(err) != codes.DeadlineExceeded || !strings.Contains(err.Error(), "stream_idle_timeout_ms") {
			t.Fatalf("%s stream ended with %v after %v, want DeadlineExceeded", name, err, time.Since(start))
		}
	}
	if d := time.Since(start); d < timeout/2 || d > 10*timeout {
		t.Fatalf("idle streams ended after %v, want about %v", d, timeout)
	}
	if err := <-done; err != nil {
		t.Fatalf("the busy stream was ended: %v", err)
	}
	if got := m.streamsIdleClosed.Get(); got != 2 {
		t.Fatalf("counted %d idle streams, want 2", got)
	}
}

// TestCertReload: a changed certificate is served from the next handshake after the check
// interval; a change that does not load keeps the previous certificate and is counted.
func TestCertReload(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	write := func(cn string) {
		t.Helper()
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			t.Fatal(err)
		}
		kder, _ := x509.MarshalECPrivateKey(key)
		os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
		os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600)
	}
	write("one")
	m := newKernelMetrics()
	c, err := newCertFiles(TLSConfig{CertFile: certFile, KeyFile: keyFile}, m, logging.New(io.Discard, "kernel", zerolog.InfoLevel))
	if err != nil {
		t.Fatal(err)
	}
	served := func(now time.Time) string {
		t.Helper()
		c.maybeReload(now.UnixNano())
		tc := c.current.Load()
		leaf, err := x509.ParseCertificate(tc.Certificates[0].Certificate[0])
		if err != nil {
			t.Fatal(err)
		}
		if tc.NextProtos[0] != "h2" || tc.MinVersion != tls.VersionTLS12 {
			t.Fatalf("config %v %v", tc.NextProtos, tc.MinVersion)
		}
		return leaf.Subject.CommonName
	}
	start := time.Now()
	write("two")
	if cn := served(start); cn != "one" {
		t.Fatalf("within the check interval: %s, want one", cn)
	}
	if cn := served(start.Add(2 * tlsCheckInterval)); cn != "two" {
		t.Fatalf("after the interval: %s, want two", cn)
	}
	os.WriteFile(keyFile, []byte("not a key"), 0o600)
	if cn := served(start.Add(4 * tlsCheckInterval)); cn != "two" {
		t.Fatalf("after a broken key: %s, want two kept", cn)
	}
	if m.tlsReloadSuccess.Get() != 1 || m.tlsReloadFail.Get() != 1 {
		t.Fatalf("reloads: %d ok, %d failed", m.tlsReloadSuccess.Get(), m.tlsReloadFail.Get())
	}
	if _, err := newCertFiles(TLSConfig{CertFile: certFile, KeyFile: keyFile}, newKernelMetrics(), logging.New(io.Discard, "kernel", zerolog.InfoLevel)); err == nil {
		t.Fatal("a broken key pair loaded at start")
	}
}

// fakeServerStream is a grpc.ServerStream with only a context.
type fakeServerStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (f fakeServerStream) Context() context.Context { return f.ctx }

// TestIdleLimitRefusesUnendableStream: a stream whose transport stream cannot be ended from
// outside its handler is refused, logged, and never handled without the limit.
func TestIdleLimitRefusesUnendableStream(t *testing.T) {
	var logs bytes.Buffer
	s := newIdleStreams(time.Second, newKernelMetrics(), logging.New(&logs, "kernel", zerolog.InfoLevel))
	handled := false
	err := s.intercept(nil, fakeServerStream{ctx: context.Background()}, nil, func(any, grpc.ServerStream) error {
		handled = true
		return nil
	})
	if status.Code(err) != codes.Unavailable || handled {
		t.Fatalf("err %v, handled %v: want Unavailable, not handled", err, handled)
	}
	if !strings.Contains(logs.String(), "stream_idle_timeout_ms: -1") {
		t.Fatalf("not logged: %s", logs.String())
	}
}

// BenchmarkIdleLimitStream runs one HTTP request's ext_proc stream (request and response
// headers, then the end of the stream) over a real gRPC connection, with the idle-stream limit
// and without: the difference is what the limit costs per stream (allocations are the client's
// and the server's together).
func BenchmarkIdleLimitStream(b *testing.B) {
	for _, limit := range []bool{false, true} {
		b.Run(map[bool]string{false: "off", true: "on"}[limit], func(b *testing.B) {
			var opts []grpc.ServerOption
			if limit {
				idle := newIdleStreams(time.Minute, newKernelMetrics(), logging.New(io.Discard, "kernel", zerolog.InfoLevel))
				opts = idle.serverOptions()
			}
			client := extProcClient(b, opts...)
			reqMsg, respMsg := envoyRequest(), envoyResponse()
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				st, err := client.Process(ctx)
				if err != nil {
					b.Fatal(err)
				}
				for _, m := range []*extprocv3.ProcessingRequest{reqMsg, respMsg} {
					if err := st.Send(m); err != nil {
						b.Fatal(err)
					}
					if _, err := st.Recv(); err != nil {
						b.Fatal(err)
					}
				}
				if err := st.CloseSend(); err != nil {
					b.Fatal(err)
				}
				if _, err := st.Recv(); err != io.EOF {
					b.Fatalf("end of stream: %v", err)
				}
			}
		})
	}
}

// TestIdleLimitRacesWithMessages ends streams while their messages arrive: each stream sends
// its request and response headers at about the idle limit, so that the sweeper's status and
// the handler's replies meet. Every exchange ends either answered or with the limit's
// DeadlineExceeded, none hangs, and under -race nothing in the sweeper, the handler or gRPC's
// transport races.
func TestIdleLimitRacesWithMessages(t *testing.T) {
	const timeout = 40 * time.Millisecond
	client, _, ctx := idleLimited(t, timeout, 30*time.Second)
	const streams = 100
	var wg sync.WaitGroup
	var answered, ended atomic.Int64
	errs := make(chan error, streams)
	for i := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := client.Process(ctx)
			if err != nil {
				errs <- err
				return
			}
			// From a little under to a little over the limit (the sweeper's tick is 10 ms).
			wait := timeout - 15*time.Millisecond + time.Duration(i%7)*5*time.Millisecond
			for _, msg := range []*extprocv3.ProcessingRequest{envoyRequest(), envoyResponse()} {
				time.Sleep(wait)
				if err := st.Send(msg); err != nil {
					// The stream has ended: its status says why.
					_, err = st.Recv()
					if status.Code(err) != codes.DeadlineExceeded {
						errs <- fmt.Errorf("send refused, then %v", err)
						return
					}
					ended.Add(1)
					return
				}
				if _, err := st.Recv(); err != nil {
					if status.Code(err) != codes.DeadlineExceeded {
						errs <- fmt.Errorf("reply: %v", err)
						return
					}
					ended.Add(1)
					return
				}
			}
			answered.Add(1)
			st.CloseSend()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if answered.Load()+ended.Load() != streams {
		t.Fatalf("%d answered and %d ended of %d streams", answered.Load(), ended.Load(), streams)
	}
	if ended.Load() == 0 || answered.Load() == 0 {
		t.Logf("answered %d, ended %d: the race was not met both ways this time", answered.Load(), ended.Load())
	}
}
