package agent

// featuresKey is the agent_metadata key of GetAgentConfig that lists, comma-separated, the
// chain-entry features this agent implements (Policy fields an older agent would ignore): the
// kernel refuses a route whose entries use a feature its agent does not list.
const featuresKey = "features"

// chainFeatures are the chain-entry features this agent implements; a new one is appended.
var chainFeatures = []string{
	cacheFeature, // Policy.cache (cache.go)
}
