// Command crossing prints where the time of the kernel's agent calls goes, from execution
// traces of the kernel and the agent taken at the same time (`make profile` saves them as
// profiles/open<rate>.kernel.trace and .agent.trace):
//
//	go run ./loadtest/cmd/crossing profiles/open2500.kernel.trace profiles/open2500.agent.trace
//
// It reads each trace with `go tool trace -d=parsed`. See docs/performance.md.
package main

import (
	"fmt"
	"os"

	"github.com/policy-engine/policy-engine/loadtest/crossing"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: crossing KERNEL.trace AGENT.trace")
		os.Exit(2)
	}
	b, err := crossing.AnalyzeTraces(os.Args[1], os.Args[2])
	if err == nil {
		err = b.Write(os.Stdout)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "crossing:", err)
		os.Exit(1)
	}
}
