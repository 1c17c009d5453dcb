package policyctl

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"github.com/policy-engine/policy-engine/internal/envoytest"
)

func check(ctx context.Context, args []string, stdout, stderr io.Writer) (int, error) {
	fs := flag.NewFlagSet("policyctl check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var rf requestFlags
	rf.register(fs)
	kernel := fs.String("kernel", "127.0.0.1:9001", "the kernel's ext_proc address: `host:port` or unix:///path/to.sock")
	var tf tlsFlags
	tf.register(fs)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "usage: policyctl check [flags] [METHOD] PATH\n\nSends one request through a running kernel as Envoy's ext_proc filter would and prints what\nEnvoy would do. Exit status: 0 it reached the upstream, 1 refused, 2 usage or connection error.\n\n")
		fs.PrintDefaults()
	}
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return ExitError, err
	}
	req, resp, err := rf.request(pos)
	if err != nil {
		return ExitError, err
	}
	fc := filterConfig(rf.messageTimeout)
	if fc.TLS, err = tf.config(*kernel); err != nil {
		return ExitError, err
	}
	c, err := envoytest.Dial(*kernel, fc)
	if err != nil {
		return ExitError, fmt.Errorf("--kernel %q: %w", *kernel, err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(ctx, rf.messageTimeout*4+5*time.Second)
	defer cancel()
	res, err := c.Do(ctx, req, upstreamOf(resp))
	if err != nil {
		return ExitError, fmt.Errorf("the request could not be played: %w", err)
	}
	// Envoy answers a kernel it cannot reach with its status_on_error; that is an answer in
	// production, but here it means the kernel is not where --kernel says.
	if res.LocalReply && strings.HasPrefix(res.Details, envoytest.DetailsGRPCErrorPrefix+"14") {
		return ExitError, fmt.Errorf("cannot reach the kernel at %s (is it running? make run starts one): %s", *kernel, res.Details)
	}
	rep := newReport(req, resp, res, nil)
	if err := rep.write(stdout, rf.json); err != nil {
		return ExitError, err
	}
	return rep.exitCode(), nil
}

// tlsFlags are the TLS of Envoy's ext_proc cluster, for a kernel with server.tls.
type tlsFlags struct {
	ca, cert, key, serverName string
}

func (f *tlsFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.ca, "tls-ca", "", "speak TLS to the kernel, trusting the CA certificates of this PEM `file`")
	fs.StringVar(&f.cert, "tls-cert", "", "the client certificate (PEM `file`) for a kernel that requires one (mTLS); with --tls-key")
	fs.StringVar(&f.key, "tls-key", "", "the client certificate's private key (PEM `file`)")
	fs.StringVar(&f.serverName, "tls-server-name", "", "the name the kernel's certificate must hold (default: the host of --kernel)")
}

// config returns nil (plaintext) without --tls-ca.
func (f *tlsFlags) config(target string) (*tls.Config, error) {
	if f.ca == "" {
		if f.cert != "" || f.key != "" || f.serverName != "" {
			return nil, errors.New("--tls-cert, --tls-key and --tls-server-name need --tls-ca")
		}
		return nil, nil
	}
	pemData, err := os.ReadFile(f.ca)
	if err != nil {
		return nil, fmt.Errorf("--tls-ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemData) {
		return nil, fmt.Errorf("--tls-ca %s: no PEM certificate in it", f.ca)
	}
	c := &tls.Config{RootCAs: pool, ServerName: f.serverName, MinVersion: tls.VersionTLS12}
	if c.ServerName == "" && !strings.HasPrefix(target, "unix:") {
		if host, _, err := net.SplitHostPort(target); err == nil {
			c.ServerName = host
		}
	}
	if (f.cert == "") != (f.key == "") {
		return nil, errors.New("--tls-cert and --tls-key go together")
	}
	if f.cert != "" {
		pair, err := tls.LoadX509KeyPair(f.cert, f.key)
		if err != nil {
			return nil, fmt.Errorf("--tls-cert, --tls-key: %w", err)
		}
		c.Certificates = []tls.Certificate{pair}
	}
	return c, nil
}

// errNeedConfigs is explain's answer to --kernel without configs.
var errNeedConfigs = errors.New("explain needs the kernel's config (--config) and the agent's (--agent-config) to run offline, or a running kernel's admin listener (--kernel-admin http://127.0.0.1:9190); the ext_proc port (--kernel) does not explain requests")
