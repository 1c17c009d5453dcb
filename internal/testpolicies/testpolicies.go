// Package testpolicies holds policies that misbehave on purpose, for the fault and hostile-input
// suites: a policy that sleeps past any timeout (one of them deaf to its context), one that
// panics, one whose reply is too large or cannot be marshalled, one that returns a failing status
// without an error, one that tags both phases with a value of its chain entry, one that denies a
// body that holds a text, one that sets any header value. They are
// compiled into the test agent (internal/testpolicies/cmd/policy-testagent) and into test
// binaries only, never into policy-agent.
//
// The sleep policy counts what happened to each run in the process's default metric set, which
// the agent's /metrics serves, so that a test in another process can tell a cancelled chain
// from one that ran to its end, and a chain run once from one run twice.
package testpolicies

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/VictoriaMetrics/metrics"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// Policy names.
const (
	Sleep     = "testSleep"
	Tag       = "testTag"
	Panic     = "testPanic"
	HugeReply = "testHugeReply"
	BadUTF8   = "testBadUTF8"
	Echo      = "testEcho"
	Body      = "testBody"
	BodyDeny  = "testBodyDeny"
	SetHeader = "testSetHeader"
	// FailEnforcing enforces (it stands for an authentication policy) and fails on every
	// request, with an error: a broken authenticator at run time.
	FailEnforcing = "testFailEnforcing"
	DeafSleep     = "testDeafSleep"
	Status        = "testStatus"
)

// TagHeader is the header testTag sets, in the request phase on the request and in the
// response phase on the response.
const TagHeader = "x-test-tag"

// Counters of testSleep runs, by outcome.
var (
	SleepStarted   = metrics.NewCounter(`policy_testagent_sleep_total{outcome="started"}`)
	SleepCompleted = metrics.NewCounter(`policy_testagent_sleep_total{outcome="completed"}`)
	SleepCancelled = metrics.NewCounter(`policy_testagent_sleep_total{outcome="cancelled"}`)
)

func init() {
	register(Sleep, "Sleeps for sleep_ms, or until its context ends.", func(md map[string]string) (policy.Policy, error) {
		var s struct {
			SleepMS int `json:"sleep_ms"`
		}
		s.SleepMS = 1000
		if err := policy.DecodeMetadata(md, &s); err != nil {
			return nil, err
		}
		return sleeper(time.Duration(s.SleepMS) * time.Millisecond), nil
	})
	register(Tag, "Sets "+TagHeader+" to its tag, on the request or the response.", func(md map[string]string) (policy.Policy, error) {
		var s struct {
			Tag string `json:"tag" required:"true"`
		}
		if err := policy.DecodeMetadata(md, &s); err != nil {
			return nil, err
		}
		return tagger(s.Tag), nil
	})
	register(Panic, "Panics.", func(md map[string]string) (policy.Policy, error) {
		return panicker{}, policy.DecodeMetadata(md, &struct{}{})
	})
	register(HugeReply, "Sets a header of size bytes.", func(md map[string]string) (policy.Policy, error) {
		var s struct {
			Size int `json:"size" required:"true"`
		}
		if err := policy.DecodeMetadata(md, &s); err != nil {
			return nil, err
		}
		return huge(strings.Repeat("h", s.Size)), nil
	})
	register(BadUTF8, "Sets a header whose value is not UTF-8, so that its reply cannot be marshalled.", func(md map[string]string) (policy.Policy, error) {
		return badUTF8{}, policy.DecodeMetadata(md, &struct{}{})
	})
	register(Echo, "Copies the request header from into the request header to.", func(md map[string]string) (policy.Policy, error) {
		var s struct {
			From string `json:"from" required:"true"`
			To   string `json:"to" required:"true"`
		}
		if err := policy.DecodeMetadata(md, &s); err != nil {
			return nil, err
		}
		return echo{from: strings.ToLower(s.From), to: s.To}, nil
	})
	register(SetHeader, "Sets the header name to value; with deny_status, denies with that status and the header on the local reply.", func(md map[string]string) (policy.Policy, error) {
		var s struct {
			Name       string `json:"name" required:"true"`
			Value      string `json:"value"`
			DenyStatus int    `json:"deny_status"`
		}
		if err := policy.DecodeMetadata(md, &s); err != nil {
			return nil, err
		}
		return setHeader{name: s.Name, value: s.Value, deny: s.DenyStatus}, nil
	})
	register(DeafSleep, "Sleeps for sleep_ms whatever its context says, then allows, or denies (403) when deny is true.", func(md map[string]string) (policy.Policy, error) {
		var s struct {
			SleepMS int  `json:"sleep_ms" required:"true"`
			Deny    bool `json:"deny"`
		}
		if err := policy.DecodeMetadata(md, &s); err != nil {
			return nil, err
		}
		return deafSleeper{d: time.Duration(s.SleepMS) * time.Millisecond, deny: s.Deny}, nil
	})
	register(Status, "Returns status (a StatusCode name or number) with no error and no instruction.", func(md map[string]string) (policy.Policy, error) {
		var s struct {
			Status string `json:"status" required:"true"`
		}
		if err := policy.DecodeMetadata(md, &s); err != nil {
			return nil, err
		}
		code, ok := agentv1.StatusCode_value[s.Status]
		if !ok {
			n, err := strconv.ParseInt(s.Status, 10, 32)
			if err != nil {
				return nil, fmt.Errorf("status: %q is neither a status name nor a number", s.Status)
			}
			code = int32(n)
		}
		return statusPolicy(code), nil
	})
	m := module(Body, "Reads the body of its phase and sets x-test-body-length to its length.", func(md map[string]string) (policy.Policy, error) {
		return bodyLength{}, policy.DecodeMetadata(md, &struct{}{})
	})
	m.RequestBody, m.ResponseBody = true, true
	policy.Register(m)
	m = module(BodyDeny, "Reads the body of its phase and denies it with 403 when it contains deny; changes nothing else.", func(md map[string]string) (policy.Policy, error) {
		var s struct {
			Deny string `json:"deny" required:"true"`
		}
		if err := policy.DecodeMetadata(md, &s); err != nil {
			return nil, err
		}
		return bodyDeny(s.Deny), nil
	})
	m.RequestBody, m.ResponseBody = true, true
	policy.Register(m)
	m = module(FailEnforcing, "Enforces, and fails every request with an error, as a broken authenticator would.", func(md map[string]string) (policy.Policy, error) {
		return failing{}, policy.DecodeMetadata(md, &struct{}{})
	})
	m.Enforces = true
	policy.Register(m)
}

