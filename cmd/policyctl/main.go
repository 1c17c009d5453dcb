// Command policyctl plays one HTTP request through the policy kernel as Envoy would, without
// an Envoy: see package internal/policyctl.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/policy-engine/policy-engine/internal/policyctl"
	// explain runs the agent's policies in this process.
	_ "github.com/policy-engine/policy-engine/policies/all"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := policyctl.Main(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
