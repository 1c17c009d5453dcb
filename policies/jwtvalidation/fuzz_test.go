package jwtvalidation

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/headers"
)

// FuzzJWT runs arbitrary authorization header values through a policy that trusts RSA, ECDSA
// and Ed25519 keys. Properties: Execute never fails; a denial is one of the fixed answers (so
// it never echoes the token); an allowed token carries exactly the signed header and claims of
// a token the test signed, and every header it sets is one Envoy accepts.
func FuzzJWT(f *testing.F) {
	testKeys(f)
	file := filepath.Join(f.TempDir(), "jwks.json")
	if err := os.WriteFile(file, jwksJSON(f, jwkOf("a", &rsaA.PublicKey), jwkOf("e", &ecP256.PublicKey), jwkOf("d", edKey.Public())), 0o600); err != nil {
		f.Fatal(err)
	}
	fac := newFactory(f, `{"max_claims_bytes":1024}`, nil, func() time.Time { return fixedNow })
	p := build(f, fac, map[string]string{
		"jwks_file":         file,
		"issuer":            testIssuer,
		"audience":          testAudience,
		"claims_to_headers": `{"sub":"x-user-id","realm_access.roles":"x-roles","aud":"x-aud"}`,
	})

	claims := baseClaims()
	claims["realm_access"] = map[string]any{"roles": []string{"admin"}}
	valid := []string{
		sign(f, jwt.SigningMethodRS256, rsaA, "a", claims),
		sign(f, jwt.SigningMethodPS256, rsaA, "a", baseClaims()),
		sign(f, jwt.SigningMethodES256, ecP256, "e", claims),
		sign(f, jwt.SigningMethodEdDSA, edKey, "d", claims),
		sign(f, jwt.SigningMethodEdDSA, edKey, "", baseClaims()),
	}
	signed := map[string]bool{}
	for _, tok := range valid {
		signed[tok[:strings.LastIndex(tok, ".")]] = true
		f.Add("Bearer " + tok)
		allowed(f, run(f, p, bearer(tok)))
	}
	expired := baseClaims()
	expired["exp"] = fixedNow.Add(-time.Hour).Unix()
	f.Add("Bearer " + sign(f, jwt.SigningMethodRS256, rsaA, "a", expired))
	f.Add("Bearer " + sign(f, jwt.SigningMethodRS256, rsaB, "a", claims))
	f.Add("Bearer " + sign(f, jwt.SigningMethodHS256, []byte(pemOf(f, &rsaA.PublicKey)), "a", claims))
	f.Add("Bearer " + rawToken(f, map[string]any{"alg": "none"}, claims, nil))
	f.Add("Bearer a.b.c")
	f.Add("bearer   x")
	f.Add("")

	fixed := map[string]bool{}
	for _, r := range append(p.invalid[:], p.missing) {
		fixed[string(r.Instructions[0].GetImmediateResponse().GetBody())] = true
	}

	f.Fuzz(func(t *testing.T, auth string) {
		r, err := p.Execute(t.Context(), &policy.Context{Phase: agentv1.PolicyPhase_REQUEST, Headers: map[string]string{"authorization": auth}})
		if err != nil {
			t.Fatalf("Execute: %v", err)
		}
		switch r.Status {
		case agentv1.StatusCode_POLICY_DENIED:
			status, _, _ := denial(t, r)
			body := string(r.Instructions[0].GetImmediateResponse().GetBody())
			if status != 401 || !fixed[body] {
				t.Fatalf("denial %d %s is not one of the fixed answers", status, body)
			}
		case agentv1.StatusCode_OK:
			tok, _ := p.token(auth)
			if i := strings.LastIndex(tok, "."); i < 0 || !signed[tok[:i]] {
				t.Fatalf("allowed a token the test never signed: %q", auth)
			}
			set, _, state := allowed(t, r)
			for k, v := range set {
				if err := headers.ValidValue(v); err != nil {
					t.Fatalf("header %s: %v", k, err)
				}
			}
			if !json.Valid([]byte(state[StateClaims])) || len(state[StateClaims]) > 1024 {
				t.Fatalf("claims state %q", state[StateClaims])
			}
		default:
			t.Fatalf("status %v", r.Status)
		}
	})
}