func register(name, description string, build policy.FactoryFunc) {
	policy.Register(module(name, description, build))
}

func module(name, description string, build policy.FactoryFunc) policy.Module {
	return policy.Module{
		Name:        name,
		Version:     "test",
		Description: description,
		Phases:      policy.Both,
		New:         func(policy.Config) (policy.Factory, error) { return build, nil },
	}
}

type sleeper time.Duration

func (d sleeper) Execute(ctx context.Context, _ *policy.Context) (policy.Result, error) {
	SleepStarted.Inc()
	t := time.NewTimer(time.Duration(d))
	defer t.Stop()
	select {
	case <-t.C:
		SleepCompleted.Inc()
		return policy.Allow(), nil
	case <-ctx.Done():
		SleepCancelled.Inc()
		return policy.Result{}, ctx.Err()
	}
}

// deafSleeper is a policy that ignores its context: it returns only when its time is up, long
// after the chain's deadline if need be.
type deafSleeper struct {
	d    time.Duration
	deny bool
}

func (s deafSleeper) Execute(context.Context, *policy.Context) (policy.Result, error) {
	time.Sleep(s.d)
	if s.deny {
		return policy.Deny(403, "forbidden", "testDeafSleep denies", nil), nil
	}
	return policy.Allow(), nil
}

// statusPolicy returns a status and nothing else: no error, no instruction.
type statusPolicy agentv1.StatusCode

func (s statusPolicy) Execute(context.Context, *policy.Context) (policy.Result, error) {
	return policy.Result{Status: agentv1.StatusCode(s), Message: "testStatus returns " + agentv1.StatusCode(s).String()}, nil
}

type tagger string

func (t tagger) Execute(_ context.Context, c *policy.Context) (policy.Result, error) {
	return policy.Allow(policy.SetHeader(TagHeader, string(t))), nil
}

type failing struct{}

func (failing) Execute(context.Context, *policy.Context) (policy.Result, error) {
	return policy.Result{}, errors.New("testFailEnforcing fails on purpose")
}

type panicker struct{}

func (panicker) Execute(context.Context, *policy.Context) (policy.Result, error) {
	panic("testPanic panics on purpose")
}

type huge string

func (h huge) Execute(context.Context, *policy.Context) (policy.Result, error) {
	return policy.Allow(policy.SetHeader("x-test-huge", string(h))), nil
}

type badUTF8 struct{}

func (badUTF8) Execute(context.Context, *policy.Context) (policy.Result, error) {
	return policy.Allow(policy.SetHeader("x-test-bad", "\xff\xfe")), nil
}

type echo struct{ from, to string }

func (e echo) Execute(_ context.Context, c *policy.Context) (policy.Result, error) {
	v, ok := c.Headers[e.from]
	if !ok {
		return policy.Allow(), nil
	}
	return policy.Allow(policy.SetHeader(e.to, v)), nil
}

// setHeader sets any value, unchecked: the kernel must keep what Envoy would refuse from it.
type setHeader struct {
	name, value string
	deny        int
}

func (p setHeader) Execute(context.Context, *policy.Context) (policy.Result, error) {
	if p.deny != 0 {
		return policy.Deny(p.deny, "denied", "denied by testSetHeader", map[string]string{p.name: p.value, "x-test-ok": "ok"}), nil
	}
	return policy.Allow(policy.SetHeader(p.name, p.value)), nil
}

type bodyLength struct{}

func (bodyLength) Execute(_ context.Context, c *policy.Context) (policy.Result, error) {
	body := c.Body
	if c.Response != nil {
		body = c.Response.Body
	}
	return policy.Allow(policy.SetHeader("x-test-body-length", strconv.Itoa(len(body)))), nil
}

// bodyDeny denies a body that holds its text. It sets no header, so that it can judge a body
// that arrives after Envoy has sent the headers on (STREAMED).
type bodyDeny string

func (d bodyDeny) Execute(_ context.Context, c *policy.Context) (policy.Result, error) {
	body := c.Body
	if c.Response != nil {
		body = c.Response.Body
	}
	if strings.Contains(string(body), string(d)) {
		return policy.Deny(403, "forbidden", "the body holds a forbidden text", nil), nil
	}
	return policy.Allow(), nil
}

var (
	_ policy.Policy = failing{}
	_ policy.Policy = bodyDeny("")
	_ policy.Policy = bodyLength{}
	_ policy.Policy = sleeper(0)
	_ policy.Policy = tagger("")
	_ policy.Policy = panicker{}
	_ policy.Policy = huge("")
	_ policy.Policy = badUTF8{}
	_ policy.Policy = echo{}
	_ policy.Policy = setHeader{}
	_ policy.Policy = deafSleeper{}
	_ policy.Policy = statusPolicy(0)
)
