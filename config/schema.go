// Package config holds the example config files and the JSON schemas of both config files:
// schema/kernel-config.schema.json and schema/agent-config.schema.json. The binaries check
// every config they load against them; editors can use them too (yaml-language-server:
// "# yaml-language-server: $schema=<path of the schema>").
package config

import _ "embed" // the schemas are embedded

// KernelSchema is the JSON schema of the policy-kernel's config file.
//
//go:embed schema/kernel-config.schema.json
var KernelSchema []byte

// AgentSchema is the JSON schema of the policy-agent's config file.
//
//go:embed schema/agent-config.schema.json
var AgentSchema []byte
