package policy

import "testing"

func TestCredentialSet(t *testing.T) {
	var empty *CredentialSet
	if empty.Header("x") || empty.Param("x") || !empty.Has(Credentials{}) || empty.Has(Credentials{Headers: []string{"x"}}) {
		t.Fatal("nil set")
	}
	a := empty.With(Credentials{Headers: []string{"X-Key"}, Params: []string{"k"}})
	if !a.Header("x-key") || a.Header("X-Key") || !a.Param("k") || a.Param("K") {
		t.Fatalf("a = %+v", a)
	}
	if a.With(Credentials{Headers: []string{"x-KEY"}}) != a {
		t.Fatal("With of names already held made a new set")
	}
	b := a.With(Credentials{Headers: []string{"x-token-header"}})
	if b == a || !b.Header("x-key") || !b.Header("x-token-header") || !b.Param("k") || a.Header("x-token-header") {
		t.Fatalf("With changed its receiver or lost names: a %+v, b %+v", a, b)
	}
}
