package kernel

import "net/http"

// adminRoutes are the kernel's own handlers of the admin listener, besides /config and pprof.
func (k *Kernel) adminRoutes() map[string]http.Handler {
	return map[string]http.Handler{}
}
