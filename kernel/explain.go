package kernel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/rs/zerolog"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
)

// NewOfflineServer returns a kernel that serves cfg with the given clients as its agents (by
// agent name), as a running kernel would once it has reached them: their policy sets learned,
// the chain entries checked with them, the snapshot built. It is for tools that play one
// request through the kernel in their own process (policyctl explain); it listens on nothing
// and logs nothing. Every agent of cfg needs a client.
func NewOfflineServer(cfg *KernelConfig, clients map[string]AgentClient) (*Server, error) {
	m := newKernelMetrics()
	agents := make(map[string]*agentState, len(cfg.Agents))
	for _, ac := range cfg.Agents {
		c := clients[ac.Name]
		if c == nil {
			return nil, fmt.Errorf("agent %q of the kernel config has no agent config (its agent_core.name must be %q)", ac.Name, ac.Name)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		info, err := c.GetAgentConfig(ctx)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("agent %q: %w", ac.Name, err)
		}
		a := &agentState{cfg: ac, client: c, metrics: m.forAgent(ac.Name)}
		a.info.Store(info)
		a.healthy.Store(true)
		agents[ac.Name] = a
	}
	for name, err := range checkEntries(cfg, agents, 5*time.Second) {
		return nil, fmt.Errorf("agent %q: checking the chain entries: %w", name, err)
	}
	s := NewServer(logging.New(io.Discard, "kernel", zerolog.Disabled), m)
	s.Store(buildSnapshot(cfg, "offline", agents, m))
	return s, nil
}

// ValidateOffline is policy-kernel --validate with the agents in the caller's process, by
// agent name (policyctl validate): it loads the kernel config at file, learns each agent's
// policies, has it build every chain entry the config gives it, and writes "valid" to w or
// returns every problem as file:line: key: message. It opens no socket and waits for nothing.
// An agent of the config without a client is a problem; so is a client no agent is named for.
func ValidateOffline(w io.Writer, file string, clients map[string]AgentClient) error {
	cfg, data, err := LoadConfig(file)
	if err != nil {
		return err
	}
	kc := cfg.PolicyKernel
	m := newKernelMetrics()
	agents := make(map[string]*agentState, len(kc.Agents))
	var errs []error
	for _, ac := range kc.Agents {
		a := &agentState{cfg: ac, metrics: m.forAgent(ac.Name)}
		agents[ac.Name] = a
		c := clients[ac.Name]
		if c == nil {
			continue // validateReport names it
		}
		a.client = c
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		info, err := c.GetAgentConfig(ctx)
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("agent %q: %w", ac.Name, err))
			continue
		}
		a.info.Store(info)
		a.healthy.Store(true)
	}
	for _, name := range sortedKeys(clients) {
		if _, ok := agents[name]; !ok {
			errs = append(errs, fmt.Errorf("%s: an agent config has agent_core.name %q, which no agent of policy_kernel.agents is named", file, name))
		}
	}
	entryErrs := checkEntries(kc, agents, 5*time.Second)
	snap := buildSnapshot(kc, configVersion(kc.Version, data), agents, m)
	if err := validateReport(w, file, data, snap, entryErrs, true); err != nil {
		errs = append([]error{err}, errs...)
	}
	return errors.Join(errs...)
}

// RouteChoice is how the kernel picks the route of a request and what the route runs.
type RouteChoice struct {
	// Route is the route's name, "default" for the default policy; "" when no route matched
	// and there is no default policy: the request passes unchanged.
	Route string
	// Rule is why: "attribute" (the xds.route_name attribute names the route), "path prefix"
	// (the longest route name that is a prefix of the normalised path), "default", or "none".
	Rule  string
	Agent string
	// Invalid is why requests on the route are refused, when they are.
	Invalid string
	// Request and Response are the chains as the kernel sends them to the agent (shadow set
	// where the route or the config is in shadow mode).
	Request, Response []*agentv1.Policy
}

// ExplainRoute picks the route of a request with the xds.route_name attribute routeName and
// the :path path as Snapshot.route does, without counting it, and says why.
func (s *Snapshot) ExplainRoute(routeName, path string) RouteChoice {
	var (
		r    *Route
		rule string
	)
	if rr, ok := s.routes.ByName(routeName); routeName != "" && ok {
		r, rule = rr, "attribute"
	} else if rr, ok := s.routes.ByPath(path); ok {
		r, rule = rr, "path prefix"
	} else if s.defaultRoute != nil {
		r, rule = s.defaultRoute, "default"
	}
	if r == nil {
		return RouteChoice{Rule: "none"}
	}
	c := RouteChoice{Route: r.Name, Rule: rule, Invalid: r.invalid, Request: r.request.policies, Response: r.response.policies}
	if r.agent != nil {
		c.Agent = r.agent.cfg.Name
	}
	return c
}
