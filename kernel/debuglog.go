package kernel

import (
	"errors"
	"strings"
	"time"

	"github.com/rs/zerolog"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
)

// The lines an operator turns on with log_level: debug, and the throttled lines about retries
// and requests without a route. Every call site checks the level first (one atomic load), so
// that at info these cost nothing more.

// Throttles of the kernel's lines that a client can cause on every request.
var (
	// unroutedLog: a request that fell back to default_policy, or matched no route at all.
	unroutedLog = logging.NewThrottle(5 * time.Second)
	// retryLog: an agent call retried because it never reached the agent.
	retryLog = logging.NewThrottle(5 * time.Second)
)

// logRoute writes, at debug, which route a request got and how: by Envoy's route name, by
// path prefix, by falling back to default_policy, or none (then it goes on without policy).
// The fallback and "none" lines are throttled: they are what unknown traffic causes.
func (s *Server) logRoute(st *stream, routeName string, route *Route) {
	ev := s.log.Debug()
	if ev == nil {
		return
	}
	via := "path"
	switch {
	case route == nil:
		via = "none"
	case route == st.snap.defaultRoute:
		via = "default_policy"
	case routeName != "" && route.Name == routeName:
		via = "xds.route_name"
	}
	if (via == "none" || via == "default_policy") && !unroutedLog.Allow() {
		return
	}
	ev = ev.Str("request_id", st.requestID).Str("via", via).Str("path", pathOnly(st.reqCtx.GetPath()))
	if routeName != "" {
		ev = ev.Str("route_name", routeName)
	}
	if route == nil {
		ev.Msg("no route and no default_policy: the request goes on without policy (logged at most once every 5 s)")
		return
	}
	if via == "default_policy" {
		ev.Str("route", route.Name).Msg("no route matched: default_policy applies (logged at most once every 5 s)")
		return
	}
	ev.Str("route", route.Name).Str("agent", route.agent.cfg.Name).Msg("route picked")
}

// pathOnly drops the query string, which may carry credentials (?api_key=, ?token=).
func pathOnly(p string) string {
	if i := strings.IndexByte(p, '?'); i >= 0 {
		return p[:i]
	}
	return p
}

// logCall writes, at debug, how an agent call ended: its status and policy, or its error, and
// how long the kernel waited. The agent's message is left out: it may quote what a policy
// refused.
func (s *Server) logCall(st *stream, agent *agentState, phase agentv1.PolicyPhase, resp *agentv1.PolicyResponse, err error, start time.Time) {
	ev := s.log.Debug()
	if ev == nil {
		return
	}
	ev = ev.Str("request_id", st.requestID).Str("route", st.route.Name).Str("agent", agent.cfg.Name).
		Str("phase", strings.ToLower(phase.String())).Dur("duration", time.Since(start))
	if err != nil {
		ev.Err(err).Msg("agent call failed")
		return
	}
	ev = ev.Str("status", resp.GetStatus().GetCode().String()).Int("instructions", len(resp.GetInstructions()))
	if p := resp.GetStatus().GetPolicyName(); p != "" {
		ev = ev.Str("policy", p)
	}
	ev.Msg("agent call answered")
}

// logRetry writes a throttled info line when an agent call is retried because it never
// reached the agent.
func (s *Server) logRetry(agent *agentState, attempt int, backoff time.Duration, err error) {
	if !s.log.Enabled(zerolog.InfoLevel) || !retryLog.Allow() {
		return
	}
	s.log.Info().Str("agent", agent.cfg.Name).Int("attempt", attempt).Int("max_attempts", agent.cfg.Retry.MaxAttempts).
		Dur("backoff", backoff).Bool("not_delivered", errors.Is(err, ErrNotDelivered)).Err(err).
		Msg("agent call did not reach the agent; retrying (logged at most once every 5 s)")
}
