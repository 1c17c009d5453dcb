// Package policy is what a compiled-in policy implements and how it registers itself with the
// policy-agent.
//
// A policy package registers a Module in its init function. When the agent loads its config it
// calls Module.New once with the policy's section of agent_core.policies.config, and gets a
// Factory. The agent then calls Factory.Build once for every distinct metadata map that a chain
// names, and caches the Policy it returns; Execute runs on the hot path with typed settings and
// never parses metadata.
package policy

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"sort"
	"strings"
	"sync"
	"time"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
)

// Phases is a set of phases in which a policy can run.
type Phases uint8

const (
	// Request is the request phase: request headers and, when asked for, the request body.
	Request Phases = 1 << iota
	// Response is the response phase: the upstream's status, headers and body.
	Response
	// Both is the request and the response phase.
	Both = Request | Response
)

// Has reports whether p includes the phase of a PolicyRequest.
func (p Phases) Has(phase agentv1.PolicyPhase) bool {
	if phase == agentv1.PolicyPhase_RESPONSE {
		return p&Response != 0
	}
	return p&Request != 0
}

// Module describes a compiled-in policy.
type Module struct {
	// Name is the policy's name in chains, e.g. "apiKeyAuth".
	Name        string
	Version     string
	Description string
	Phases      Phases
	// RequestBody and ResponseBody say that the policy reads a body; the kernel asks Envoy
	// for a body only on routes whose chain holds such a policy.
	RequestBody  bool
	ResponseBody bool
	// ResponseIgnoresRequest says that in the RESPONSE phase the policy reads only the
	// response and the state, not the request: a response chain of such policies is sent
	// without the request's headers, path and body.
	ResponseIgnoresRequest bool
	// Enforces says that the policy can refuse a request: it authenticates, authorizes or
	// limits. Its chain entries fail closed: a failure denies whatever the entry's on_failure
	// says, and a skip_remaining of an earlier entry does not skip them. A policy that only
	// adds, transforms or records sets it to false, and its on_failure is honoured.
	Enforces bool
	// StaticEntries says that some of the policy's compiled entries implement Static; it is
	// published to the kernel (PolicyInfo.static_entries) for information.
	StaticEntries bool
	// MetadataSchema is a JSON schema of the policy's metadata, published to the kernel.
	MetadataSchema string
	// Cacheable says that a chain entry may reuse the policy's results (the entry's `cache`
	// setting; docs/policies/caching.md): the result depends only on the entry's config, the
	// agent's config and the request's parts that a cache key can read (request line,
	// headers, query, client address, state). A result that depends on time, a counter, a
	// remote store or chance is not cacheable; a policy whose result stops holding at a known
	// time sets Result.Expires. False, the default, refuses every entry that caches the
	// policy: a policy nobody thought about is never cached.
	Cacheable bool
	// NotCacheable says why the policy is not cacheable, for the error an entry that caches it
	// gets ("it counts every request").
	NotCacheable string
	// New makes a factory from the policy's section of agent_core.policies.config.
	// It has no side effects beyond the returned value; a factory that holds resources
	// implements io.Closer and is closed when a newer config replaces it.
	New func(Config) (Factory, error)
}

// Config is what a policy's factory is made from.
type Config struct {
	// Raw is the JSON form of agent_core.policies.config.<name>; nil when absent.
	Raw json.RawMessage
	// Unresolved is Raw as the config file has it, before ${env:...} and ${file:...}
	// references were resolved, so that a policy can tell a secret written in clear from a
	// reference; nil when the agent did not resolve references (then Raw is as written).
	Unresolved json.RawMessage
	// Shared holds values that outlive one config snapshot, such as client connections,
	// keyed by whatever the policy chooses. It is safe for concurrent use.
	Shared *sync.Map
	// Log is the agent's logger, for events outside a request such as a background fetch
	// failing. It may be nil in tests; its methods then return nil events, which discard.
	Log *logging.Logger
}

