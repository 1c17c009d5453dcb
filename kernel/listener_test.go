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
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

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

// TestIdleSweep: the sweeper ends a stream whose last activity is older than the timeout, once,
// with DeadlineExceeded as its context's error, and leaves a recent one alone.
func TestIdleSweep(t *testing.T) {
	m := newKernelMetrics()
	var logs bytes.Buffer
	s := newIdleStreams(time.Second, m, logging.New(&logs, "kernel", zerolog.InfoLevel))
	mk := func() *idleStream {
		ctx, err := s.tap(context.Background(), nil)
		if err != nil {
			t.Fatal(err)
		}
		is := ctx.(*idleStream)
		is.last.Store(s.clock.Load())
		s.add(is)
		return is
	}
	old, fresh := mk(), mk()
	now := s.clock.Load()
	fresh.last.Store(now + int64(2*time.Second))
	s.sweep(now + int64(1500*time.Millisecond))
	if old.Err() != context.DeadlineExceeded || fresh.Err() != nil {
		t.Fatalf("old %v, fresh %v", old.Err(), fresh.Err())
	}
	select {
	case <-old.Done():
	default:
		t.Fatal("old stream's context not done")
	}
	derived, cancel := context.WithCancel(old)
	defer cancel()
	if derived.Err() == nil {
		t.Fatal("a context derived from an ended stream is not done")
	}
	s.sweep(now + int64(1600*time.Millisecond))
	if m.streamsIdleClosed.Get() != 1 {
		t.Fatalf("counted %d, want 1", m.streamsIdleClosed.Get())
	}
	if !strings.Contains(logs.String(), "stream_idle_timeout_ms") {
		t.Fatalf("not logged: %s", logs.String())
	}
	s.remove(old)
	s.remove(fresh)
	for i := range s.shards {
		if s.shards[i].head != nil {
			t.Fatal("a removed stream is still listed")
		}
	}
	if v := old.Value(idleKey{}); v != old {
		t.Fatal("the tracker is not the context's value")
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
