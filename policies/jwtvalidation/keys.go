package jwtvalidation

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"strings"

	"github.com/golang-jwt/jwt/v5"
)

// Key size bounds. RSA keys below 2048 bits are refused (NIST SP 800-131A); above 8192 bits a
// key set could make every verification needlessly expensive.
const (
	minRSABits = 2048
	maxRSABits = 8192
	// minHMACSecret is the shortest HMAC secret accepted: RFC 7518 §3.2 asks for a key at
	// least as long as the hash output, 32 bytes for HS256.
	minHMACSecret = 32
)

// family is the kind of key an algorithm verifies with.
type family uint8

const (
	famRSA family = iota + 1
	famEC
	famEd25519
	famHMAC
)

// algorithms maps every algorithm this policy can verify to its key family. "none" is absent
// on purpose: it can never be allowed.
var algorithms = map[string]family{
	"RS256": famRSA, "RS384": famRSA, "RS512": famRSA,
	"PS256": famRSA, "PS384": famRSA, "PS512": famRSA,
	"ES256": famEC, "ES384": famEC, "ES512": famEC,
	"EdDSA": famEd25519,
	"HS256": famHMAC, "HS384": famHMAC, "HS512": famHMAC,
}

// ecCurves maps each ECDSA algorithm to the only curve it may be used with (RFC 7518 §3.4).
var ecCurves = map[string]elliptic.Curve{
	"ES256": elliptic.P256(),
	"ES384": elliptic.P384(),
	"ES512": elliptic.P521(),
}

// defaultAlgorithms are allowed when neither the metadata nor the agent config lists any and
// the key source holds public keys.
var defaultAlgorithms = []string{"RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"}

// defaultHMACAlgorithms are allowed by default when the key source is an HMAC secret.
var defaultHMACAlgorithms = []string{"HS256"}

// verifyKey is one key a token may be verified with.
type verifyKey struct {
	kid string
	// alg is the JWK's "alg" member; when set, a token must use exactly that algorithm.
	alg string
	fam family
	// key is *rsa.PublicKey, *ecdsa.PublicKey, ed25519.PublicKey or []byte (HMAC).
	key any
}

// fits reports whether a token signed with alg may be verified with k: the key's family must
// be the algorithm's (so an RSA public key is never used as an HMAC secret), an ECDSA key must
// be on the algorithm's curve, and a key that names its algorithm accepts only that one.
func (k *verifyKey) fits(alg string) bool {
	if k.alg != "" && k.alg != alg {
		return false
	}
	if algorithms[alg] != k.fam {
		return false
	}
	if k.fam == famEC {
		return k.key.(*ecdsa.PublicKey).Curve == ecCurves[alg]
	}
	return true
}

// keySet is an immutable set of verification keys.
type keySet struct {
	byKID map[string][]*verifyKey
	// anyKID are keys without a kid: candidates for every token.
	anyKID []*verifyKey
	n      int
}

func newKeySet(keys []*verifyKey) *keySet {
	s := &keySet{byKID: map[string][]*verifyKey{}, n: len(keys)}
	for _, k := range keys {
		if k.kid == "" {
			s.anyKID = append(s.anyKID, k)
		} else {
			s.byKID[k.kid] = append(s.byKID[k.kid], k)
		}
	}
	return s
}

// candidates returns the keys a token with the given kid and alg may be verified with, and
// whether the set knows the kid at all (a token without kid always counts as known).
func (s *keySet) candidates(kid, alg string) (keys []jwt.VerificationKey, known bool) {
	if kid == "" {
		for _, list := range s.byKID {
			for _, k := range list {
				if k.fits(alg) {
					keys = append(keys, k.key)
				}
			}
		}
		known = true
	} else {
		list, ok := s.byKID[kid]
		known = ok || len(s.anyKID) > 0
		for _, k := range list {
			if k.fits(alg) {
				keys = append(keys, k.key)
			}
		}
	}
	for _, k := range s.anyKID {
		if k.fits(alg) {
			keys = append(keys, k.key)
		}
	}
	return keys, known
}