// Decode decodes the policy's settings strictly into dst; absent settings leave dst unchanged.
func (c Config) Decode(dst any) error {
	if len(c.Raw) == 0 || string(c.Raw) == "null" {
		return nil
	}
	return decodeStrictJSON(c.Raw, dst)
}

// Factory compiles a chain entry's metadata into a Policy.
type Factory interface {
	Build(metadata map[string]string) (Policy, error)
}

// FactoryFunc adapts a function to Factory.
type FactoryFunc func(metadata map[string]string) (Policy, error)

// Build calls f.
func (f FactoryFunc) Build(metadata map[string]string) (Policy, error) { return f(metadata) }

// HealthChecker is implemented by factories whose policies depend on something that can fail,
// such as a Redis server.
type HealthChecker interface {
	HealthCheck(ctx context.Context) error
}

// ChainObserver is implemented by policies that need to know how the chain they are in ended,
// whatever ended it: a denial by another policy, a failure, or the chain running to its end.
// The agent calls ObserveChain once per chain run, after the chain is over, for each observer
// in the chain, including observers the chain never reached. It runs on the request's
// goroutine and must not block.
type ChainObserver interface {
	ObserveChain(c *Context, o Outcome)
}

// HeaderOwner is implemented by compiled policies that set request headers from what they
// verified, such as a user id or a token's claims. On every request-phase run of a chain that
// holds such a policy, the agent removes those headers from the incoming request before the
// first policy runs, whatever the chain then decides, so that a client cannot pass a value of
// its own off as the policy's: in every spelling an upstream may read as the same name, that
// is any case and '_' for '-' (x_user_id, X-User_Id). A policy that then sets the header wins.
type HeaderOwner interface {
	// OwnedRequestHeaders returns the names of the request headers the policy may set. It
	// runs on every request: return a slice built with the policy, never a new one.
	OwnedRequestHeaders() []string
}

// Static is implemented by compiled policies that, in some phase, answer every request alike:
// OK with the same header instructions, whatever the request, the response and the state (a
// fixed response header, allowAll). StaticResult returns that answer and true for such a
// phase, else false. The agent reports it when the kernel validates the chain entry, and the
// kernel applies it itself: a chain made only of such entries is never sent to the agent, so
// the policy's Execute, metrics and logs do not see those requests. Implement it only when
// the answer depends on nothing but the entry's metadata and the policy's config; a policy
// that observes outcomes (ChainObserver) is never treated as static.
type Static interface {
	StaticResult(phase agentv1.PolicyPhase) (Result, bool)
}

// Outcome is how a chain ended.
type Outcome struct {
	// Status is OK when the chain let the request (or response) through.
	Status agentv1.StatusCode
	// DecidedBy is the policy that denied or failed; empty when the chain allowed.
	DecidedBy string
	// Message is the denial's or failure's message.
	Message string
	// HTTPStatus is the status of the immediate response that answers the client, 0 when
	// there is none.
	HTTPStatus int
	// Shadow lists what the chain's shadow entries would have refused (a denial or a
	// failure), in chain order; nil when none would have. Their decisions are not part of
	// Status: a shadow entry enforces nothing.
	Shadow []ShadowDecision
}

// ShadowDecision is what a chain entry in shadow mode would have done had it enforced.
type ShadowDecision struct {
	Policy string
	// Decision is "deny" or "error".
	Decision string
	// HTTPStatus is the status of the response the denial would have answered; 0 for a
	// failure, which the kernel answers with its status_on_error (500 by default).
	HTTPStatus int
	// Message is the denial's or the failure's message.
	Message string
}

// Policy is one compiled chain entry.
type Policy interface {
	// Execute runs the policy. A returned error is a policy failure (POLICY_ERROR), handled
	// by the chain entry's on_failure; a denial is a Result with Status POLICY_DENIED.
	Execute(ctx context.Context, c *Context) (Result, error)
}

