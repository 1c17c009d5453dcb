package jwtvalidation

import (
	"context"
	"crypto/hmac"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// TestAllowEachAlgorithm validates tokens of every supported public-key algorithm from a PEM
// key and from a JWK Set file, and checks the headers and state a valid token yields.
func TestAllowEachAlgorithm(t *testing.T) {
	testKeys(t)
	dir := t.TempDir()
	cases := []struct {
		method jwt.SigningMethod
		priv   any
		pub    any
	}{
		{jwt.SigningMethodRS256, rsaA, &rsaA.PublicKey},
		{jwt.SigningMethodRS384, rsaA, &rsaA.PublicKey},
		{jwt.SigningMethodRS512, rsaA, &rsaA.PublicKey},
		{jwt.SigningMethodPS256, rsaA, &rsaA.PublicKey},
		{jwt.SigningMethodPS384, rsaA, &rsaA.PublicKey},
		{jwt.SigningMethodPS512, rsaA, &rsaA.PublicKey},
		{jwt.SigningMethodES256, ecP256, &ecP256.PublicKey},
		{jwt.SigningMethodES384, ecP384, &ecP384.PublicKey},
		{jwt.SigningMethodES512, ecP521, &ecP521.PublicKey},
		{jwt.SigningMethodEdDSA, edKey, edKey.Public()},
	}
	f := newFactory(t, "", nil, func() time.Time { return fixedNow })
	for _, c := range cases {
		alg := c.method.Alg()
		file := filepath.Join(dir, alg+".json")
		if err := os.WriteFile(file, jwksJSON(t, jwkOf("k-"+alg, c.pub)), 0o600); err != nil {
			t.Fatal(err)
		}
		algs, _ := json.Marshal([]string{alg})
		for source, md := range map[string]map[string]string{
			"pem":  {"public_key_pem": pemOf(t, c.pub)},
			"jwks": {"jwks_file": file},
		} {
			t.Run(alg+"/"+source, func(t *testing.T) {
				md = maps.Clone(md)
				md["issuer"] = testIssuer
				md["audience"] = testAudience
				md["algorithms"] = string(algs)
				md["claims_to_headers"] = `{"sub":"X-User-ID"}`
				p := build(t, f, md)
				tok := sign(t, c.method, c.priv, "k-"+alg, baseClaims())
				set, removed, state := allowed(t, run(t, p, bearer(tok)))
				if set["x-user-id"] != "user-42" || len(removed) != 0 {
					t.Errorf("headers: set %v, removed %v", set, removed)
				}
				if state[StateUserID] != "user-42" || state[StateAuthMethod] != "jwt" {
					t.Errorf("state %v", state)
				}
				var got map[string]any
				if err := json.Unmarshal([]byte(state[StateClaims]), &got); err != nil {
					t.Fatalf("state %s is not JSON: %v", StateClaims, err)
				}
				if got["sub"] != "user-42" || !reflect.DeepEqual(got["roles"], []any{"admin", "reader"}) {
					t.Errorf("claims state %s", state[StateClaims])
				}
			})
		}
	}
}

// TestDenials checks every way a token can be refused: the status, the challenge, the fixed
// phrase, and that the body never holds the token.
func TestDenials(t *testing.T) {
	testKeys(t)
	f := newFactory(t, `{"issuer":"`+testIssuer+`","audience":["`+testAudience+`","other"]}`, nil, func() time.Time { return fixedNow })
	p := build(t, f, map[string]string{"public_key_pem": pemOf(t, &rsaA.PublicKey)})
	pemBytes := []byte(pemOf(t, &rsaA.PublicKey))

	with := func(mod func(jwt.MapClaims)) jwt.MapClaims {
		c := baseClaims()
		mod(c)
		return c
	}
	good := sign(t, jwt.SigningMethodRS256, rsaA, "", baseClaims())
	hs := func(key []byte) func(string) []byte {
		return func(input string) []byte {
			m := hmac.New(sha256.New, key)
			m.Write([]byte(input))
			return m.Sum(nil)
		}
	}
	rsSign := func(key *rsa.PrivateKey) func(string) []byte {
		return func(input string) []byte {
			s, err := jwt.SigningMethodRS256.Sign(input, key)
			if err != nil {
				t.Fatal(err)
			}
			return s
		}
	}

	f401 := func(name string, hdrs map[string]string, phrase string) {
		t.Helper()
		t.Run(name, func(t *testing.T) {
			status, h, body := denial(t, run(t, p, hdrs))
			if status != 401 {
				t.Errorf("status %d, want 401", status)
			}
			want := `Bearer error="invalid_token", error_description="` + phrase + `"`
			if h["www-authenticate"] != want || h["content-type"] != "application/json" {
				t.Errorf("headers %v, want www-authenticate %s", h, want)
			}
			if body.Error != "invalid_token" || body.Message != phrase {
				t.Errorf("body %+v, want invalid_token / %q", body, phrase)
			}
			tok := hdrs["authorization"]
			if len(tok) > 20 && strings.Contains(fmt.Sprint(body, h), tok[len(tok)-20:]) {
				t.Errorf("denial echoes the token")
			}
		})
	}

	f401("malformed two segments", bearer("abc.def"), "malformed token")
	f401("malformed four segments", bearer(good+".x"), "malformed token")
	f401("malformed base64", bearer("!!!."+strings.SplitN(good, ".", 2)[1]), "malformed token")
	f401("malformed header JSON", bearer(rawToken(t, "not-an-object", baseClaims(), rsSign(rsaA))), "malformed token")
	f401("malformed claims JSON", bearer(rawToken(t, map[string]any{"alg": "RS256"}, []int{1, 2}, rsSign(rsaA))), "malformed token")
	f401("signature cut to 300 characters", bearer(good[:strings.LastIndex(good, ".")+301]), "invalid signature")
	f401("truncated by 5 characters", bearer(good[:len(good)-5]), "malformed token")
	f401("signature removed", bearer(good[:strings.LastIndex(good, ".")+1]), "invalid signature")
	f401("truncated inside the claims", bearer(good[:strings.LastIndex(good, ".")-3]), "malformed token")
	f401("oversized", bearer(good+strings.Repeat("A", DefaultMaxTokenBytes)), "token too large")
	f401("wrongly signed", bearer(sign(t, jwt.SigningMethodRS256, rsaB, "", baseClaims())), "invalid signature")
	f401("signature of another token", bearer(strings.Join(append(strings.Split(sign(t, jwt.SigningMethodRS256, rsaA, "", with(func(c jwt.MapClaims) { c["sub"] = "admin" })), ".")[:2], strings.Split(good, ".")[2]), ".")), "invalid signature")
	f401("expired", bearer(sign(t, jwt.SigningMethodRS256, rsaA, "", with(func(c jwt.MapClaims) { c["exp"] = fixedNow.Add(-31 * time.Second).Unix() }))), "token expired")
	f401("nbf in the future", bearer(sign(t, jwt.SigningMethodRS256, rsaA, "", with(func(c jwt.MapClaims) { c["nbf"] = fixedNow.Add(time.Minute).Unix() }))), "token not valid yet")
	f401("iat in the future", bearer(sign(t, jwt.SigningMethodRS256, rsaA, "", with(func(c jwt.MapClaims) { c["iat"] = fixedNow.Add(time.Minute).Unix() }))), "token issued in the future")
	f401("wrong issuer", bearer(sign(t, jwt.SigningMethodRS256, rsaA, "", with(func(c jwt.MapClaims) { c["iss"] = "https://evil.example.com" }))), "wrong issuer")
	f401("no issuer", bearer(sign(t, jwt.SigningMethodRS256, rsaA, "", with(func(c jwt.MapClaims) { delete(c, "iss") }))), "missing required claim")
	f401("wrong audience", bearer(sign(t, jwt.SigningMethodRS256, rsaA, "", with(func(c jwt.MapClaims) { c["aud"] = []string{"x", "y"} }))), "wrong audience")
	f401("no exp", bearer(sign(t, jwt.SigningMethodRS256, rsaA, "", with(func(c jwt.MapClaims) { delete(c, "exp") }))), "missing required claim")
	f401("exp of the wrong type", bearer(sign(t, jwt.SigningMethodRS256, rsaA, "", with(func(c jwt.MapClaims) { c["exp"] = "tomorrow" }))), "invalid claims")
	f401("alg none", bearer(rawToken(t, map[string]any{"alg": "none", "typ": "JWT"}, baseClaims(), nil)), "signing algorithm not allowed")
	f401("alg None", bearer(rawToken(t, map[string]any{"alg": "None"}, baseClaims(), nil)), "signing algorithm not allowed")
	f401("alg missing", bearer(rawToken(t, map[string]any{"typ": "JWT"}, baseClaims(), rsSign(rsaA))), "signing algorithm not allowed")
	f401("alg unknown", bearer(rawToken(t, map[string]any{"alg": "XS999"}, baseClaims(), rsSign(rsaA))), "signing algorithm not allowed")
	// Key confusion: an HS256 token whose HMAC secret is the RSA public key the policy trusts.
	f401("HS256 with the RSA public key", bearer(rawToken(t, map[string]any{"alg": "HS256"}, baseClaims(), hs(pemBytes))), "signing algorithm not allowed")
	f401("ES256 against an RSA key", bearer(sign(t, jwt.SigningMethodES256, ecP256, "", baseClaims())), "signing algorithm not allowed")
	f401("kid not a string", bearer(rawToken(t, map[string]any{"alg": "RS256", "kid": 7}, baseClaims(), rsSign(rsaA))), "malformed token")
	f401("crit header", bearer(rawToken(t, map[string]any{"alg": "RS256", "crit": []string{"exp"}}, baseClaims(), rsSign(rsaA))), "malformed token")
	f401("padded base64", bearer(strings.Replace(good, ".", "=.", 1)), "malformed token")

	t.Run("leeway", func(t *testing.T) {
		tok := sign(t, jwt.SigningMethodRS256, rsaA, "", with(func(c jwt.MapClaims) { c["exp"] = fixedNow.Add(-29 * time.Second).Unix() }))
		allowed(t, run(t, p, bearer(tok)))
		strict := build(t, f, map[string]string{"public_key_pem": pemOf(t, &rsaA.PublicKey), "leeway": "0s"})
		_, _, body := denial(t, run(t, strict, bearer(tok)))
		if body.Message != "token expired" {
			t.Errorf("with leeway 0s: %q", body.Message)
		}
	})
	t.Run("second audience accepted", func(t *testing.T) {
		allowed(t, run(t, p, bearer(sign(t, jwt.SigningMethodRS256, rsaA, "", with(func(c jwt.MapClaims) { c["aud"] = []string{"x", "other"} })))))
	})
}

// TestMissingToken checks the 401 without an error code (RFC 6750 §3.1) and required: false.
func TestMissingToken(t *testing.T) {
	testKeys(t)
	f := newFactory(t, `{"public_key_pem":`+jsonString(pemOf(t, &rsaA.PublicKey))+`}`, nil, func() time.Time { return fixedNow })
	p := build(t, f, nil)
	optional := build(t, f, map[string]string{"required": "false"})
	custom := build(t, f, map[string]string{"header": "X-Token", "prefix": ""})
	good := sign(t, jwt.SigningMethodRS256, rsaA, "", baseClaims())

	for name, hdrs := range map[string]map[string]string{
		"no header":    {},
		"empty":        {"authorization": ""},
		"basic scheme": {"authorization": "Basic dXNlcjpwYXNz"},
		"prefix only":  {"authorization": "Bearer "},
		"blank token":  {"authorization": "Bearer    "},
		"short":        {"authorization": "Bea"},
	} {
		t.Run(name, func(t *testing.T) {
			status, h, body := denial(t, run(t, p, hdrs))
			if status != 401 || h["www-authenticate"] != "Bearer" || body.Error != "unauthorized" || body.Message != "bearer token required" {
				t.Errorf("got %d %v %+v", status, h, body)
			}
			r := run(t, optional, hdrs)
			if r.Status != agentv1.StatusCode_OK || len(r.Instructions) != 0 {
				t.Errorf("required=false: got %v with %d instructions", r.Status, len(r.Instructions))
			}
		})
	}
	t.Run("scheme is case-insensitive", func(t *testing.T) {
		allowed(t, run(t, p, map[string]string{"authorization": "bEaReR " + good}))
	})
	t.Run("required=false still refuses a bad token", func(t *testing.T) {
		status, _, _ := denial(t, run(t, optional, bearer(good[:len(good)-3])))
		if status != 401 {
			t.Errorf("status %d", status)
		}
	})
	t.Run("custom header without prefix", func(t *testing.T) {
		allowed(t, run(t, custom, map[string]string{"x-token": good}))
		denial(t, run(t, custom, bearer(good)))
	})
}

// TestClaimsToHeaders checks how claims become headers, that a header whose claim is absent is
// removed, and that a value Envoy would refuse is never forwarded.
func TestClaimsToHeaders(t *testing.T) {
	testKeys(t)
	f := newFactory(t, `{"public_key_pem":`+jsonString(pemOf(t, &rsaA.PublicKey))+`}`, nil, func() time.Time { return fixedNow })
	p := build(t, f, map[string]string{
		"claims_to_headers": `{"sub":"X-User-ID","realm_access.roles":"X-Roles","https://example.com/tenant":"X-Tenant",` +
			`"level":"X-Level","verified":"X-Verified","profile":"X-Profile","missing":"X-Missing","mixed":"X-Mixed","empty":"X-Empty"}`,
		"remove_token_header": "true",
	})
	claims := baseClaims()
	claims["realm_access"] = map[string]any{"roles": []string{"admin", "ops"}}
	claims["https://example.com/tenant"] = "acme"
	claims["level"] = 12345678901234567
	claims["verified"] = true
	claims["profile"] = map[string]any{"name": "A <b>", "n": 1}
	claims["mixed"] = []any{"a", map[string]any{"b": 1}}
	claims["empty"] = ""
	set, removed, _ := allowed(t, run(t, p, bearer(sign(t, jwt.SigningMethodRS256, rsaA, "", claims))))
	want := map[string]string{
		"x-user-id":  "user-42",
		"x-roles":    "admin,ops",
		"x-tenant":   "acme",
		"x-level":    "12345678901234567",
		"x-verified": "true",
		"x-profile":  `{"n":1,"name":"A <b>"}`,
		"x-mixed":    `["a",{"b":1}]`,
	}
	if !reflect.DeepEqual(set, want) {
		t.Errorf("set headers\n got %v\nwant %v", set, want)
	}
	slices.Sort(removed)
	if !reflect.DeepEqual(removed, []string{"authorization", "x-empty", "x-missing"}) {
		t.Errorf("removed %v", removed)
	}

	for name, v := range map[string]any{"CR LF": "a\r\nX-Admin: 1", "NUL": "a\x00b", "LF in list": []string{"a\nb"}} {
		t.Run(name, func(t *testing.T) {
			c := baseClaims()
			c["sub"] = v
			q := build(t, f, map[string]string{"claims_to_headers": `{"sub":"X-User-ID"}`})
			_, _, body := denial(t, run(t, q, bearer(sign(t, jwt.SigningMethodRS256, rsaA, "", c))))
			if body.Message != "claim value cannot be forwarded" {
				t.Errorf("got %q", body.Message)
			}
		})
	}
}

// TestClaimsStateCap checks that claims larger than max_claims_bytes are trimmed to a valid
// JSON object that keeps the small claims.
func TestClaimsStateCap(t *testing.T) {
	testKeys(t)
	f := newFactory(t, `{"max_claims_bytes":512,"public_key_pem":`+jsonString(pemOf(t, &rsaA.PublicKey))+`}`, nil, func() time.Time { return fixedNow })
	p := build(t, f, nil)
	c := baseClaims()
	c["big"] = strings.Repeat("x", 1000)
	c["zz"] = "last"
	_, _, state := allowed(t, run(t, p, bearer(sign(t, jwt.SigningMethodRS256, rsaA, "", c))))
	enc := state[StateClaims]
	if len(enc) > 512 {
		t.Fatalf("claims state of %d bytes exceeds 512", len(enc))
	}
	var got map[string]any
	if err := json.Unmarshal([]byte(enc), &got); err != nil {
		t.Fatalf("trimmed claims %q are not JSON: %v", enc, err)
	}
	if _, ok := got["big"]; ok {
		t.Error("the oversized claim was kept")
	}
	if got["zz"] != "last" || got["sub"] != "user-42" || got["roles"] == nil {
		t.Errorf("small claims lost: %s", enc)
	}
}

func TestEncodeClaims(t *testing.T) {
	f := func(claims map[string]any, max int, want string) {
		t.Helper()
		got, err := encodeClaims(claims, max)
		if err != nil || got != want {
			t.Errorf("encodeClaims(%v, %d) = %q, %v; want %q", claims, max, got, err, want)
		}
	}
	f(map[string]any{"a": "<&>", "b": json.Number("1")}, 100, `{"a":"<&>","b":1}`)
	f(map[string]any{"a": "xxxxxxxx", "b": "y"}, 12, `{"b":"y"}`)
	f(map[string]any{"a": "xxxxxxxx"}, 5, `{}`)
	f(map[string]any{}, 5, `{}`)
	if _, err := encodeClaims(map[string]any{"f": func() {}}, 100); err == nil {
		t.Error("want an error for a value JSON cannot encode")
	}
	if _, err := encodeClaims(map[string]any{"a": strings.Repeat("x", 10), "f": func() {}}, 5); err == nil {
		t.Error("want an error for a value JSON cannot encode while trimming")
	}
}

func TestLookupClaim(t *testing.T) {
	claims := map[string]any{
		"a":     map[string]any{"b": map[string]any{"c": "deep"}},
		"x.y":   "literal",
		"x":     map[string]any{"y": "nested"},
		"list":  []any{"p"},
		"plain": "v",
	}
	f := func(path string, want any, wantOK bool) {
		t.Helper()
		got, ok := LookupClaim(claims, path)
		if ok != wantOK || !reflect.DeepEqual(got, want) {
			t.Errorf("LookupClaim(%q) = %v, %v; want %v, %v", path, got, ok, want, wantOK)
		}
	}
	f("plain", "v", true)
	f("a.b.c", "deep", true)
	f("x.y", "literal", true)
	f("a.b.missing", nil, false)
	f("plain.sub", nil, false)
	f("list.0", nil, false)
	f("", nil, false)
}

func TestHeaderValue(t *testing.T) {
	f := func(v any, want string, wantOK bool) {
		t.Helper()
		got, ok := headerValue(v)
		if got != want || ok != wantOK {
			t.Errorf("headerValue(%#v) = %q, %v; want %q, %v", v, got, ok, want, wantOK)
		}
	}
	f(nil, "", false)
	f("", "", false)
	f("s", "s", true)
	f(json.Number("1.5"), "1.5", true)
	f(false, "false", true)
	f([]any{"a", json.Number("2"), true}, "a,2,true", true)
	f([]any{}, "", false)
	f([]any{nil}, "[null]", true)
	f(map[string]any{"k": "v"}, `{"k":"v"}`, true)
	f(func() {}, "", false)
}

// TestHMAC checks that HMAC algorithms work only with a secret from the agent config.
func TestHMAC(t *testing.T) {
	testKeys(t)
	secret := strings.Repeat("s3cr3t-", 6)
	t.Setenv("JWT_TEST_SECRET", secret)
	t.Setenv("JWT_TEST_SHORT", "short")
	f := newFactory(t, `{"hmac_secret_env":"JWT_TEST_SECRET","issuer":"`+testIssuer+`"}`, nil, func() time.Time { return fixedNow })
	p := build(t, f, nil)
	allowed(t, run(t, p, bearer(sign(t, jwt.SigningMethodHS256, []byte(secret), "", baseClaims()))))

	msg := func(tok string) string {
		t.Helper()
		_, _, body := denial(t, run(t, p, bearer(tok)))
		return body.Message
	}
	if m := msg(sign(t, jwt.SigningMethodHS256, []byte(secret+"x"), "", baseClaims())); m != "invalid signature" {
		t.Errorf("other secret: %q", m)
	}
	if m := msg(sign(t, jwt.SigningMethodHS384, []byte(secret), "", baseClaims())); m != "signing algorithm not allowed" {
		t.Errorf("HS384 not in the default list: %q", m)
	}
	if m := msg(sign(t, jwt.SigningMethodRS256, rsaA, "", baseClaims())); m != "signing algorithm not allowed" {
		t.Errorf("RS256 with an HMAC source: %q", m)
	}
	hs512 := build(t, f, map[string]string{"algorithms": `["HS512"]`})
	allowed(t, run(t, hs512, bearer(sign(t, jwt.SigningMethodHS512, []byte(secret), "", baseClaims()))))

	if _, err := f.Build(map[string]string{"algorithms": `["RS256"]`}); err == nil || !strings.Contains(err.Error(), `algorithm "RS256" needs a public key`) {
		t.Errorf("RS256 with an HMAC source: %v", err)
	}
	// A metadata key source replaces the HMAC default; HS256 cannot come with it.
	if _, err := f.Build(map[string]string{"public_key_pem": pemOf(t, &rsaA.PublicKey), "algorithms": `["HS256"]`}); err == nil ||
		!strings.Contains(err.Error(), `algorithm "HS256" needs the key source hmac_secret_env`) {
		t.Errorf("HS256 with a PEM key: %v", err)
	}
	for cfg, want := range map[string]string{
		`{"hmac_secret_env":"JWT_TEST_SHORT"}`:                         `hmac_secret_env: secret in "JWT_TEST_SHORT" is 5 bytes: at least 32 are required`,
		`{"hmac_secret_env":"JWT_TEST_UNSET_VARIABLE"}`:                `hmac_secret_env: environment variable "JWT_TEST_UNSET_VARIABLE" is not set`,
		`{"hmac_secret_env":"JWT_TEST_SECRET","algorithms":["RS256"]}`: `algorithms: algorithm "RS256" needs a public key, but the key source is hmac_secret_env`,
	} {
		if _, err := New(policy.Config{Raw: json.RawMessage(cfg)}); err == nil || err.Error() != want {
			t.Errorf("New(%s) = %v, want %q", cfg, err, want)
		}
	}
}

func TestNewErrors(t *testing.T) {
	testKeys(t)
	f := func(cfg, want string) {
		t.Helper()
		fac, err := New(policy.Config{Raw: json.RawMessage(cfg)})
		if err == nil {
			_ = fac.(*Factory).Close()
			t.Fatalf("New(%s): want error %q", cfg, want)
		}
		if err.Error() != want {
			t.Errorf("New(%s):\n got %q\nwant %q", cfg, err, want)
		}
	}
	f(`{"bogus":1}`, `invalid JSON: json: unknown field "bogus"`)
	f(`{"leeway":"10m"}`, `leeway: 10m0s is out of range [0s, 5m0s]`)
	f(`{"leeway":30}`, `invalid JSON: want a duration such as "30s", got 30`)
	f(`{"leeway":"soon"}`, `invalid JSON: want a duration such as "30s", got "soon"`)
	f(`{"jwks_refresh_interval":"10ms"}`, `jwks_refresh_interval: 10ms is out of range [1s, 24h0m0s]`)
	f(`{"jwks_fetch_timeout":"0s"}`, `jwks_fetch_timeout: 0s is out of range (0, 30s]`)
	f(`{"max_token_bytes":10}`, `max_token_bytes: 10 is out of range [256, 65536]`)
	f(`{"max_claims_bytes":1000000}`, `max_claims_bytes: 1000000 is out of range [256, 65536]`)
	f(`{"audience":["a",""]}`, `audience[1]: must not be empty`)
	f(`{"audience":7}`, `invalid JSON: want a string or a list of strings, got 7`)
	f(`{"jwks_url":"https://a.example.com/k","jwks_file":"x"}`, `key source: set at most one of jwks_url, jwks_file, public_key_pem and hmac_secret_env`)
	f(`{"jwks_url":"http://auth.example.com/keys"}`, `jwks_url: URL "http://auth.example.com/keys": http is allowed only for a loopback host; use https`)
	f(`{"jwks_file":"/nonexistent/jwks.json"}`, `jwks_file: read JWK set: open /nonexistent/jwks.json: no such file or directory`)
	f(`{"public_key_pem":"nope"}`, `public_key_pem: no PEM block found`)
	// What an empty ${env:...} or ${file:...} comes to: an error, not "no key source".
	f(`{"public_key_pem":""}`, `public_key_pem: is empty; leave the key out for no default key source`)
	f(`{"jwks_url":"","issuer":"x"}`, `jwks_url: is empty; leave the key out for no default key source`)
	f(`{"jwks_file":""}`, `jwks_file: is empty; leave the key out for no default key source`)
	f(`{"algorithms":["none"]}`, `algorithms: algorithm "none" is not supported`)
	f(`{"algorithms":["HS256"]}`, `algorithms: algorithm "HS256" needs the key source hmac_secret_env`)
	f(`{"leeway":"-1s","max_token_bytes":1}`, "leeway: -1s is out of range [0s, 5m0s]\nmax_token_bytes: 1 is out of range [256, 65536]")
}

func TestNewDefaults(t *testing.T) {
	fac, err := New(policy.Config{})
	if err != nil {
		t.Fatal(err)
	}
	f := fac.(*Factory)
	defer f.Close()
	if f.leeway != DefaultLeeway || f.interval != DefaultRefreshInterval || f.timeout != DefaultFetchTimeout ||
		f.maxToken != DefaultMaxTokenBytes || f.maxClaims != DefaultMaxClaimsBytes || f.defaultKeys != nil {
		t.Errorf("defaults: %+v", f)
	}
	if _, err := f.Build(nil); err == nil || err.Error() != "key source: none; set jwks_url, jwks_file or public_key_pem in the metadata or in the agent config" {
		t.Errorf("Build without a key source: %v", err)
	}
	if err := f.HealthCheck(t.Context()); err != nil {
		t.Errorf("HealthCheck without remote sets: %v", err)
	}
}

func TestBuildErrors(t *testing.T) {
	testKeys(t)
	f := newFactory(t, `{"public_key_pem":`+jsonString(pemOf(t, &rsaA.PublicKey))+`}`, nil, time.Now)
	check := func(md map[string]string, want string) {
		t.Helper()
		p, err := f.Build(md)
		if err == nil {
			t.Fatalf("Build(%v) = %v, want error %q", md, p, want)
		}
		if err.Error() != want {
			t.Errorf("Build(%v):\n got %q\nwant %q", md, err, want)
		}
	}
	check(map[string]string{"unknown": "x"}, `metadata key "unknown": unknown key`)
	check(map[string]string{"header": "bad header"}, `header: invalid header name "bad header"`)
	check(map[string]string{"header": ":path"}, `header: invalid header name ":path"`)
	check(map[string]string{"leeway": "1h"}, `leeway: 1h0m0s is out of range [0s, 5m0s]`)
	check(map[string]string{"leeway": "1"}, `metadata key "leeway": want a duration such as "250ms", got "1"`)
	check(map[string]string{"required": "maybe"}, `metadata key "required": want true or false, got "maybe"`)
	check(map[string]string{"audience": "[]"}, `audience: empty list`)
	check(map[string]string{"audience": `["a",""]`}, `audience: empty string in list`)
	check(map[string]string{"audience": `[1]`}, `audience: want a string or a JSON list of strings: json: cannot unmarshal number into Go value of type string`)
	check(map[string]string{"claims_to_headers": `{"sub":"x-envoy-user"}`}, `claims_to_headers: claim "sub": header "x-envoy-user" cannot be set`)
	check(map[string]string{"claims_to_headers": `{"sub":"Host"}`}, `claims_to_headers: claim "sub": header "Host" cannot be set`)
	check(map[string]string{"claims_to_headers": `{"sub":"bad name"}`}, `claims_to_headers: claim "sub": header "bad name" cannot be set`)
	check(map[string]string{"claims_to_headers": `{"sub":"Authorization"}`}, `claims_to_headers: claim "sub": header "authorization" is the token header`)
	check(map[string]string{"claims_to_headers": `{"":"x-a"}`}, `claims_to_headers: empty claim name`)
	check(map[string]string{"claims_to_headers": `{"a":"X-A","b":"x-a"}`}, `claims_to_headers: claims "a" and "b" both set header "x-a"`)
	check(map[string]string{"claims_to_headers": `["sub"]`}, `metadata key "claims_to_headers": invalid JSON: json: cannot unmarshal array into Go value of type map[string]string`)
	check(map[string]string{"algorithms": `["RS256","XS1"]`}, `algorithms: algorithm "XS1" is not supported`)
	check(map[string]string{"algorithms": `["ES256"]`}, `algorithms: none of [ES256] fits the configured key`)
	check(map[string]string{"jwks_url": "https://a.example.com/k", "public_key_pem": "x"}, `key source: set at most one of jwks_url, jwks_file and public_key_pem`)
	check(map[string]string{"jwks_url": "ftp://a.example.com/k"}, `jwks_url: URL "ftp://a.example.com/k": scheme must be https`)
	check(map[string]string{"public_key_pem": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}, `public_key_pem: PEM block "PRIVATE KEY" is not a public key or a certificate`)
	check(map[string]string{"public_key_pem": pemOf(t, &rsaSmall.PublicKey)}, `public_key_pem: RSA key of 1024 bits: want 2048 to 8192 bits`)
	check(map[string]string{"jwks_file": "/nonexistent/jwks.json"}, `jwks_file: read JWK set: open /nonexistent/jwks.json: no such file or directory`)
	// Several problems are reported at once.
	check(map[string]string{"header": "a b", "leeway": "-1s"}, "header: invalid header name \"a b\"\nleeway: -1s is out of range [0s, 5m0s]")
}

// TestMetadataOverridesConfig checks that metadata values replace the agent config's defaults.
func TestMetadataOverridesConfig(t *testing.T) {
	testKeys(t)
	f := newFactory(t, `{"issuer":"https://default.example.com","audience":"default-aud","leeway":"0s","algorithms":["ES256"],`+
		`"public_key_pem":`+jsonString(pemOf(t, &ecP256.PublicKey))+`}`, nil, func() time.Time { return fixedNow })
	def := build(t, f, nil)
	c := baseClaims()
	c["iss"], c["aud"] = "https://default.example.com", "default-aud"
	allowed(t, run(t, def, bearer(sign(t, jwt.SigningMethodES256, ecP256, "", c))))
	_, _, body := denial(t, run(t, def, bearer(sign(t, jwt.SigningMethodES256, ecP256, "", baseClaims()))))
	if body.Message != "wrong issuer" {
		t.Errorf("default issuer: %q", body.Message)
	}
	over := build(t, f, map[string]string{"issuer": testIssuer, "audience": `["` + testAudience + `"]`,
		"public_key_pem": pemOf(t, &rsaA.PublicKey), "algorithms": `["RS256"]`, "leeway": "1m"})
	c = baseClaims()
	c["exp"] = fixedNow.Add(-45 * time.Second).Unix()
	allowed(t, run(t, over, bearer(sign(t, jwt.SigningMethodRS256, rsaA, "", c))))
}

// TestSchema checks that the published schema is JSON and names exactly the metadata keys.
func TestSchema(t *testing.T) {
	var s struct {
		Type                 string                     `json:"type"`
		AdditionalProperties bool                       `json:"additionalProperties"`
		Properties           map[string]json.RawMessage `json:"properties"`
	}
	if err := json.Unmarshal([]byte(schema), &s); err != nil {
		t.Fatalf("schema is not JSON: %v", err)
	}
	var want []string
	st := reflect.TypeOf(Settings{})
	for i := 0; i < st.NumField(); i++ {
		want = append(want, st.Field(i).Tag.Get("json"))
	}
	got := slices.Sorted(maps.Keys(s.Properties))
	slices.Sort(want)
	if !slices.Equal(got, want) || s.Type != "object" || s.AdditionalProperties {
		t.Errorf("schema properties %v, want %v", got, want)
	}
	m, ok := policy.Lookup(Name)
	if !ok || m.MetadataSchema != schema || m.Phases != policy.Request {
		t.Errorf("module not registered as expected: %+v", m)
	}
}

// TestConcurrentExecute runs one policy from many goroutines; with -race it shows Execute
// shares nothing mutable.
func TestConcurrentExecute(t *testing.T) {
	testKeys(t)
	f := newFactory(t, "", nil, func() time.Time { return fixedNow })
	p := build(t, f, map[string]string{"public_key_pem": pemOf(t, &ecP256.PublicKey), "claims_to_headers": `{"sub":"x-user-id"}`})
	good := sign(t, jwt.SigningMethodES256, ecP256, "", baseClaims())
	bad := sign(t, jwt.SigningMethodES256, ecP256B, "", baseClaims())
	var wg sync.WaitGroup
	var wrong atomic.Int64
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tok, want := good, agentv1.StatusCode_OK
			if i%2 == 1 {
				tok, want = bad, agentv1.StatusCode_POLICY_DENIED
			}
			for range 50 {
				r, err := p.Execute(t.Context(), &policy.Context{Headers: bearer(tok)})
				if err != nil || r.Status != want {
					wrong.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if n := wrong.Load(); n != 0 {
		t.Errorf("%d of 400 concurrent runs answered wrongly", n)
	}
}

func TestStringList(t *testing.T) {
	f := func(in string, want []string, wantErr bool) {
		t.Helper()
		var l stringList
		err := json.Unmarshal([]byte(in), &l)
		if (err != nil) != wantErr || (!wantErr && !slices.Equal(l, want)) {
			t.Errorf("unmarshal %s = %v, %v", in, l, err)
		}
	}
	f(`"a"`, []string{"a"}, false)
	f(`["a","b"]`, []string{"a", "b"}, false)
	f(`{}`, nil, true)
	g := func(in string, want []string) {
		t.Helper()
		got, err := parseStringList(in)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("parseStringList(%q) = %v, %v", in, got, err)
		}
	}
	g("api", []string{"api"})
	g(` ["a","b"]`, []string{"a", "b"})
}

func jsonString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// BenchmarkExecute measures the validation of a valid token per algorithm, with a claim header
// and the state it records. Compare two revisions with
// `go test -run '^$' -bench Execute -count 10 ./policies/jwtvalidation > old.txt` (then new.txt)
// and `benchstat old.txt new.txt`.
func BenchmarkExecute(b *testing.B) {
	testKeys(b)
	fac := newFactory(b, "", nil, func() time.Time { return fixedNow })
	for _, c := range []struct {
		method jwt.SigningMethod
		priv   any
		pub    any
	}{
		{jwt.SigningMethodRS256, rsaA, &rsaA.PublicKey},
		{jwt.SigningMethodES256, ecP256, &ecP256.PublicKey},
		{jwt.SigningMethodEdDSA, edKey, edKey.Public()},
	} {
		b.Run(c.method.Alg(), func(b *testing.B) {
			p := build(b, fac, map[string]string{"public_key_pem": pemOf(b, c.pub), "issuer": testIssuer,
				"audience": testAudience, "claims_to_headers": `{"sub":"x-user-id"}`})
			hdrs := bearer(sign(b, c.method, c.priv, "", baseClaims()))
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				ctx := context.Background()
				for pb.Next() {
					r, err := p.Execute(ctx, &policy.Context{Headers: hdrs})
					if err != nil || r.Status != agentv1.StatusCode_OK {
						b.Fatalf("status %v, %v", r.Status, err)
					}
				}
			})
		})
	}
}

// TestCredentialNames: the token header, default or configured, is named for the audit log.
func TestCredentialNames(t *testing.T) {
	testKeys(t)
	t.Setenv("JWT_TEST_SECRET", strings.Repeat("s3cr3t-", 6))
	f := newFactory(t, `{"hmac_secret_env":"JWT_TEST_SECRET"}`, nil, nil)
	for md, want := range map[string]string{"": "authorization", "X-Identity": "x-identity"} {
		var meta map[string]string
		if md != "" {
			meta = map[string]string{"header": md}
		}
		if got := policy.CredentialReader(build(t, f, meta)).CredentialNames().Headers; len(got) != 1 || got[0] != want {
			t.Errorf("header %q: credential names %v, want [%s]", md, got, want)
		}
	}
}
