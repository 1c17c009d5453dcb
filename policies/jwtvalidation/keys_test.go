package jwtvalidation

import (
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

func TestParseJWKS(t *testing.T) {
	testKeys(t)
	b64 := base64.RawURLEncoding.EncodeToString
	rsaJWK := jwkOf("r", &rsaA.PublicKey)
	with := func(base map[string]any, kv ...any) map[string]any {
		out := map[string]any{}
		for k, v := range base {
			out[k] = v
		}
		for i := 0; i < len(kv); i += 2 {
			if kv[i+1] == nil {
				delete(out, kv[i].(string))
			} else {
				out[kv[i].(string)] = kv[i+1]
			}
		}
		return out
	}
	ec := jwkOf("e", &ecP256.PublicKey)

	t.Run("usable keys", func(t *testing.T) {
		set, err := parseJWKS(jwksJSON(t,
			rsaJWK,
			jwkOf("e256", &ecP256.PublicKey),
			jwkOf("e384", &ecP384.PublicKey),
			jwkOf("e521", &ecP521.PublicKey),
			jwkOf("ed", edKey.Public()),
			with(jwkOf("", &rsaB.PublicKey), "kid", nil, "alg", "PS256"),
			with(rsaJWK, "use", "enc", "kid", "skipped"),
			map[string]any{"kty": "oct", "k": b64([]byte("secret")), "kid": "hmac"},
		))
		if err != nil {
			t.Fatal(err)
		}
		if set.n != 6 || len(set.anyKID) != 1 {
			t.Errorf("got %d keys, %d without kid", set.n, len(set.anyKID))
		}
		for _, c := range []struct {
			kid, alg string
			n        int
			known    bool
		}{
			{"r", "RS256", 1, true},
			{"r", "PS512", 1, true},
			{"r", "ES256", 0, true},
			{"e256", "ES256", 1, true},
			{"e256", "ES384", 0, true},
			{"e384", "ES384", 1, true},
			{"e521", "ES512", 1, true},
			{"ed", "EdDSA", 1, true},
			{"hmac", "HS256", 0, true}, // unknown kid, but the kid-less key makes every kid a candidate
			{"", "RS256", 1, true},
			{"", "PS256", 2, true}, // r and the kid-less PS256 key
			{"", "HS256", 0, true},
		} {
			keys, known := set.candidates(c.kid, c.alg)
			if len(keys) != c.n || known != c.known {
				t.Errorf("candidates(%q, %s) = %d keys, known %v; want %d, %v", c.kid, c.alg, len(keys), known, c.n, c.known)
			}
		}
	})

	errCase := func(name string, body []byte, want string) {
		t.Helper()
		t.Run(name, func(t *testing.T) {
			_, err := parseJWKS(body)
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("parseJWKS(%.80s) = %v, want an error containing %q", body, err, want)
			}
		})
	}
	errCase("not JSON", []byte("<html>"), "decode JWK set: invalid character")
	errCase("trailing data", []byte(`{"keys":[]} {}`), "trailing data")
	errCase("no keys member", []byte(`{"kty":"RSA"}`), `no "keys" member`)
	errCase("keys not a list", []byte(`{"keys":{}}`), "cannot unmarshal object")
	errCase("empty", []byte(`{"keys":[]}`), "no usable key")
	var many []map[string]any
	for i := range maxJWKSKeys + 1 {
		many = append(many, with(ec, "kid", fmt.Sprint(i)))
	}
	errCase("too many keys", jwksJSON(t, many...), "JWK set holds 101 keys: at most 100 are accepted")

	for _, c := range []struct {
		name string
		key  any
		want string
	}{
		{"oct", map[string]any{"kty": "oct", "k": "c2VjcmV0"}, "symmetric keys are never taken from a key set"},
		{"use enc", with(rsaJWK, "use", "enc"), `use "enc" is not "sig"`},
		{"unknown kty", map[string]any{"kty": "DSA"}, `key type "DSA" is not supported`},
		{"not an object", "RSA", "decode: json: cannot unmarshal string"},
		{"RSA small", jwkOf("s", &rsaSmall.PublicKey), "RSA key of 1024 bits"},
		{"RSA no n", with(rsaJWK, "n", nil), `member "n" is missing`},
		{"RSA no e", with(rsaJWK, "e", nil), `member "e" is missing`},
		{"RSA bad n", with(rsaJWK, "n", "!!"), `member "n" is not base64url`},
		{"RSA bad e", with(rsaJWK, "e", "!!"), `member "e" is not base64url`},
		{"RSA long e", with(rsaJWK, "e", b64([]byte{1, 0, 0, 0, 1})), "RSA exponent of 5 bytes"},
		{"RSA even e", with(rsaJWK, "e", b64([]byte{1, 0, 0})), "RSA public exponent 65536"},
		{"RSA with EC alg", with(rsaJWK, "alg", "ES256"), `alg "ES256" does not fit a key of type RSA`},
		{"RSA with HMAC alg", with(rsaJWK, "alg", "HS256"), `alg "HS256" does not fit a key of type RSA`},
		{"RSA with alg none", with(rsaJWK, "alg", "none"), `alg "none" does not fit`},
		{"EC curve", with(ec, "crv", "P-224"), `EC curve "P-224" is not supported`},
		{"EC alg curve", with(ec, "alg", "ES384"), `alg "ES384" does not fit curve P-256`},
		{"EC no x", with(ec, "x", nil), `member "x" is missing`},
		{"EC no y", with(ec, "y", nil), `member "y" is missing`},
		{"EC long x", with(ec, "x", b64(make([]byte, 33))), `member "x" is 33 bytes, want 32`},
		{"EC off curve", with(ec, "y", b64(append(make([]byte, 31), 7))), "EC point"},
		{"OKP curve", map[string]any{"kty": "OKP", "crv": "X25519", "x": b64(make([]byte, 32))}, `OKP curve "X25519" is not supported`},
		{"OKP size", map[string]any{"kty": "OKP", "crv": "Ed25519", "x": b64(make([]byte, 31))}, "Ed25519 key of 31 bytes"},
		{"OKP no x", map[string]any{"kty": "OKP", "crv": "Ed25519"}, `member "x" is missing`},
	} {
		b, err := json.Marshal(map[string]any{"keys": []any{c.key}})
		if err != nil {
			t.Fatal(err)
		}
		errCase(c.name, b, c.want)
	}

	t.Run("bad keys are skipped", func(t *testing.T) {
		set, err := parseJWKS(jwksJSON(t, with(rsaJWK, "kid", "bad", "n", "!!"), ec))
		if err != nil || set.n != 1 {
			t.Fatalf("got %v, %v", set, err)
		}
	})
	t.Run("padded and short coordinates", func(t *testing.T) {
		b, err := b64Fixed("AQ==", "x", 4)
		if err != nil || string(b) != "\x00\x00\x00\x01" {
			t.Errorf("b64Fixed = %x, %v", b, err)
		}
	})
}

