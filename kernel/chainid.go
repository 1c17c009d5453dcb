package kernel

import (
	"sync"

	"google.golang.org/protobuf/proto"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// Chain ids name a compiled chain (its policies, in order, with every setting the agent
// reads) on the agent stream, so that a call to an agent that keeps chains by id
// (GetAgentConfigResponse.chain_ids) carries the id instead of the policies and their
// metadata, once the stream has carried them (PolicyRequest.chain_id). Two chains with the
// same content get the same id, so that rebuilding a snapshot (a reload, an agent coming back)
// does not make the agent's streams learn the same chains again.

// maxChainIDs bounds the ids a kernel process hands out; past it, new chains are sent in full,
// as to an agent without chain ids.
const maxChainIDs = 1 << 16

var chainIDs struct {
	mu   sync.Mutex
	byID map[string]uint64
	last uint64
}

// chainIDOf returns the id of a chain's policies, 0 for an empty chain or when no id is left.
func chainIDOf(ps []*agentv1.Policy) uint64 {
	if len(ps) == 0 {
		return 0
	}
	key, err := proto.MarshalOptions{Deterministic: true}.Marshal(&agentv1.PolicyRequest{Policies: ps})
	if err != nil {
		return 0
	}
	chainIDs.mu.Lock()
	defer chainIDs.mu.Unlock()
	if id, ok := chainIDs.byID[string(key)]; ok {
		return id
	}
	if chainIDs.last >= maxChainIDs {
		return 0
	}
	if chainIDs.byID == nil {
		chainIDs.byID = map[string]uint64{}
	}
	chainIDs.last++
	chainIDs.byID[string(key)] = chainIDs.last
	return chainIDs.last
}
