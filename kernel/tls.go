package kernel

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/grpc/credentials"

	"github.com/policy-engine/policy-engine/internal/logging"
)

// certFiles serves the ext_proc port's TLS from files that are read again when they change:
// a new connection's handshake looks at the files' modification time, size and inode at most
// once every tlsCheckInterval (a few stat calls, never per request), and loads them again
// when one changed. Files that fail to load leave the previous certificates in force.
type certFiles struct {
	cfg     TLSConfig
	log     *logging.Logger
	metrics *kernelMetrics

	current atomic.Pointer[tls.Config]
	checked atomic.Int64 // ns of the last look at the files

	mu     sync.Mutex // serialises reloads
	stamps [3]fileStamp
}

// tlsCheckInterval is how often, at most, a handshake looks at the certificate files.
const tlsCheckInterval = time.Second

type fileStamp struct {
	mtime int64
	size  int64
	ino   uint64
}

func newCertFiles(cfg TLSConfig, m *kernelMetrics, log *logging.Logger) (*certFiles, error) {
	c := &certFiles{cfg: cfg, log: log, metrics: m}
	c.stamps = c.stat()
	tc, err := c.load()
	if err != nil {
		return nil, err
	}
	c.current.Store(tc)
	c.checked.Store(time.Now().UnixNano())
	m.registerTLS()
	return c, nil
}

// serverConfig is the listener's config: every handshake gets the certificates in force.
func (c *certFiles) serverConfig() *tls.Config {
	return &tls.Config{
		MinVersion:         tls.VersionTLS12,
		NextProtos:         []string{"h2"},
		GetConfigForClient: c.configForClient,
	}
}

func (c *certFiles) configForClient(*tls.ClientHelloInfo) (*tls.Config, error) {
	c.maybeReload(time.Now().UnixNano())
	return c.current.Load(), nil
}

// maybeReload loads the files again when tlsCheckInterval has passed since the last look and
// one of them changed.
func (c *certFiles) maybeReload(now int64) {
	last := c.checked.Load()
	if now-last < int64(tlsCheckInterval) || !c.checked.CompareAndSwap(last, now) {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	stamps := c.stat()
	if stamps == c.stamps {
		return
	}
	// A failed load is not retried until a file changes again: a certificate written before
	// its key loads once both are there.
	c.stamps = stamps
	tc, err := c.load()
	if err != nil {
		c.metrics.tlsReloadFail.Inc()
		c.log.Audit(zerolog.ErrorLevel).Err(err).Msg("ext_proc TLS files changed but do not load; keeping the previous certificates")
		return
	}
	c.current.Store(tc)
	c.metrics.tlsReloadSuccess.Inc()
	c.log.Audit(zerolog.InfoLevel).Str("cert_file", c.cfg.CertFile).Msg("ext_proc TLS certificates reloaded")
}

func (c *certFiles) stat() [3]fileStamp {
	var out [3]fileStamp
	for i, p := range []string{c.cfg.CertFile, c.cfg.KeyFile, c.cfg.ClientCAFile} {
		if p == "" {
			continue
		}
		fi, err := os.Stat(p)
		if err != nil {
			continue
		}
		out[i] = fileStamp{mtime: fi.ModTime().UnixNano(), size: fi.Size()}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			out[i].ino = st.Ino
		}
	}
	return out
}

// load reads the files into a server config.
func (c *certFiles) load() (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(c.cfg.CertFile, c.cfg.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("policy_kernel.server.tls: %w", err)
	}
	tc := &tls.Config{
		MinVersion:   tls.VersionTLS12,
		NextProtos:   []string{"h2"},
		Certificates: []tls.Certificate{cert},
	}
	if c.cfg.ClientCAFile != "" {
		pem, err := os.ReadFile(c.cfg.ClientCAFile)
		if err != nil {
			return nil, fmt.Errorf("policy_kernel.server.tls.client_ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, errors.New("policy_kernel.server.tls.client_ca_file: no PEM certificate in " + c.cfg.ClientCAFile)
		}
		tc.ClientCAs = pool
		tc.ClientAuth = tls.VerifyClientCertIfGiven
		if c.cfg.RequireClientCert {
			tc.ClientAuth = tls.RequireAndVerifyClientCert
		}
	}
	return tc, nil
}

// refusalCounter counts and logs (throttled) the handshakes the listener refuses: a client
// without a certificate of client_ca_file, a plaintext client, a client that never finishes.
type refusalCounter struct {
	credentials.TransportCredentials
	metrics *kernelMetrics
	log     *logging.Logger
	logT    *logging.Throttle
}

func newRefusalCounter(c credentials.TransportCredentials, m *kernelMetrics, log *logging.Logger) *refusalCounter {
	return &refusalCounter{TransportCredentials: c, metrics: m, log: log, logT: logging.NewThrottle(10 * time.Second)}
}

func (r *refusalCounter) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	out, info, err := r.TransportCredentials.ServerHandshake(conn)
	if err != nil {
		r.metrics.tlsHandshakeFail.Inc()
		if r.logT.Allow() {
			r.log.Warn().Str("remote", conn.RemoteAddr().String()).Err(err).
				Msg("ext_proc TLS handshake refused (logged at most once every 10 s)")
		}
	}
	return out, info, err
}

func (r *refusalCounter) Clone() credentials.TransportCredentials {
	return &refusalCounter{TransportCredentials: r.TransportCredentials.Clone(), metrics: r.metrics, log: r.log, logT: r.logT}
}
