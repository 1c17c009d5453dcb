package kernel

import (
	"fmt"
	"net"
	"strconv"
	"strings"

	"github.com/policy-engine/policy-engine/internal/uds"
)

// extProcAddr is where the kernel serves ext_proc: --listen, else server.socket_path, else
// server.address:server.port. A Unix socket is "unix:///path" (or "unix:/path").
func extProcAddr(kc *KernelConfig, f *flags) string {
	switch {
	case f.listen != "":
		return f.listen
	case kc.Server.SocketPath != "":
		return "unix://" + uds.Path(kc.Server.SocketPath)
	}
	return net.JoinHostPort(kc.Server.Address, strconv.Itoa(kc.Server.Port))
}

// isUnix reports whether addr names a Unix socket.
func isUnix(addr string) bool { return strings.HasPrefix(addr, "unix:") }

// listenExtProc opens the ext_proc listener. A Unix socket gets the agent socket's treatment
// (internal/uds: a stale file left by a dead kernel is removed, a live one refused) and the mode
// server.socket_mode, 0600 unless set.
func listenExtProc(kc *KernelConfig, f *flags) (net.Listener, error) {
	addr := extProcAddr(kc, f)
	if !isUnix(addr) {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("listen on %q: %w", addr, err)
		}
		return ln, nil
	}
	mode, err := ParseSocketMode(kc.Server.SocketMode)
	if err != nil {
		return nil, fmt.Errorf("policy_kernel.server.socket_mode: %w", err)
	}
	ln, err := uds.ListenMode(addr, mode)
	if err != nil {
		return nil, fmt.Errorf("listen on %q: %w", addr, err)
	}
	return ln, nil
}
