// Command policy-kernel runs the policy-kernel, Envoy's ext_proc server: see package kernel.
package main

import (
	"context"
	"errors"
	"flag"
	"os"
	"os/signal"
	"syscall"

	"github.com/policy-engine/policy-engine/internal/gctune"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/kernel"
)

func main() {
	// Let the heap grow by at least 16 MiB between collections (GOGC, when set, wins).
	gc := gctune.Start(16 << 20)
	defer gc.Stop()
	// GOMAXPROCS stays the runtime's: the kernel is on every request's path, and on one
	// processor its latency rose with the load before the tuner gave it a second
	// (docs/performance.md, round 4). The agent tunes its own (internal/proctune).
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := kernel.Main(ctx, os.Args[1:], os.Stderr)
	stop()
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		// --validate answers a person, in plain text: file:line: key: message, one a line.
		// A process that stops logs why as a JSON line, like the rest of its log.
		if validating(os.Args[1:]) {
			logging.Problems(os.Stderr, "policy-kernel", err)
		} else {
			logging.Fatal(os.Stderr, "kernel", "policy-kernel", err)
		}
		gc.Stop()
		os.Exit(1)
	}
}

// validating reports whether the command line asks for --validate.
func validating(args []string) bool {
	for _, a := range args {
		switch a {
		case "-validate", "--validate", "-validate=true", "--validate=true":
			return true
		case "--", "-":
			return false
		}
	}
	return false
}
