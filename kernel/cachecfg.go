package kernel

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/cond"
)

// A chain entry's `cache` (docs/policies/caching.md): the agent reuses the entry's result for
// requests with the same key until the TTL passes. The kernel checks the settings, compiles the
// key expressions to find their mistakes at load, refuses a route whose agent does not
// advertise the feature, and gives each entry's cache a scope that changes with the route's
// chain, so that no result crosses routes or configs.

// CacheConfig is a chain entry's cache setting.
type CacheConfig struct {
	// Key is a CEL expression over the request, or a list of them; the key is the tuple of
	// their values.
	Key CacheKey `yaml:"key" required:"true"`
	// TTL is how long a result is reused, from MinCacheTTL to MaxCacheTTL.
	TTL        time.Duration `yaml:"ttl" required:"true"`
	MaxEntries int64         `yaml:"max_entries"`
	MaxBytes   int64         `yaml:"max_bytes"`
}

// Bounds of a chain entry's cache settings.
const (
	MinCacheTTL = time.Millisecond
	// MaxCacheTTL bounds how long a decision outlives what it was made on (an API key
	// removed from the agent's config is dropped on the agent's reload, but a revoked token
	// is not known to anyone): an hour, and usually far less.
	MaxCacheTTL        = time.Hour
	MaxCacheEntries    = 1_000_000
	MaxCacheBytes      = 1 << 30
	MaxCacheKeyParts   = 8
	cacheFeature       = "cache"
	cacheScopeHexBytes = 16
)

// CacheKey is one CEL expression or a list of them.
type CacheKey []string

// UnmarshalYAML implements yaml.Unmarshaler: a string or a list of strings.
func (k *CacheKey) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	switch n.Kind {
	case yaml.ScalarNode:
		*k = CacheKey{n.Value}
		return nil
	case yaml.SequenceNode:
		out := make(CacheKey, 0, len(n.Content))
		for _, e := range n.Content {
			if e.Kind != yaml.ScalarNode {
				return fmt.Errorf("line %d: want a CEL expression (a string), got a %s", e.Line, nodeKind(e))
			}
			out = append(out, e.Value)
		}
		*k = out
		return nil
	}
	return fmt.Errorf("line %d: want a CEL expression or a list of them, got a %s", n.Line, nodeKind(n))
}

func nodeKind(n *yaml.Node) string {
	if n.Kind == yaml.MappingNode {
		return "map"
	}
	if n.Kind == yaml.SequenceNode {
		return "list"
	}
	return "value"
}

// checkCache checks an entry's cache settings; key is the entry's config key.
func checkCache(bad func(key, format string, args ...any), key string, c *CacheConfig) {
	if c == nil {
		return
	}
	switch {
	case len(c.Key) == 0:
		bad(key+".key", "must name at least one CEL expression")
	case len(c.Key) > MaxCacheKeyParts:
		bad(key+".key", "must have at most %d parts, got %d", MaxCacheKeyParts, len(c.Key))
	}
	for i, src := range c.Key {
		if _, err := cond.CompileKey(src); err != nil {
			k := key + ".key"
			if len(c.Key) > 1 {
				k = fmt.Sprintf("%s[%d]", k, i)
			}
			bad(k, "invalid cache key: %s", celError(err))
		}
	}
	if c.TTL < MinCacheTTL || c.TTL > MaxCacheTTL {
		bad(key+".ttl", "must be from %v to %v, got %v", MinCacheTTL, MaxCacheTTL, c.TTL)
	}
	if c.MaxEntries < 0 || c.MaxEntries > MaxCacheEntries {
		bad(key+".max_entries", "must be from 0 (the agent's default) to %d, got %d", MaxCacheEntries, c.MaxEntries)
	}
	if c.MaxBytes < 0 || c.MaxBytes > MaxCacheBytes {
		bad(key+".max_bytes", "must be from 0 (the agent's default) to %d, got %d", MaxCacheBytes, c.MaxBytes)
	}
}

