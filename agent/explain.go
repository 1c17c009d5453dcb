package agent

import (
	"context"
	"errors"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/yamlconf"
)

// EntryTrace is what one chain entry did in one run, for policyctl explain.
type EntryTrace struct {
	Phase agentv1.PolicyPhase
	// Index is the entry's position in the policies of the call (a chain the kernel splits
	// around a body reader comes in two calls).
	Index  int
	Policy string
	// Outcome is allow, deny, error, timeout, skipped (after a skip_remaining) or shadow (ran,
	// nothing enforced).
	Outcome   string
	OnFailure string
	Duration  time.Duration
	// Instructions are the entry's instructions: header, body and state changes, or its
	// immediate response. Those of a shadow entry are dropped by the chain.
	Instructions []*agentv1.Instruction
	Message      string
	Err          error
}

// SetEntryHook makes the executor tell h the outcome of every chain entry it runs, on the
// goroutine that runs the chain. Call it before the executor runs any chain; nil turns it off.
// It is for tools that explain one request (policyctl explain), not for a serving agent.
func (e *Executor) SetEntryHook(h func(EntryTrace)) { e.entryHook = h }

// traceEntry reports one entry to the hook, and appends it to resp.Entries when the request
// asks for its entries (PolicyRequest.explain); outcome "" is worked out from the result.
func (e *Executor) traceEntry(req *agentv1.PolicyRequest, resp *agentv1.PolicyResponse, i int, outcome string, d time.Duration, r policy.Result, err error) {
	entry := req.GetPolicies()[i]
	if outcome == "" {
		switch {
		case errors.Is(err, context.DeadlineExceeded) || r.Status == agentv1.StatusCode_TIMEOUT:
			outcome = "timeout"
		case err != nil:
			outcome = "error"
		case terminal(r):
			outcome = "deny"
		default:
			outcome = "allow"
		}
	}
	if req.GetExplain() {
		t := &agentv1.EntryTrace{Index: uint32(i), Policy: entry.GetName(), Outcome: outcome, OnFailure: entry.GetOnFailure(),
			DurationNs: d.Nanoseconds(), Instructions: r.Instructions, Message: r.Message}
		if err != nil {
			t.Error = err.Error()
		}
		resp.Entries = append(resp.Entries, t)
	}
	if e.entryHook != nil {
		e.entryHook(EntryTrace{Phase: req.GetPhase(), Index: i, Policy: entry.GetName(), Outcome: outcome, OnFailure: entry.GetOnFailure(),
			Duration: d, Instructions: r.Instructions, Message: r.Message, Err: err})
	}
}

// TraceOf turns an entry trace of a PolicyResponse back into the hook's form.
func TraceOf(phase agentv1.PolicyPhase, t *agentv1.EntryTrace) EntryTrace {
	out := EntryTrace{Phase: phase, Index: int(t.GetIndex()), Policy: t.GetPolicy(), Outcome: t.GetOutcome(), OnFailure: t.GetOnFailure(),
		Duration: time.Duration(t.GetDurationNs()), Instructions: t.GetInstructions(), Message: t.GetMessage()}
	if t.GetError() != "" {
		out.Err = errors.New(t.GetError())
	}
	return out
}

// LoadOffline loads the agent config at path as the agent does at start (secret references
// resolved, the policies' settings checked) into an executor that serves nothing, for tools
// that run the agent's policies in their own process (policyctl explain and validate). It
// returns the executor and the agent's name (agent_core.name); a problem names its file:line
// as policy-agent --validate does.
func LoadOffline(path string, log *logging.Logger) (*Executor, string, error) {
	cfg, in, _, err := loadInputs(path)
	if err != nil {
		return nil, "", placeSettingErrors(path, err)
	}
	exec := NewExecutor(log)
	if err := exec.Load(cfg.AgentCore, configVersion(cfg.AgentCore.Version, in.data)); err != nil {
		exec.Close()
		return nil, "", locate(path, in.data, err)
	}
	return exec, cfg.AgentCore.Name, nil
}

// settingErr is a problem of a policy's settings found before the policy saw them (a secret
// reference that cannot be resolved), as resolveSecrets words it after the file's name.
var settingErr = regexp.MustCompile(`^(agent_core\.policies\.config\.[A-Za-z0-9_]+): (.*)$`)

// placeSettingErrors gives such problems the line of the setting they name, as locate does
// for the policies' own refusals; others are left as they are.
func placeSettingErrors(path string, err error) error {
	data, rerr := os.ReadFile(path)
	if rerr != nil {
		return err
	}
	doc, derr := yamlconf.ParseDoc(path, data)
	if derr != nil {
		return err
	}
	var out []error
	for _, e := range unjoin(err) {
		m := settingErr.FindStringSubmatch(strings.TrimPrefix(e.Error(), path+": "))
		if m == nil {
			out = append(out, e)
			continue
		}
		where := m[1]
		if k := leadingKey.FindStringSubmatch(m[2]); k != nil {
			where += "." + k[1]
		}
		out = append(out, &yamlconf.Error{File: path, Line: doc.Line(where), Key: m[1], Msg: m[2]})
	}
	return errors.Join(out...)
}
