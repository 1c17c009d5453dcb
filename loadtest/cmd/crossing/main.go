// Command crossing prints where the time of the kernel's agent calls goes, from execution
// traces of the kernel and the agent taken at the same time (`make profile` saves them as
// profiles/open<rate>.kernel.trace and .agent.trace):
//
//	go run ./loadtest/cmd/crossing profiles/open2500.kernel.trace profiles/open2500.agent.trace
//
// It reads each trace with `go tool trace -d=parsed`. See docs/performance.md.
package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"

	"github.com/policy-engine/policy-engine/loadtest/crossing"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: crossing KERNEL.trace AGENT.trace")
		os.Exit(2)
	}
	var dumps [2]bytes.Buffer
	for i, path := range os.Args[1:] {
		cmd := exec.Command("go", "tool", "trace", "-d=parsed", path)
		cmd.Stdout, cmd.Stderr = &dumps[i], os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintf(os.Stderr, "crossing: read %s: %v\n", path, err)
			os.Exit(1)
		}
	}
	b, err := crossing.Analyze(&dumps[0], &dumps[1])
	if err == nil {
		err = b.Write(os.Stdout)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "crossing:", err)
		os.Exit(1)
	}
}