// FuzzJWKS parses arbitrary JWK Sets. A set that parses holds only keys of supported types
// and sizes, each accepted by fits for at least one algorithm.
func FuzzJWKS(f *testing.F) {
	testKeys(f)
	f.Add(jwksJSON(f, jwkOf("a", &rsaA.PublicKey), jwkOf("e", &ecP384.PublicKey), jwkOf("d", edKey.Public())))
	f.Add([]byte(`{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}`))
	f.Add([]byte(`{"keys":[{"kty":"EC","crv":"P-256","x":"AQ","y":"Ag"}]}`))
	f.Add([]byte(`{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB","alg":"RS256"}]}`))
	f.Add([]byte(`{"keys":null}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		set, err := parseJWKS(data)
		if err != nil {
			return
		}
		if set.n == 0 || set.n > maxJWKSKeys {
			t.Fatalf("set of %d keys", set.n)
		}
		var all []*verifyKey
		all = append(all, set.anyKID...)
		for _, l := range set.byKID {
			all = append(all, l...)
		}
		for _, k := range all {
			switch key := k.key.(type) {
			case *rsa.PublicKey:
				if k.fam != famRSA || key.N.BitLen() < minRSABits || key.N.BitLen() > maxRSABits || key.E < 3 {
					t.Fatalf("bad RSA key: %d bits, e=%d", key.N.BitLen(), key.E)
				}
			case *ecdsa.PublicKey:
				if k.fam != famEC || !slices.Contains([]elliptic.Curve{elliptic.P256(), elliptic.P384(), elliptic.P521()}, key.Curve) {
					t.Fatalf("bad EC key")
				}
			case ed25519.PublicKey:
				if k.fam != famEd25519 || len(key) != ed25519.PublicKeySize {
					t.Fatalf("bad Ed25519 key")
				}
			default:
				t.Fatalf("key of type %T", k.key)
			}
			ok := false
			for alg := range algorithms {
				ok = ok || k.fits(alg)
				if k.fits(alg) && algorithms[alg] == famHMAC {
					t.Fatalf("a key from a set fits %s", alg)
				}
			}
			if !ok {
				t.Fatalf("key %q fits no algorithm", k.kid)
			}
		}
	})
}

// FuzzMetadata builds policies from arbitrary metadata. Build never panics, and a policy it
// returns has settings that are safe to run: a valid token header, an algorithm list without
// "none" that fits the key source, settable claim headers, a leeway in range. Metadata that
// names a URL or a file is left out: a fuzzer must not reach the network or read devices.
func FuzzMetadata(f *testing.F) {
	testKeys(f)
	fac := newFactory(f, `{"public_key_pem":`+jsonString(pemOf(f, &ecP256.PublicKey))+`}`, nil, func() time.Time { return fixedNow })
	f.Add("issuer", testIssuer, "audience", `["a","b"]`, "claims_to_headers", `{"sub":"X-User-ID"}`)
	f.Add("header", "X-Token", "prefix", "", "required", "false")
	f.Add("leeway", "1m", "algorithms", `["ES256"]`, "remove_token_header", "true")
	f.Add("algorithms", `["none"]`, "public_key_pem", "-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----", "leeway", "-5s")
	f.Add("claims_to_headers", `{"a":"host"}`, "header", ":path", "audience", "[]")
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2, k3, v3 string) {
		md := map[string]string{k1: v1, k2: v2, k3: v3}
		if u, ok := md["jwks_url"]; ok {
			_ = checkJWKSURL(u)
			delete(md, "jwks_url")
		}
		delete(md, "jwks_file")
		pol, err := fac.Build(md)
		if err != nil {
			if pol != nil {
				t.Fatal("Build returned a policy with an error")
			}
			return
		}
		p := pol.(*JWTValidation)
		if headers.ValidName(p.header) != nil || strings.HasPrefix(p.header, ":") || p.header != strings.ToLower(p.header) {
			t.Fatalf("token header %q", p.header)
		}
		if len(p.algs) == 0 || p.algs["none"] {
			t.Fatalf("algorithms %v", p.algs)
		}
		if _, ok := p.keys.(staticKeys); !ok {
			t.Fatalf("keys %T", p.keys)
		}
		for a := range p.algs {
			if fam := algorithms[a]; fam == 0 || fam == famHMAC {
				t.Fatalf("algorithm %q allowed with a public key", a)
			}
		}
		for _, ch := range p.claimHeaders {
			if ch.path == "" || headers.ValidName(ch.header) != nil || !headers.SetAllowed(ch.header) || ch.header == p.header {
				t.Fatalf("claim header %+v", ch)
			}
		}
		// The policy runs: a missing token is answered by the fixed denial or passes.
		r, err := p.Execute(t.Context(), &policy.Context{Headers: map[string]string{}})
		if err != nil || (r.Status != agentv1.StatusCode_OK && r.Status != agentv1.StatusCode_POLICY_DENIED) {
			t.Fatalf("Execute: %v, %v", r.Status, err)
		}
	})
}
