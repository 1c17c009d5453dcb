// Package agentcmd is the main of the test agents: policy-agent with another set of policies
// compiled in (each command's blank imports choose it). They are never shipped.
package agentcmd

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/policy-engine/policy-engine/agent"
)

// Run runs the agent until SIGINT or SIGTERM, and exits 1 with name and the error on failure.
func Run(name string) {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := agent.Main(ctx, os.Args[1:], os.Stderr)
	stop()
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		os.Exit(1)
	}
}