func TestParsePublicKeyPEM(t *testing.T) {
	testKeys(t)
	block := func(typ string, der []byte) []byte { return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}) }
	pkixPEM := func(pub any) []byte {
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			t.Fatal(err)
		}
		return block("PUBLIC KEY", der)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "issuer"},
		NotBefore: fixedNow.Add(-time.Hour), NotAfter: fixedNow.Add(time.Hour)}
	certDER, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &ecP256.PublicKey, ecP256)
	if err != nil {
		t.Fatal(err)
	}
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	x25519, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	even := &rsa.PublicKey{N: rsaA.N, E: 4}

	for _, c := range []struct {
		name string
		data []byte
		fam  family
		want string
	}{
		{"PKIX RSA", pkixPEM(&rsaA.PublicKey), famRSA, ""},
		{"PKCS1 RSA", block("RSA PUBLIC KEY", x509.MarshalPKCS1PublicKey(&rsaA.PublicKey)), famRSA, ""},
		{"PKIX EC", pkixPEM(&ecP384.PublicKey), famEC, ""},
		{"PKIX Ed25519", pkixPEM(edKey.Public()), famEd25519, ""},
		{"certificate", block("CERTIFICATE", certDER), famEC, ""},
		{"leading text", append([]byte("issuer key:\n"), pkixPEM(&ecP256.PublicKey)...), famEC, ""},
		{"no PEM", []byte("MIIBIjANBg"), 0, "no PEM block found"},
		{"bad DER", block("PUBLIC KEY", []byte{1, 2, 3}), 0, `parse PEM block "PUBLIC KEY"`},
		{"bad certificate", block("CERTIFICATE", []byte{1, 2, 3}), 0, `parse PEM block "CERTIFICATE"`},
		{"private key", block("EC PRIVATE KEY", []byte{1}), 0, `PEM block "EC PRIVATE KEY" is not a public key or a certificate`},
		{"P-224", pkixPEM(&p224.PublicKey), 0, "ECDSA curve P-224 is not supported"},
		{"X25519", pkixPEM(x25519.PublicKey()), 0, "public key type *ecdh.PublicKey is not supported"},
		{"small RSA", pkixPEM(&rsaSmall.PublicKey), 0, "RSA key of 1024 bits: want 2048 to 8192 bits"},
		{"even exponent", block("RSA PUBLIC KEY", x509.MarshalPKCS1PublicKey(even)), 0, "RSA public exponent 4: want an odd number of at least 3"},
	} {
		t.Run(c.name, func(t *testing.T) {
			k, err := parsePublicKeyPEM(c.data)
			if c.want != "" {
				if err == nil || !strings.Contains(err.Error(), c.want) {
					t.Errorf("got %v, want an error containing %q", err, c.want)
				}
				return
			}
			if err != nil || k.fam != c.fam {
				t.Errorf("got %+v, %v", k, err)
			}
		})
	}
}