// celError is a CEL compile error on one line: the messages without the source excerpts.
func celError(err error) string {
	var msgs []string
	for _, l := range strings.Split(err.Error(), "\n") {
		if t := strings.TrimSpace(l); t != "" && !strings.HasPrefix(t, "|") {
			msgs = append(msgs, strings.TrimPrefix(t, "ERROR: <input>:"))
		}
	}
	// The compiler's hint (the variables an expression may read) completes the message before it.
	return strings.ReplaceAll(strings.Join(msgs, "; "), "; (", " (")
}

// spec is the cache setting as the agent API carries it, without a scope; nil for no cache.
func (c *CacheConfig) spec() *agentv1.CacheSpec {
	if c == nil {
		return nil
	}
	return &agentv1.CacheSpec{Key: c.Key, TtlMs: c.TTL.Milliseconds(), MaxEntries: c.MaxEntries, MaxBytes: c.MaxBytes}
}

// cacheEntryKey is the part of entryKey that tells entries with different cache settings
// apart (the scope, which differs per route, is left out: the agent's verdict does not
// depend on it).
func cacheEntryKey(c *agentv1.CacheSpec) string {
	if c == nil {
		return ""
	}
	return fmt.Sprintf("\x00cache\x00%d\x00%d\x00%d\x00%s", c.GetTtlMs(), c.GetMaxEntries(), c.GetMaxBytes(), strings.Join(c.GetKey(), "\x00"))
}

// scopeCaches gives every cached entry of a compiled chain its scope: a hash of the route,
// the phase, the entry's position and every entry of the chain as sent (policy, metadata,
// on_failure, mode, condition, cache settings), computed once per snapshot. An entry's result
// may depend on what the entries before it did, so a change anywhere in the chain gives new
// scopes.
func scopeCaches(route string, phase agentv1.PolicyPhase, policies []*agentv1.Policy) {
	var h []byte
	for i, p := range policies {
		if p.GetCache() == nil {
			continue
		}
		if h == nil { // before any scope is set: the hash covers the entries as written
			sum := sha256.New()
			fmt.Fprintf(sum, "%d:%s\x00%s\x00", len(route), route, phase)
			opts := proto.MarshalOptions{Deterministic: true}
			for _, q := range policies {
				b, _ := opts.Marshal(q)
				fmt.Fprintf(sum, "%d:", len(b))
				sum.Write(b)
			}
			h = sum.Sum(nil)
		}
		s := sha256.Sum256(append(slices.Clip(h), byte(i), byte(i>>8)))
		p.Cache.Scope = hex.EncodeToString(s[:cacheScopeHexBytes])
	}
}

// cacheProblems refuses the cached entries of a chain whose agent does not advertise the cache
// feature: an older agent would ignore the setting, which is safe, but the operator asked for
// something that would silently not happen.
func cacheProblems(entries []ChainEntry, src *agentv1.GetAgentConfigResponse, agentName, key string, problems []problem) []problem {
	if src == nil || hasFeature(src, cacheFeature) {
		return problems
	}
	for i, e := range entries {
		if e.Cache != nil {
			problems = append(problems, problem{fmt.Sprintf("%s[%d].cache", key, i),
				fmt.Sprintf("agent %q does not support cache (its features: %q)", agentName, src.GetAgentMetadata()[featuresKey])})
		}
	}
	return problems
}

// CacheDump is a chain entry's cache in /config.
type CacheDump struct {
	Key        []string `json:"key"`
	TTL        string   `json:"ttl"`
	MaxEntries int64    `json:"max_entries,omitempty"`
	MaxBytes   int64    `json:"max_bytes,omitempty"`
	Scope      string   `json:"scope"`
}

func dumpCache(c *agentv1.CacheSpec) *CacheDump {
	if c == nil {
		return nil
	}
	return &CacheDump{Key: c.GetKey(), TTL: (time.Duration(c.GetTtlMs()) * time.Millisecond).String(), MaxEntries: c.GetMaxEntries(), MaxBytes: c.GetMaxBytes(), Scope: c.GetScope()}
}
