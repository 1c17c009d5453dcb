// Command extproc-noop is the load test's baseline: an ext_proc server that answers every
// message with the empty reply of its type.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/policy-engine/policy-engine/loadtest/noop"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	err := noop.Main(ctx, os.Args[1:], os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "extproc-noop:", err)
		os.Exit(1)
	}
}