// Context is the request an agent runs a chain on. Policies read it; the agent applies each
// policy's instructions to it before the next policy runs (SET_HEADER, REMOVE_HEADER, SET_BODY,
// SET_STATE).
type Context struct {
	Phase     agentv1.PolicyPhase
	RequestID string
	RouteName string
	Method    string
	Path      string
	Scheme    string
	Authority string
	ClientIP  string
	// Headers are the request headers, lowercase names.
	Headers map[string]string
	// Body is the request body when the chain asked for it.
	Body []byte
	// Response is the upstream's response; nil in the request phase.
	Response *ResponseContext
	// State carries values set with SET_STATE, from the request phase to the response phase.
	State map[string]string
	// Deadline is when the kernel stops waiting for the chain.
	Deadline time.Time
	// Credentials names the headers and query parameters that the policies compiled for the
	// agent's config read credentials from (CredentialReader), for the audit log to redact.
	// It may be nil.
	Credentials *CredentialSet

	query map[string]string // see QueryParams
}

// ResponseContext is the upstream's response.
type ResponseContext struct {
	Status  int
	Headers map[string]string
	Body    []byte
}

// Header returns the request header with the given lowercase name.
func (c *Context) Header(name string) string { return c.Headers[name] }

// QueryParams returns the query parameters of Path (the first value of each), parsed on first
// use: most chains never read them.
func (c *Context) QueryParams() map[string]string {
	if c.query == nil {
		c.query = map[string]string{}
		if _, q, ok := strings.Cut(c.Path, "?"); ok {
			vals, _ := url.ParseQuery(q)
			for k, v := range vals {
				if len(v) > 0 {
					c.query[k] = v[0]
				}
			}
		}
	}
	return c.query
}

// SetQueryParams sets the query parameters when the kernel sent them parsed.
func (c *Context) SetQueryParams(q map[string]string) { c.query = q }

// Result is a policy's outcome. The agent may keep it for a chain entry with a cache: its
// Instructions and Metadata must then never be changed after Execute returns (results built
// once and shared are fine).
type Result struct {
	Status       agentv1.StatusCode
	Message      string
	Instructions []*agentv1.Instruction
	Metadata     map[string]string
	// Expires, when set, is when the result stops holding (a token's exp): a cached result is
	// never reused from then on. A time in the past (NotReusable) keeps the result from being
	// cached at all: an answer about a passing condition (keys unavailable, a token not valid
	// yet). Zero: the entry's TTL alone bounds it.
	Expires time.Time
}

// notReusable is the Expires of results that must not be cached.
var notReusable = time.Unix(1, 0)

// NotReusable returns r marked as not cacheable (Result.Expires in the past).
func NotReusable(r Result) Result {
	r.Expires = notReusable
	return r
}

// Registry holds the compiled-in policies.
var (
	registryMu sync.RWMutex
	registry   = map[string]Module{}
)

// Register adds a module to the registry. It is meant for init functions: an empty name, a
// missing New or a duplicate name is a programming error and panics.
func Register(m Module) {
	if m.Name == "" {
		panic("BUG: policy.Register: empty policy name")
	}
	if m.New == nil {
		panic(fmt.Sprintf("BUG: policy.Register: policy %q has no New function", m.Name))
	}
	if m.Phases == 0 {
		panic(fmt.Sprintf("BUG: policy.Register: policy %q runs in no phase", m.Name))
	}
	registryMu.Lock()
	defer registryMu.Unlock()
	if _, dup := registry[m.Name]; dup {
		panic(fmt.Sprintf("BUG: policy.Register: policy %q registered twice", m.Name))
	}
	registry[m.Name] = m
}

// Lookup returns the registered module with the given name.
func Lookup(name string) (Module, bool) {
	registryMu.RLock()
	defer registryMu.RUnlock()
	m, ok := registry[name]
	return m, ok
}

// Modules returns every registered module, sorted by name.
func Modules() []Module {
	registryMu.RLock()
	defer registryMu.RUnlock()
	out := make([]Module, 0, len(registry))
	for _, m := range registry {
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// unregister removes a module; tests use it to keep the registry clean.
func unregister(name string) {
	registryMu.Lock()
	delete(registry, name)
	registryMu.Unlock()
}