// families returns the key families present in the set.
func (s *keySet) families() map[family]bool {
	out := map[family]bool{}
	for _, k := range s.anyKID {
		out[k.fam] = true
	}
	for _, list := range s.byKID {
		for _, k := range list {
			out[k.fam] = true
		}
	}
	return out
}

// parsePublicKeyPEM parses the first PEM block of data: a PKIX public key ("PUBLIC KEY"), a
// PKCS #1 RSA public key ("RSA PUBLIC KEY") or a certificate whose public key is used.
func parsePublicKeyPEM(data []byte) (*verifyKey, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("no PEM block found")
	}
	var pub any
	var err error
	switch block.Type {
	case "PUBLIC KEY":
		pub, err = x509.ParsePKIXPublicKey(block.Bytes)
	case "RSA PUBLIC KEY":
		pub, err = x509.ParsePKCS1PublicKey(block.Bytes)
	case "CERTIFICATE":
		var cert *x509.Certificate
		cert, err = x509.ParseCertificate(block.Bytes)
		if err == nil {
			pub = cert.PublicKey
		}
	default:
		return nil, fmt.Errorf("PEM block %q is not a public key or a certificate", block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("parse PEM block %q: %w", block.Type, err)
	}
	return publicKey(pub)
}

// publicKey wraps a parsed public key, checking its type and size.
func publicKey(pub any) (*verifyKey, error) {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		if err := checkRSA(k); err != nil {
			return nil, err
		}
		return &verifyKey{fam: famRSA, key: k}, nil
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256(), elliptic.P384(), elliptic.P521():
		default:
			return nil, fmt.Errorf("ECDSA curve %s is not supported", k.Curve.Params().Name)
		}
		return &verifyKey{fam: famEC, key: k}, nil
	case ed25519.PublicKey:
		return &verifyKey{fam: famEd25519, key: k}, nil
	default:
		return nil, fmt.Errorf("public key type %T is not supported", pub)
	}
}

func checkRSA(k *rsa.PublicKey) error {
	if bits := k.N.BitLen(); bits < minRSABits || bits > maxRSABits {
		return fmt.Errorf("RSA key of %d bits: want %d to %d bits", bits, minRSABits, maxRSABits)
	}
	if k.E < 3 || k.E%2 == 0 {
		return fmt.Errorf("RSA public exponent %d: want an odd number of at least 3", k.E)
	}
	return nil
}

// jwk is one member of a JWK Set (RFC 7517, 7518 §6, 8037).
type jwk struct {
	Kty string `json:"kty"`
	Kid string `json:"kid"`
	Use string `json:"use"`
	Alg string `json:"alg"`
	Crv string `json:"crv"`
	N   string `json:"n"`
	E   string `json:"e"`
	X   string `json:"x"`
	Y   string `json:"y"`
}

type jwkSet struct {
	Keys []json.RawMessage `json:"keys"`
}

// maxJWKSKeys bounds how many keys one set may hold.
const maxJWKSKeys = 100

// parseJWKS parses a JWK Set. Keys this policy cannot or must not use are skipped: symmetric
// ("oct") keys, since an HMAC secret never comes from a key set; encryption keys; unknown key
// types and curves; malformed or too small keys. A set with no usable key is an error, so that
// a cache keeps its last good set rather than an empty one.
func parseJWKS(data []byte) (*keySet, error) {
	var set jwkSet
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&set); err != nil {
		return nil, fmt.Errorf("decode JWK set: %w", err)
	}
	if dec.More() {
		return nil, errors.New("decode JWK set: trailing data after the set")
	}
	if set.Keys == nil {
		return nil, errors.New("decode JWK set: no \"keys\" member")
	}
	if len(set.Keys) > maxJWKSKeys {
		return nil, fmt.Errorf("JWK set holds %d keys: at most %d are accepted", len(set.Keys), maxJWKSKeys)
	}
	var keys []*verifyKey
	var skipped []error
	for i, raw := range set.Keys {
		k, err := parseJWK(raw)
		if err != nil {
			skipped = append(skipped, fmt.Errorf("key %d: %w", i, err))
			continue
		}
		keys = append(keys, k)
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("JWK set has no usable key: %w", errors.Join(append([]error{errNoKeys}, skipped...)...))
	}
	return newKeySet(keys), nil
}

