package agent

import (
	"time"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/headers"
	"github.com/policy-engine/policy-engine/internal/logging"
)

// spoofLog throttles the log of identity headers a client sent itself.
var spoofLog = logging.NewThrottle(10 * time.Second)

// maxOwners is how many header-owning policies of one chain are gathered without allocating.
const maxOwners = 4

// removeOwned strips from the request, before a request chain runs, every header that a policy
// of the chain owns (policy.HeaderOwner), in any spelling Envoy forwards that folds to the same
// name: ASCII case and '_' for '-'. Each removal goes into pc, so that no policy of the chain
// reads the client's value, and becomes a REMOVE_HEADER instruction ahead of the chain's own,
// so that a policy that sets the header afterwards wins (the kernel folds the two into one
// set). A chain without an owner costs one type assertion per policy; a chain with one, one
// pass over the request headers; nothing is allocated unless a header is removed.
func (e *Executor) removeOwned(req *agentv1.PolicyRequest, chain []resolved, pc *policy.Context, ins []*agentv1.Instruction) []*agentv1.Instruction {
	if req.GetPhase() != agentv1.PolicyPhase_REQUEST {
		return ins
	}
	var buf [maxOwners][]string
	owned := buf[:0]
	for _, r := range chain {
		if o, ok := r.policy.(policy.HeaderOwner); ok && r.err == nil {
			if names := o.OwnedRequestHeaders(); len(names) > 0 {
				owned = append(owned, names)
			}
		}
	}
	if len(owned) == 0 {
		return ins
	}
	for k := range pc.Headers {
		if !ownedBy(owned, k) {
			continue
		}
		delete(pc.Headers, k) // deleting the entry being visited is safe in a range
		ins = append(ins, policy.RemoveHeader(k))
		if spoofLog.Allow() {
			e.log.Warn().Str("request_id", req.GetRequestId()).Str("route", req.GetRouteName()).Str("header", k).
				Msg("removed a request header that a policy of the chain sets (logged at most every 10s)")
		}
	}
	return ins
}

// ownedBy reports whether header is one of the owned names, spelling aside.
func ownedBy(owned [][]string, header string) bool {
	for _, names := range owned {
		for _, n := range names {
			if headers.SameName(header, n) {
				return true
			}
		}
	}
	return false
}
