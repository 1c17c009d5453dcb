// Command policy-testagent is policy-agent with the misbehaving policies of package testpolicies
// compiled in besides the real ones. The fault suite runs it; it is never shipped.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/policy-engine/policy-engine/agent"
	_ "github.com/policy-engine/policy-engine/internal/testpolicies"
	_ "github.com/policy-engine/policy-engine/policies/all"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := agent.Main(ctx, os.Args[1:], os.Stderr)
	stop()
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "policy-testagent: %v\n", err)
		os.Exit(1)
	}
}
