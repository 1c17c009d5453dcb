package testpolicies

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

func build(t *testing.T, name string, md map[string]string) policy.Policy {
	t.Helper()
	m, ok := policy.Lookup(name)
	if !ok {
		t.Fatalf("%s not registered", name)
	}
	f, err := m.New(policy.Config{})
	if err != nil {
		t.Fatal(err)
	}
	p, err := f.Build(md)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return p
}

func header(t *testing.T, r policy.Result) (string, string) {
	t.Helper()
	if len(r.Instructions) != 1 || r.Instructions[0].GetType() != agentv1.InstructionType_SET_HEADER {
		t.Fatalf("result %v", r)
	}
	h := r.Instructions[0].GetHeader()
	return h.GetKey(), h.GetValue()
}

func TestPolicies(t *testing.T) {
	ctx := context.Background()
	c := &policy.Context{Headers: map[string]string{"x-in": "v"}, Body: []byte("abc")}

	r, err := build(t, Tag, map[string]string{"tag": "v7"}).Execute(ctx, c)
	if k, v := header(t, r); err != nil || k != TagHeader || v != "v7" {
		t.Fatalf("tag: %s=%s %v", k, v, err)
	}
	r, _ = build(t, Echo, map[string]string{"from": "X-In", "to": "x-out"}).Execute(ctx, c)
	if k, v := header(t, r); k != "x-out" || v != "v" {
		t.Fatalf("echo: %s=%s", k, v)
	}
	if r, _ := build(t, Echo, map[string]string{"from": "x-none", "to": "x-out"}).Execute(ctx, c); len(r.Instructions) != 0 {
		t.Fatalf("echo of a missing header: %v", r)
	}
	r, _ = build(t, HugeReply, map[string]string{"size": "1000"}).Execute(ctx, c)
	if _, v := header(t, r); len(v) != 1000 {
		t.Fatalf("huge: %d bytes", len(v))
	}
	r, _ = build(t, BadUTF8, nil).Execute(ctx, c)
	if _, v := header(t, r); !strings.Contains(v, "\xff") {
		t.Fatalf("bad UTF-8: %q", v)
	}
	r, _ = build(t, SetHeader, map[string]string{"name": "x-ctl", "value": "a\x01b"}).Execute(ctx, c)
	if k, v := header(t, r); k != "x-ctl" || v != "a\x01b" {
		t.Fatalf("set header: %s=%q", k, v)
	}
	r, _ = build(t, SetHeader, map[string]string{"name": "x-ctl", "value": "a\x7fb", "deny_status": "403"}).Execute(ctx, c)
	if len(r.Instructions) != 1 || r.Instructions[0].GetImmediateResponse().GetStatusCode() != 403 ||
		r.Instructions[0].GetImmediateResponse().GetHeaders()["x-ctl"] != "a\x7fb" {
		t.Fatalf("set header on a denial: %v", r)
	}
	body := build(t, Body, nil)
	r, _ = body.Execute(ctx, c)
	if _, v := header(t, r); v != "3" {
		t.Fatalf("request body length %s", v)
	}
	r, _ = body.Execute(ctx, &policy.Context{Response: &policy.ResponseContext{Body: []byte("abcdef")}})
	if _, v := header(t, r); v != "6" {
		t.Fatalf("response body length %s", v)
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Fatal("testPanic did not panic")
			}
		}()
		build(t, Panic, nil).Execute(ctx, c)
	}()
}

func TestSleepCountsOutcomes(t *testing.T) {
	started, done, cancelled := SleepStarted.Get(), SleepCompleted.Get(), SleepCancelled.Get()
	if _, err := build(t, Sleep, map[string]string{"sleep_ms": "1"}).Execute(context.Background(), &policy.Context{}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if _, err := build(t, Sleep, nil).Execute(ctx, &policy.Context{}); err == nil {
		t.Fatal("a cancelled sleep must fail")
	}
	if SleepStarted.Get()-started != 2 || SleepCompleted.Get()-done != 1 || SleepCancelled.Get()-cancelled != 1 {
		t.Fatalf("counts: started %d, completed %d, cancelled %d", SleepStarted.Get()-started, SleepCompleted.Get()-done, SleepCancelled.Get()-cancelled)
	}
}

func TestMetadataErrors(t *testing.T) {
	for name, md := range map[string]map[string]string{
		Sleep:     {"sleep_ms": "soon"},
		Tag:       {},
		Panic:     {"x": "1"},
		HugeReply: {},
		BadUTF8:   {"x": "1"},
		Echo:      {"from": "a"},
		Body:      {"x": "1"},
		DeafSleep: {},
		Status:    {"status": "SOMETIMES"},
	} {
		m, _ := policy.Lookup(name)
		f, _ := m.New(policy.Config{})
		if _, err := f.Build(md); err == nil {
			t.Errorf("%s accepted %v", name, md)
		}
	}
}

func TestStatusAndDeafSleep(t *testing.T) {
	f := func(status string, want agentv1.StatusCode) {
		t.Helper()
		r, err := build(t, Status, map[string]string{"status": status}).Execute(context.Background(), &policy.Context{})
		if err != nil || r.Status != want || len(r.Instructions) != 0 {
			t.Fatalf("status %s: %v %v, want %v and no error", status, r, err, want)
		}
	}
	f("POLICY_ERROR", agentv1.StatusCode_POLICY_ERROR)
	f("TIMEOUT", agentv1.StatusCode_TIMEOUT)
	f("7", agentv1.StatusCode(7))

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	start := time.Now()
	r, err := build(t, DeafSleep, map[string]string{"sleep_ms": "20"}).Execute(ctx, &policy.Context{})
	if err != nil || r.Status != agentv1.StatusCode_OK || time.Since(start) < 20*time.Millisecond {
		t.Fatalf("deaf sleep with a cancelled context: %v %v after %v, want OK after 20ms", r, err, time.Since(start))
	}
	r, err = build(t, DeafSleep, map[string]string{"sleep_ms": "1", "deny": "true"}).Execute(ctx, &policy.Context{})
	if err != nil || r.Status != agentv1.StatusCode_POLICY_DENIED {
		t.Fatalf("deaf sleep with deny: %v %v", r, err)
	}
}