var errNoKeys = errors.New("no signature key of type RSA, EC or OKP")

func parseJWK(raw json.RawMessage) (*verifyKey, error) {
	var j jwk
	if err := json.Unmarshal(raw, &j); err != nil {
		return nil, fmt.Errorf("decode: %w", err)
	}
	if j.Use != "" && j.Use != "sig" {
		return nil, fmt.Errorf("use %q is not \"sig\"", j.Use)
	}
	var k *verifyKey
	switch j.Kty {
	case "RSA":
		n, err := b64(j.N, "n")
		if err != nil {
			return nil, err
		}
		e, err := b64(j.E, "e")
		if err != nil {
			return nil, err
		}
		if len(e) == 0 || len(e) > 4 {
			return nil, fmt.Errorf("RSA exponent of %d bytes", len(e))
		}
		pub := &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(new(big.Int).SetBytes(e).Int64())}
		if err := checkRSA(pub); err != nil {
			return nil, err
		}
		k = &verifyKey{fam: famRSA, key: pub}
	case "EC":
		var curve elliptic.Curve
		switch j.Crv {
		case "P-256":
			curve = elliptic.P256()
		case "P-384":
			curve = elliptic.P384()
		case "P-521":
			curve = elliptic.P521()
		default:
			return nil, fmt.Errorf("EC curve %q is not supported", j.Crv)
		}
		size := (curve.Params().BitSize + 7) / 8
		x, err := b64Fixed(j.X, "x", size)
		if err != nil {
			return nil, err
		}
		y, err := b64Fixed(j.Y, "y", size)
		if err != nil {
			return nil, err
		}
		point := append(append([]byte{4}, x...), y...)
		pub, err := ecdsa.ParseUncompressedPublicKey(curve, point)
		if err != nil {
			return nil, fmt.Errorf("EC point: %w", err)
		}
		k = &verifyKey{fam: famEC, key: pub}
	case "OKP":
		if j.Crv != "Ed25519" {
			return nil, fmt.Errorf("OKP curve %q is not supported", j.Crv)
		}
		x, err := b64(j.X, "x")
		if err != nil {
			return nil, err
		}
		if len(x) != ed25519.PublicKeySize {
			return nil, fmt.Errorf("Ed25519 key of %d bytes", len(x))
		}
		k = &verifyKey{fam: famEd25519, key: ed25519.PublicKey(x)}
	case "oct":
		return nil, errors.New("symmetric keys are never taken from a key set")
	default:
		return nil, fmt.Errorf("key type %q is not supported", j.Kty)
	}
	if j.Alg != "" {
		fam, ok := algorithms[j.Alg]
		if !ok || fam != k.fam {
			return nil, fmt.Errorf("alg %q does not fit a key of type %s", j.Alg, j.Kty)
		}
		if fam == famEC && k.key.(*ecdsa.PublicKey).Curve != ecCurves[j.Alg] {
			return nil, fmt.Errorf("alg %q does not fit curve %s", j.Alg, j.Crv)
		}
	}
	k.kid, k.alg = j.Kid, j.Alg
	return k, nil
}

// b64 decodes a base64url member without padding; a padded value is accepted too.
func b64(s, member string) ([]byte, error) {
	if s == "" {
		return nil, fmt.Errorf("member %q is missing", member)
	}
	b, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(s, "="))
	if err != nil {
		return nil, fmt.Errorf("member %q is not base64url", member)
	}
	return b, nil
}

// b64Fixed decodes a coordinate that must be size bytes long; shorter values, which some
// issuers produce by dropping leading zeros, are left-padded.
func b64Fixed(s, member string, size int) ([]byte, error) {
	b, err := b64(s, member)
	if err != nil {
		return nil, err
	}
	if len(b) > size {
		return nil, fmt.Errorf("member %q is %d bytes, want %d", member, len(b), size)
	}
	out := make([]byte, size)
	copy(out[size-len(b):], b)
	return out, nil
}
