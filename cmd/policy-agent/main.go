// Command policy-agent runs the policy-agent: see package agent.
package main

import (
	"context"
	"errors"
	"flag"
	"os"
	"os/signal"
	"syscall"

	"github.com/policy-engine/policy-engine/agent"
	"github.com/policy-engine/policy-engine/internal/gctune"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/proctune"
	_ "github.com/policy-engine/policy-engine/policies/all"
)

func main() {
	// Let the heap grow by at least 16 MiB between collections (GOGC, when set, wins).
	gc := gctune.Start(16 << 20)
	defer gc.Stop()
	// One processor while one is enough, more as the load asks (GOMAXPROCS, when set, wins).
	// The agent's own work per call is a few microseconds; a second processor mostly costs
	// wake-ups (internal/proctune).
	procs := proctune.Start()
	defer procs.Stop()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := agent.Main(ctx, os.Args[1:], os.Stderr)
	stop()
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		// --validate answers a person, in plain text: file:line: key: message, one a line.
		// A process that stops logs why as a JSON line, like the rest of its log.
		if validating(os.Args[1:]) {
			logging.Problems(os.Stderr, "policy-agent", err)
		} else {
			logging.Fatal(os.Stderr, "agent", "policy-agent", err)
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
