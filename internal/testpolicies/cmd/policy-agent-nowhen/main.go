// Command policy-agent-nowhen is policy-agent as a build older than chain-entry conditions:
// every compiled-in policy, but the "when" feature is not advertised. The suites put it in
// the place of a real agent, to show that a route whose entries have conditions is never
// served by an agent that would ignore them. It is never shipped.
package main

import (
	"github.com/policy-engine/policy-engine/agent"
	_ "github.com/policy-engine/policy-engine/policies/all"

	"github.com/policy-engine/policy-engine/internal/testpolicies/agentcmd"
)

func main() {
	agent.WithoutFeature("when")
	agentcmd.Run("policy-agent-nowhen")
}
