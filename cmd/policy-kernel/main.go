// Command policy-kernel runs the policy-kernel, Envoy's ext_proc server: see package kernel.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/policy-engine/policy-engine/internal/gctune"
	"github.com/policy-engine/policy-engine/kernel"
)

func main() {
	// Let the heap grow by at least 16 MiB between collections (GOGC, when set, wins).
	gc := gctune.Start(16 << 20)
	defer gc.Stop()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := kernel.Main(ctx, os.Args[1:], os.Stderr)
	stop()
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "policy-kernel: %v\n", err)
		gc.Stop()
		os.Exit(1)
	}
}
