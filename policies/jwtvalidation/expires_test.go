package jwtvalidation

import (
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// TestResultExpiry checks what a cached entry may keep: an allow expires at the token's exp;
// a denial about a passing condition (a kid the keys do not know, a token not valid yet) is
// not reusable; the denial of an expired token carries no expiry (the TTL bounds it).
func TestResultExpiry(t *testing.T) {
	testKeys(t)
	f := newFactory(t, `{"public_key_pem":`+jsonString(pemOf(t, &rsaA.PublicKey))+`}`, nil, func() time.Time { return fixedNow })
	p := build(t, f, map[string]string{"issuer": testIssuer, "audience": testAudience, "leeway": "0s"})
	ok := run(t, p, bearer(sign(t, jwt.SigningMethodRS256, rsaA, "", baseClaims())))
	if want := fixedNow.Add(time.Hour).Truncate(time.Second); !ok.Expires.Equal(want) {
		t.Fatalf("allow expires %v, want the token's exp %v", ok.Expires, want)
	}
	early := baseClaims()
	early["nbf"] = fixedNow.Add(time.Minute).Unix()
	if r := run(t, p, bearer(sign(t, jwt.SigningMethodRS256, rsaA, "", early))); r.Expires.IsZero() || r.Expires.After(fixedNow) {
		t.Fatalf("a token not valid yet: expires %v, want not reusable", r.Expires)
	}
	expired := baseClaims()
	expired["exp"] = fixedNow.Add(-time.Minute).Unix()
	if r := run(t, p, bearer(sign(t, jwt.SigningMethodRS256, rsaA, "", expired))); !r.Expires.IsZero() {
		t.Fatalf("an expired token's denial: expires %v, want none", r.Expires)
	}
}
