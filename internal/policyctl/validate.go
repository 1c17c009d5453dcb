package policyctl

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"

	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/kernel"
)

// Exit codes of validate.
const (
	exitValid   = 0
	exitInvalid = 1
)

// validate is policy-kernel --validate without running agents: the agents' policies run in
// this process, on their configs. One code path with the kernel's (kernel.ValidateOffline).
func validate(_ context.Context, args []string, stdout, stderr io.Writer) (int, error) {
	fs := flag.NewFlagSet("policyctl validate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	kernelCfg := fs.String("config", "", "the kernel's config `file`")
	var agentCfgs listFlag
	fs.Var(&agentCfgs, "agent-config", "an agent's config `file` (repeatable: one for every agent the kernel config names, matched by agent_core.name)")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `usage: policyctl validate --config kernel.yaml --agent-config agent.yaml [--agent-config agent2.yaml]

Checks the kernel config as policy-kernel --validate does, with the agents' policies run in
policyctl's own process instead of asked over their sockets: nothing listens, nothing waits.
Every chain entry is built by its agent's policies as the agent would build it, and every
problem is printed as file:line: key: message: the kernel config's (bad metadata, unknown
policy, a policy in the wrong phase, an agent without an agent config) and each agent
config's own. Give one --agent-config for every agent of policy_kernel.agents: each is
matched by its agent_core.name. Exit status: 0 valid, 1 invalid, 2 usage error.

`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return ExitError, err
	}
	if fs.NArg() > 0 {
		return ExitError, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	if *kernelCfg == "" || len(agentCfgs) == 0 {
		return ExitError, fmt.Errorf("give the configs: --config kernel.yaml --agent-config agent.yaml")
	}
	clients, closeAll, agentErr := loadAgents(agentCfgs, nil, stderr)
	defer closeAll()
	// An agent config that does not load is reported with the kernel config's problems, which
	// are checked with the agents that did load.
	err := kernel.ValidateOffline(stdout, *kernelCfg, clients)
	if err = errors.Join(agentErr, err); err != nil {
		logging.Problems(stderr, "policyctl", err)
		return exitInvalid, nil
	}
	return exitValid, nil
}
