package apikeyauth

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
)

func sha(s string) string { d := sha256.Sum256([]byte(s)); return hex.EncodeToString(d[:]) }

func factory(t *testing.T, raw string) policy.Factory {
	t.Helper()
	f, err := New(policy.Config{Raw: []byte(raw)})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func build(t *testing.T, f policy.Factory, md map[string]string) policy.Policy {
	t.Helper()
	p, err := f.Build(md)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func run(t *testing.T, p policy.Policy, headers map[string]string) policy.Result {
	t.Helper()
	r, err := p.Execute(context.Background(), &policy.Context{Headers: headers})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func immediate(r policy.Result) *agentv1.ImmediateResponse {
	for _, in := range r.Instructions {
		if ir := in.GetImmediateResponse(); ir != nil {
			return ir
		}
	}
	return nil
}

func TestKeys(t *testing.T) {
	t.Setenv("APIKEY_TEST_ENV", "from-env")
	f := factory(t, `{"keys":[
		{"key_sha256":"`+sha("hashed-key")+`","user_id":"u-hash"},
		{"key_env":"APIKEY_TEST_ENV","user_id":"u-env"},
		{"key":"plain-key","user_id":"u-plain"}]}`)
	p := build(t, f, nil)
	for key, user := range map[string]string{"hashed-key": "u-hash", "from-env": "u-env", "plain-key": "u-plain"} {
		r := run(t, p, map[string]string{"x-api-key": key})
		if r.Status != agentv1.StatusCode_OK {
			t.Fatalf("%s: %v", key, r)
		}
		got := map[string]string{}
		for _, in := range r.Instructions {
			if h := in.GetHeader(); h != nil {
				got["h:"+h.GetKey()] = h.GetValue()
			}
			if s := in.GetState(); s != nil {
				got["s:"+s.GetKey()] = s.GetValue()
			}
		}
		if got["h:x-user-id"] != user || got["s:user_id"] != user || got["s:auth_method"] != "api_key" || r.Metadata["auth_method"] != "api_key" {
			t.Fatalf("%s: %v", key, got)
		}
	}
}

func TestDenials(t *testing.T) {
	p := build(t, factory(t, `{"keys":[{"key":"k","user_id":"u"}]}`), map[string]string{"header_name": "X-Key"})
	r := run(t, p, map[string]string{})
	ir := immediate(r)
	if r.Status != agentv1.StatusCode_POLICY_DENIED || ir.GetStatusCode() != 401 || ir.GetHeaders()["www-authenticate"] != "API-Key" {
		t.Fatalf("missing: %v", r)
	}
	r = run(t, p, map[string]string{"x-key": "guess-k"})
	ir = immediate(r)
	if ir.GetStatusCode() != 403 || strings.Contains(string(ir.GetBody()), "guess-k") || strings.Contains(r.Message, "guess-k") {
		t.Fatalf("wrong: %v", r)
	}
	// The default header is not read when another is configured.
	if r := run(t, p, map[string]string{"x-api-key": "k"}); immediate(r).GetStatusCode() != 401 {
		t.Fatalf("%v", r)
	}
	// Not required: a request without a key passes unauthenticated, a wrong key still fails.
	opt := build(t, factory(t, `{"keys":[{"key":"k","user_id":"u"}]}`), map[string]string{"required": "false"})
	if r := run(t, opt, nil); r.Status != agentv1.StatusCode_OK || len(r.Instructions) != 0 {
		t.Fatalf("optional: %v", r)
	}
	if r := run(t, opt, map[string]string{"x-api-key": "bad"}); immediate(r).GetStatusCode() != 403 {
		t.Fatalf("optional wrong key: %v", r)
	}
	// No keys configured: every key is wrong.
	if r := run(t, build(t, factory(t, ``), nil), map[string]string{"x-api-key": "k"}); immediate(r).GetStatusCode() != 403 {
		t.Fatalf("no keys: %v", r)
	}
}

func TestRemoveKeyHeaderAndUserHeader(t *testing.T) {
	p := build(t, factory(t, `{"keys":[{"key":"k","user_id":"u"}]}`), map[string]string{"remove_key_header": "true", "user_id_header": "X-Principal"})
	r := run(t, p, map[string]string{"x-api-key": "k"})
	var removed, principal bool
	for _, in := range r.Instructions {
		removed = removed || (in.GetType() == agentv1.InstructionType_REMOVE_HEADER && in.GetHeader().GetKey() == "x-api-key")
		principal = principal || (in.GetType() == agentv1.InstructionType_SET_HEADER && in.GetHeader().GetKey() == "x-principal")
	}
	if !removed || !principal {
		t.Fatalf("%v", r.Instructions)
	}
}

func TestConfigErrors(t *testing.T) {
	t.Setenv("APIKEY_EMPTY", "")
	f := func(raw, want string) {
		t.Helper()
		_, err := New(policy.Config{Raw: []byte(raw)})
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("New(%s) = %v, want %q", raw, err, want)
		}
	}
	f(`{"keys":[{"user_id":"u"}]}`, "keys[0]: exactly one of key_sha256, key_env and key must be set")
	f(`{"keys":[{"key":"a","key_env":"B","user_id":"u"}]}`, "exactly one of")
	f(`{"keys":[{"key_sha256":"abc","user_id":"u"}]}`, "keys[0]: key_sha256 must be 64 lowercase hex digits")
	f(`{"keys":[{"key_sha256":"`+strings.ToUpper(sha("x"))+`","user_id":"u"}]}`, "64 lowercase hex digits")
	f(`{"keys":[{"key_env":"APIKEY_NOT_SET_ANYWHERE","user_id":"u"}]}`, `key_env: environment variable "APIKEY_NOT_SET_ANYWHERE" is not set`)
	f(`{"keys":[{"key_env":"APIKEY_EMPTY","user_id":"u"}]}`, `is not set`)
	f(`{"keys":[{"key":"k"}]}`, "keys[0]: user_id is required")
	f(`{"keys":[{"key":"k","user_id":"a\nb"}]}`, "keys[0]: user_id: invalid header value")
	f(`{"keys":[{"key":"k","user_id":"u","extra":1}]}`, `unknown field "extra"`)
	f(`{"keys":[{"key":"k","user_id":"u"}],"k2":[]}`, `unknown field "k2"`)
}

func TestMetadataErrors(t *testing.T) {
	fac := factory(t, `{}`)
	for md, want := range map[string]string{
		`header_name=`:             "header_name: invalid header name",
		`header_name=:path`:        "header_name: invalid header name",
		`header_name=bad name`:     "header_name: invalid header name",
		`user_id_header=host`:      `user_id_header: "host" cannot be set`,
		`user_id_header=x-envoy-a`: "cannot be set",
		`user_id_header=X-API-Key`: `user_id_header: "X-API-Key" is the key header`,
		`user_id_header=x_api_key`: `user_id_header: "x_api_key" is the key header`,
		`required=maybe`:           "want true or false",
		`bogus=1`:                  `metadata key "bogus": unknown key`,
	} {
		k, v, _ := strings.Cut(md, "=")
		if _, err := fac.Build(map[string]string{k: v}); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", md, err, want)
		}
	}
}

// TestOwnedRequestHeaders checks that the user id header is declared, so that the agent strips
// a client's own value on every request, also without a key.
func TestOwnedRequestHeaders(t *testing.T) {
	fac := factory(t, `{}`)
	f := func(md map[string]string, want string) {
		t.Helper()
		p := build(t, fac, md).(policy.HeaderOwner)
		if got := p.OwnedRequestHeaders(); len(got) != 1 || got[0] != want {
			t.Errorf("OwnedRequestHeaders() with %v = %q, want [%q]", md, got, want)
		}
	}
	f(nil, "x-user-id")
	f(map[string]string{"user_id_header": "X-Principal", "required": "false"}, "x-principal")
}

func TestRegistered(t *testing.T) {
	m, ok := policy.Lookup(Name)
	if !ok || m.Phases != policy.Request || m.MetadataSchema == "" || m.RequestBody {
		t.Fatalf("%+v", m)
	}
}

func BenchmarkAPIKeyAuth(b *testing.B) {
	f, _ := New(policy.Config{Raw: []byte(`{"keys":[{"key":"k1","user_id":"u1"},{"key":"k2","user_id":"u2"},{"key":"k3","user_id":"u3"}]}`)})
	p, _ := f.Build(nil)
	c := &policy.Context{Headers: map[string]string{"x-api-key": "k2"}}
	b.ReportAllocs()
	for b.Loop() {
		if r, _ := p.Execute(context.Background(), c); r.Status != agentv1.StatusCode_OK {
			b.Fatal(r)
		}
	}
}

// TestPlaintextKeyWarning: keys written in clear in the config file are named in one warning by
// their index, never by value; secret references, digests and key_env are not, and
// allow_plaintext_keys silences it.
func TestPlaintextKeyWarning(t *testing.T) {
	t.Setenv("APIKEY_WARN_TEST", "env-key")
	f := func(written, resolved, want string) {
		t.Helper()
		logs := &strings.Builder{}
		c := policy.Config{Raw: []byte(resolved), Log: logging.New(logs, "agent", zerolog.InfoLevel)}
		if written != resolved {
			c.Unresolved = []byte(written)
		}
		if _, err := New(c); err != nil {
			t.Fatal(err)
		}
		got := logs.String()
		if want == "" {
			if got != "" {
				t.Fatalf("%s: unexpected log %s", written, got)
			}
			return
		}
		if !strings.Contains(got, `"keys":"`+want+`"`) || !strings.Contains(got, `"level":"warn"`) || !strings.Contains(got, "allow_plaintext_keys") {
			t.Fatalf("%s: log %s, want keys %q", written, got, want)
		}
		if strings.Contains(got, "CLEAR-SECRET") {
			t.Fatalf("the warning holds a key: %s", got)
		}
	}
	clear := `{"keys":[{"key":"CLEAR-SECRET-1","user_id":"a"},{"key_sha256":"` + sha("x") + `","user_id":"b"},{"key":"CLEAR-SECRET-2","user_id":"c"}]}`
	f(clear, clear, "keys[0], keys[2]")
	f(`{"keys":[{"key":"$${CLEAR-SECRET}","user_id":"a"}]}`, `{"keys":[{"key":"${CLEAR-SECRET}","user_id":"a"}]}`, "keys[0]")
	f(`{"keys":[{"key":"${file:/run/secrets/k}","user_id":"a"},{"key":"${env:K}","user_id":"b"}]}`,
		`{"keys":[{"key":"CLEAR-SECRET-F","user_id":"a"},{"key":"CLEAR-SECRET-E","user_id":"b"}]}`, "")
	f(`{"keys":[{"key_env":"APIKEY_WARN_TEST","user_id":"a"}]}`, `{"keys":[{"key_env":"APIKEY_WARN_TEST","user_id":"a"}]}`, "")
	optIn := `{"allow_plaintext_keys":true,"keys":[{"key":"CLEAR-SECRET-1","user_id":"a"}]}`
	f(optIn, optIn, "")
	f(`{}`, `{}`, "")
}

// TestCredentialNames: the key header, default or configured, is named for the audit log.
func TestCredentialNames(t *testing.T) {
	fac := factory(t, `{}`)
	for md, want := range map[string]string{"": "x-api-key", "X-Partner": "x-partner"} {
		var meta map[string]string
		if md != "" {
			meta = map[string]string{"header_name": md}
		}
		if got := build(t, fac, meta).(policy.CredentialReader).CredentialNames().Headers; len(got) != 1 || got[0] != want {
			t.Errorf("header_name %q: credential names %v, want [%s]", md, got, want)
		}
	}
}
