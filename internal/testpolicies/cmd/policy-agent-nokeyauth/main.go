// Command policy-agent-nokeyauth is policy-agent with every compiled-in policy but apiKeyAuth.
// The fault suite puts it in the place of a real agent, to show that a route whose chain names
// a policy the agent in front of it lacks is never served. It is never shipped.
package main

import (
	"github.com/policy-engine/policy-engine/internal/testpolicies/agentcmd"
	_ "github.com/policy-engine/policy-engine/policies/allowall"
	_ "github.com/policy-engine/policy-engine/policies/auditlog"
	_ "github.com/policy-engine/policy-engine/policies/bodytransform"
	_ "github.com/policy-engine/policy-engine/policies/jwtvalidation"
	_ "github.com/policy-engine/policy-engine/policies/ratelimit"
	_ "github.com/policy-engine/policy-engine/policies/rolecheck"
	_ "github.com/policy-engine/policy-engine/policies/securityheaders"
)

func main() { agentcmd.Run("policy-agent-nokeyauth") }
