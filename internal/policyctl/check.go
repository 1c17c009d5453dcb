package policyctl

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
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
	c, err := envoytest.Dial(*kernel, filterConfig(rf.messageTimeout))
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

// errNeedConfigs is explain's answer to --kernel without configs.
var errNeedConfigs = errors.New("explain runs the request offline, in policyctl's own process: it needs the kernel's config (--config) and the agent's (--agent-config); a running kernel does not explain requests")
