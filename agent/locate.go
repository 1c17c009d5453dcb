package agent

import (
	"errors"
	"fmt"
	"regexp"

	"github.com/policy-engine/policy-engine/internal/yamlconf"
)

// policyConfigError is a policy's refusal of its section of the agent config
// (agent_core.policies.config.<policy>), as Executor.Load reports it.
type policyConfigError struct {
	policy string
	err    error
}

func (e *policyConfigError) Error() string {
	return fmt.Sprintf("agent_core.policies.config.%s: %v", e.policy, e.err)
}

func (e *policyConfigError) Unwrap() error { return e.err }

// leadingKey is the key path a policy's error starts with, such as "keys[0]: " or
// "redis.tls.ca_file: ".
var leadingKey = regexp.MustCompile(`^([A-Za-z0-9_]+(?:\[[0-9]+\])*(?:\.[A-Za-z0-9_]+(?:\[[0-9]+\])*)*): `)

// locate places the problems of a config load at their line in file, whose contents are data:
// a policy's refusal of its settings at the line of the setting its message starts with (or of
// its section), as file:line: key: message; other problems are prefixed with the file alone.
func locate(file string, data []byte, err error) error {
	doc, derr := yamlconf.ParseDoc(file, data)
	var out []error
	for _, e := range unjoin(err) {
		var pe *policyConfigError
		if derr != nil || !errors.As(e, &pe) {
			out = append(out, fmt.Errorf("%s: %w", file, e))
			continue
		}
		section := "agent_core.policies.config." + pe.policy
		where := section
		if m := leadingKey.FindStringSubmatch(pe.err.Error()); m != nil {
			where = section + "." + m[1]
		}
		out = append(out, &yamlconf.Error{File: file, Line: doc.Line(where), Key: section, Msg: pe.err.Error()})
	}
	return errors.Join(out...)
}

// unjoin returns the errors an errors.Join holds, recursively; err alone otherwise.
func unjoin(err error) []error {
	j, ok := err.(interface{ Unwrap() []error })
	if !ok {
		return []error{err}
	}
	var out []error
	for _, e := range j.Unwrap() {
		out = append(out, unjoin(e)...)
	}
	return out
}
