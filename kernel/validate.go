package kernel

import (
	"context"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// staleRoute answers a call whose agent turned out to lack what the route's chain needs (the
// agent was replaced by a build with other policies and the snapshot is not rebuilt yet):
// whatever the agent answered, the request is refused as on an invalid route.
func (s *Server) staleRoute(st *stream, msg string) chainResult {
	if st.phase == agentv1.PolicyPhase_RESPONSE {
		st.outcome(statusError) // the response phase has no invalid_route series
	} else {
		st.outcome(statusInvalidRoute)
	}
	if s.invalidLog.Allow() {
		s.log.Error().Str("route", st.route.Name).Str("request_id", st.requestID).Str("error", msg).Msg("the agent no longer runs the route's chain; request denied")
	}
	return chainResult{immediate: denial(st.snap.Config.Server.StatusOnError, codeInvalidRoute, "the route's policy chain is invalid")}
}

// The kernel's schema checks cannot tell everything a policy refuses: a setting out of the
// range its factory accepts, a jwtValidation entry without a key source where the agent has
// none either. So whenever the kernel compiles a config against its agents (start-up,
// --validate, reload, rediscovery) it first asks each agent to build the chain entries the way
// it will run them (ValidateChains), and an entry the agent refuses makes its route invalid.
// An agent that predates the call leaves the schema checks alone.

// entriesByAgent lists the distinct chain entries of cfg for each agent, with their keys.
func entriesByAgent(cfg *KernelConfig) map[string][]*agentv1.ChainEntry {
	out := map[string][]*agentv1.ChainEntry{}
	seen := map[string]bool{}
	first := cfg.Agents[0].Name
	add := func(agent string, chain []ChainEntry, phase agentv1.PolicyPhase) {
		if agent == "" {
			agent = first
		}
		for _, e := range chain {
			p := &agentv1.Policy{Name: e.Policy, Metadata: e.Metadata, OnFailure: e.OnFailure, When: e.When}
			p.Cache = e.Cache.spec()
			k := agent + "\x00" + entryKey(p, phase)
			if seen[k] {
				continue
			}
			seen[k] = true
			out[agent] = append(out[agent], &agentv1.ChainEntry{Policy: p, Phase: phase})
		}
	}
	for _, rp := range cfg.RoutePolicies {
		add(rp.Agent, rp.RequestPolicyChain, agentv1.PolicyPhase_REQUEST)
		add(rp.Agent, rp.ResponsePolicyChain, agentv1.PolicyPhase_RESPONSE)
	}
	if d := cfg.DefaultPolicy; d != nil {
		add(d.Agent, d.RequestPolicyChain, agentv1.PolicyPhase_REQUEST)
		add(d.Agent, d.ResponsePolicyChain, agentv1.PolicyPhase_RESPONSE)
	}
	return out
}

// checkEntries asks every agent that was reached to build the entries cfg gives it, within
// timeout, in parallel, and keeps the answers on the agent for buildSnapshot. It returns, by
// agent name, why an agent could not be asked; the routes of such an agent stay unvalidated.
func checkEntries(cfg *KernelConfig, agents map[string]*agentState, timeout time.Duration) map[string]error {
	entries := entriesByAgent(cfg)
	var (
		mu   sync.Mutex
		errs = map[string]error{}
		wg   sync.WaitGroup
	)
	for name, a := range agents {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			if err := a.checkEntries(ctx, entries[name]); err != nil {
				mu.Lock()
				errs[name] = err
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return errs
}

// checkEntries asks the agent to build the entries it has no current verdict for. Verdicts
// are current for one policy set and agent config version; those of entries no longer in the
// config are dropped.
func (a *agentState) checkEntries(ctx context.Context, entries []*agentv1.ChainEntry) error {
	src := a.policySource()
	if src == nil {
		return nil // never reached: its routes are unvalidated anyway
	}
	cv := a.info.Load().GetConfigVersion()
	old := a.verdicts.Load()
	if !old.current(src, cv) {
		old = nil
	}
	if old != nil && old.unsupported {
		return nil
	}
	v := &entryVerdicts{source: src, configVersion: cv, byEntry: make(map[string]string, len(entries))}
	// Stored whatever happens: an entry left out is one the agent was not asked about.
	defer a.verdicts.Store(v)
	var (
		ask  []*agentv1.ChainEntry
		keys []string
	)
	for _, e := range entries {
		k := entryKey(e.GetPolicy(), e.GetPhase())
		if old != nil {
			if msg, ok := old.byEntry[k]; ok {
				v.byEntry[k] = msg
				if hs, ok := old.owned[k]; ok {
					if v.owned == nil {
						v.owned = map[string][]string{}
					}
					v.owned[k] = hs
				}
				if so, ok := old.static[k]; ok {
					if v.static == nil {
						v.static = map[string]*agentv1.StaticOutcome{}
					}
					v.static[k] = so
				}
				continue
			}
		}
		ask = append(ask, e)
		keys = append(keys, k)
	}
	if len(ask) == 0 {
		return nil
	}
	val, ok := a.client.(chainValidator)
	if !ok {
		v.unsupported = true
		return nil
	}
	vr, err := val.ValidateChains(ctx, ask)
	msgs, facts := vr.GetErrors(), vr.GetFacts()
	if status.Code(err) == codes.Unimplemented {
		v.unsupported, v.byEntry = true, nil
		return nil
	}
	if err != nil {
		return fmt.Errorf("agent %q could not build the chain entries: %w", a.cfg.Name, err)
	}
	if len(msgs) != len(ask) {
		return fmt.Errorf("agent %q answered %d verdicts for %d chain entries", a.cfg.Name, len(msgs), len(ask))
	}
	for i, msg := range msgs {
		v.byEntry[keys[i]] = msg
	}
	if len(facts) == len(ask) {
		for i, f := range facts {
			if hs := f.GetOwnedRequestHeaders(); len(hs) > 0 {
				if v.owned == nil {
					v.owned = map[string][]string{}
				}
				v.owned[keys[i]] = hs
			}
			if so := f.GetStaticOutcome(); so != nil && msgs[i] == "" {
				if v.static == nil {
					v.static = map[string]*agentv1.StaticOutcome{}
				}
				v.static[keys[i]] = so
			}
		}
	}
	return nil
}
