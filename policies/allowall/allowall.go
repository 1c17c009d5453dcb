// Package allowall is the allowAll policy: it lets every request through unchanged.
package allowall

import (
	"context"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// Name is the policy's name in chains.
const Name = "allowAll"

const schema = `{"$schema":"https://json-schema.org/draft/2020-12/schema","type":"object","additionalProperties":false,"properties":{}}`

func init() {
	policy.Register(policy.Module{
		Name:        Name,
		Version:     "1.0.0",
		Description: "Allows every request unchanged.",
		Phases:      policy.Both,
		// In the response phase it reads only the response and the state.
		ResponseIgnoresRequest: true,
		StaticEntries:          true,
		MetadataSchema:         schema,
		New: func(policy.Config) (policy.Factory, error) {
			return policy.FactoryFunc(func(md map[string]string) (policy.Policy, error) {
				var s struct{}
				if err := policy.DecodeMetadata(md, &s); err != nil {
					return nil, err
				}
				return AllowAll{}, nil
			}), nil
		},

		// Cacheable: its result is the same for every request.
		Cacheable: true,
	})
}

// AllowAll allows everything.
type AllowAll struct{}

// Execute allows the request.
func (AllowAll) Execute(context.Context, *policy.Context) (policy.Result, error) {
	return policy.Result{}, nil
}

// StaticResult is the policy's answer in either phase: OK, nothing changed.
func (AllowAll) StaticResult(agentv1.PolicyPhase) (policy.Result, bool) {
	return policy.Result{}, true
}

var (
	_ policy.Policy = AllowAll{}
	_ policy.Static = AllowAll{}
)
