// Command policy-testagent is policy-agent with the misbehaving policies of package testpolicies
// compiled in besides the real ones. The fault suite runs it; it is never shipped.
package main

import (
	_ "github.com/policy-engine/policy-engine/internal/testpolicies"
	"github.com/policy-engine/policy-engine/internal/testpolicies/agentcmd"
	_ "github.com/policy-engine/policy-engine/policies/all"
)

func main() { agentcmd.Run("policy-testagent") }
