package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/golang-jwt/jwt/v5"
)

func TestMintsVerifiableToken(t *testing.T) {
	var out strings.Builder
	if err := run([]string{"-key", "../../config/demo/jwt-demo-private.pem", "-roles", "admin,reader", "-sub", "bob"}, &out); err != nil {
		t.Fatal(err)
	}
	pubPEM, err := os.ReadFile("../../config/demo/jwt-demo-public.pem")
	if err != nil {
		t.Fatal(err)
	}
	pub, err := jwt.ParseECPublicKeyFromPEM(pubPEM)
	if err != nil {
		t.Fatal(err)
	}
	claims := jwt.MapClaims{}
	if _, err := jwt.ParseWithClaims(strings.TrimSpace(out.String()), claims, func(*jwt.Token) (any, error) { return pub, nil },
		jwt.WithIssuer("https://auth.example.com"), jwt.WithAudience("api-service"), jwt.WithValidMethods([]string{"ES256"})); err != nil {
		t.Fatal(err)
	}
	if claims["sub"] != "bob" || len(claims["roles"].([]any)) != 2 {
		t.Fatalf("%v", claims)
	}
	bad := filepath.Join(t.TempDir(), "bad.pem")
	os.WriteFile(bad, []byte("nope"), 0o600)
	if err := run([]string{"-key", bad}, &out); err == nil {
		t.Fatal("a file without PEM accepted")
	}
	if err := run([]string{"-key", filepath.Join(t.TempDir(), "none")}, &out); err == nil {
		t.Fatal("a missing key accepted")
	}
	if err := run([]string{"-bogus"}, &out); err == nil {
		t.Fatal("a bad flag accepted")
	}
}
