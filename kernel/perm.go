package kernel

import (
	"fmt"

	"github.com/policy-engine/policy-engine/internal/fsperm"
	"github.com/policy-engine/policy-engine/internal/uds"
)

// permissionProblems lists what --validate refuses in where the kernel's files live: a config
// file or config directory that every user may write to, and an agent socket in a directory
// that every user may write to (anyone could put a socket there that answers "allow"), nor a
// kernel socket there (anyone could replace it and see every request Envoy sends).
func permissionProblems(file string, kc *KernelConfig) []error {
	var errs []error
	if err := fsperm.CheckConfig(file); err != nil {
		errs = append(errs, err)
	}
	if p := uds.Path(kc.Server.SocketPath); p != "" {
		if err := fsperm.CheckSocket(p); err != nil {
			errs = append(errs, fmt.Errorf("policy_kernel.server.socket_path: %w", err))
		}
	}
	seen := map[string]bool{}
	for _, a := range kc.Agents {
		p := uds.Path(a.SocketPath)
		if seen[p] {
			continue
		}
		seen[p] = true
		if err := fsperm.CheckSocket(p); err != nil {
			errs = append(errs, fmt.Errorf("agent %q: %w", a.Name, err))
		}
	}
	return errs
}
