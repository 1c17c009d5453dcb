// Package all imports every compiled-in policy, so that each registers itself with the agent.
package all

import (
	_ "github.com/policy-engine/policy-engine/policies/allowall"
	_ "github.com/policy-engine/policy-engine/policies/apikeyauth"
	_ "github.com/policy-engine/policy-engine/policies/auditlog"
	_ "github.com/policy-engine/policy-engine/policies/bodytransform"
	_ "github.com/policy-engine/policy-engine/policies/jwtvalidation"
	_ "github.com/policy-engine/policy-engine/policies/ratelimit"
	_ "github.com/policy-engine/policy-engine/policies/rolecheck"
	_ "github.com/policy-engine/policy-engine/policies/securityheaders"
)
