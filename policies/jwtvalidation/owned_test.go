package jwtvalidation

import (
	"slices"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/agent/policy"
)

// TestOwnedRequestHeaders checks that the claims_to_headers headers are declared, so that the
// agent strips a client's own values on every request, also without a token, and that a claim
// header that an upstream may read as the token header is refused.
func TestOwnedRequestHeaders(t *testing.T) {
	testKeys(t)
	f := newFactory(t, `{"public_key_pem":`+jsonString(pemOf(t, &rsaA.PublicKey))+`}`, nil, time.Now)
	p, err := f.Build(map[string]string{"required": "false", "claims_to_headers": `{"sub":"X-User-ID","org.id":"x-org"}`})
	if err != nil {
		t.Fatal(err)
	}
	got := slices.Clone(p.(policy.HeaderOwner).OwnedRequestHeaders())
	slices.Sort(got)
	if want := []string{"x-org", "x-user-id"}; !slices.Equal(got, want) {
		t.Errorf("OwnedRequestHeaders() = %q, want %q", got, want)
	}
	p, err = f.Build(nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := p.(policy.HeaderOwner).OwnedRequestHeaders(); len(got) != 0 {
		t.Errorf("OwnedRequestHeaders() without claims_to_headers = %q", got)
	}
	_, err = f.Build(map[string]string{"header": "x-token", "claims_to_headers": `{"sub":"x_token"}`})
	if want := `claims_to_headers: claim "sub": header "x_token" is the token header`; err == nil || err.Error() != want {
		t.Errorf("claim header x_token beside token header x-token: %v, want %q", err, want)
	}
}
