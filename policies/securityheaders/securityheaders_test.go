package securityheaders

import (
	"context"
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/agent/policy"
)

func headersOf(r policy.Result) map[string]string {
	out := map[string]string{}
	for _, in := range r.Instructions {
		out[in.GetHeader().GetKey()] = in.GetHeader().GetValue()
	}
	return out
}

func TestSetsHeaders(t *testing.T) {
	p, err := build(map[string]string{"headers": `{"X-Frame-Options":"DENY","Strict-Transport-Security":"max-age=63072000"}`})
	if err != nil {
		t.Fatal(err)
	}
	r, _ := p.Execute(context.Background(), &policy.Context{Response: &policy.ResponseContext{Headers: map[string]string{"x-frame-options": "SAMEORIGIN"}}})
	h := headersOf(r)
	if len(h) != 2 || h["x-frame-options"] != "DENY" || h["strict-transport-security"] != "max-age=63072000" {
		t.Fatalf("%v", h)
	}
}

func TestDefaultsAndNoOverwrite(t *testing.T) {
	p, err := build(map[string]string{"overwrite": "false"})
	if err != nil {
		t.Fatal(err)
	}
	r, _ := p.Execute(context.Background(), &policy.Context{Response: &policy.ResponseContext{Headers: map[string]string{"x-frame-options": "SAMEORIGIN"}}})
	h := headersOf(r)
	if _, set := h["x-frame-options"]; set || h["x-content-type-options"] != "nosniff" || h["referrer-policy"] != "no-referrer" {
		t.Fatalf("%v", h)
	}
	// Without a response context every header is set.
	r, _ = p.Execute(context.Background(), &policy.Context{})
	if len(headersOf(r)) != len(DefaultHeaders) {
		t.Fatalf("%v", headersOf(r))
	}
}

func TestInvalidMetadata(t *testing.T) {
	for md, want := range map[string]string{
		`{"bad name":"v"}`: "invalid header name",
		`{"x-a":"v\r\n"}`:  "invalid header value",
		`["x"]`:            "invalid JSON",
	} {
		if _, err := build(map[string]string{"headers": md}); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v", md, err)
		}
	}
	if _, err := build(map[string]string{"nope": "1"}); err == nil {
		t.Fatal("unknown key accepted")
	}
	m, ok := policy.Lookup(Name)
	if !ok || m.Phases != policy.Response {
		t.Fatal("not registered for the response phase")
	}
	f, err := m.New(policy.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Build(nil); err != nil {
		t.Fatal(err)
	}
}