// TestStaticUnknownKid checks that a JWKS file that does not know a token's kid refuses it
// without any fetch.
func TestStaticUnknownKid(t *testing.T) {
	testKeys(t)
	file := filepath.Join(t.TempDir(), "jwks.json")
	if err := os.WriteFile(file, jwksJSON(t, jwkOf("a", &rsaA.PublicKey), jwkOf("b", &rsaB.PublicKey)), 0o600); err != nil {
		t.Fatal(err)
	}
	f := newFactory(t, `{"jwks_file":`+jsonString(file)+`}`, nil, func() time.Time { return fixedNow })
	p := build(t, f, nil)
	allowed(t, run(t, p, bearer(sign(t, jwt.SigningMethodRS256, rsaB, "b", baseClaims()))))
	// No kid: every key of the algorithm's type is tried.
	allowed(t, run(t, p, bearer(sign(t, jwt.SigningMethodRS256, rsaB, "", baseClaims()))))
	_, _, body := denial(t, run(t, p, bearer(sign(t, jwt.SigningMethodRS256, rsaA, "zz", baseClaims()))))
	if body.Message != "unknown signing key" {
		t.Errorf("unknown kid: %q", body.Message)
	}
	_, _, body = denial(t, run(t, p, bearer(sign(t, jwt.SigningMethodRS256, rsaA, "b", baseClaims()))))
	if body.Message != "invalid signature" {
		t.Errorf("kid of another key: %q", body.Message)
	}
	if err := os.WriteFile(file, []byte(`{"keys":[]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Build(map[string]string{"jwks_file": file}); err == nil || !strings.Contains(err.Error(), "no usable key") {
		t.Errorf("empty JWKS file: %v", err)
	}
	if _, err := f.Build(map[string]string{"jwks_file": "/dev/zero"}); err == nil || err.Error() != `jwks_file: read JWK set: file "/dev/zero" exceeds 1048576 bytes` {
		t.Errorf("endless file: %v", err)
	}
	if _, err := f.Build(map[string]string{"jwks_file": t.TempDir()}); err == nil || !strings.Contains(err.Error(), "is a directory") {
		t.Errorf("directory: %v", err)
	}
}

func TestClassifyDefault(t *testing.T) {
	if r, ok := classify(errors.New("something new")); !ok || r != reasonClaims {
		t.Errorf("classify(unknown) = %v, %v", r, ok)
	}
	if _, ok := classify(fmt.Errorf("keyfunc: %w", errKeysUnavailable)); ok {
		t.Error("unavailable keys classified as a token problem")
	}
}
