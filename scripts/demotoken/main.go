// Command demotoken mints a JSON Web Token for the example config's /api/v1/admin route, signed
// with the demo key in config/demo. The demo key is public: use it only to try the engine out.
package main

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "demotoken:", err)
		os.Exit(1)
	}
}

func run(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("demotoken", flag.ContinueOnError)
	key := fs.String("key", "config/demo/jwt-demo-private.pem", "PEM file of the EC private key")
	sub := fs.String("sub", "demo-admin", "subject (becomes X-User-ID)")
	roles := fs.String("roles", "admin", "comma-separated roles")
	ttl := fs.Duration("ttl", time.Hour, "lifetime")
	if err := fs.Parse(args); err != nil {
		return err
	}
	data, err := os.ReadFile(*key)
	if err != nil {
		return err
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return errors.New("no PEM block in " + *key)
	}
	k, err := x509.ParseECPrivateKey(block.Bytes)
	if err != nil {
		return fmt.Errorf("parse %s: %w", *key, err)
	}
	now := time.Now()
	tok, err := jwt.NewWithClaims(jwt.SigningMethodES256, jwt.MapClaims{
		"iss": "https://auth.example.com", "aud": "api-service", "sub": *sub,
		"roles": strings.Split(*roles, ","), "iat": now.Unix(), "exp": now.Add(*ttl).Unix(),
	}).SignedString(k)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(out, tok)
	return err
}
