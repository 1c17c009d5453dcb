package jwtvalidation

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"go.uber.org/goleak"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// Keys are generated once per test binary: RSA generation is slow.
var (
	keysOnce                        sync.Once
	rsaA, rsaB, rsaSmall            *rsa.PrivateKey
	ecP256, ecP384, ecP521, ecP256B *ecdsa.PrivateKey
	edKey                           ed25519.PrivateKey
)

func testKeys(t testing.TB) {
	t.Helper()
	keysOnce.Do(func() {
		must := func(err error) {
			if err != nil {
				panic(err)
			}
		}
		var err error
		rsaA, err = rsa.GenerateKey(rand.Reader, 2048)
		must(err)
		rsaB, err = rsa.GenerateKey(rand.Reader, 2048)
		must(err)
		rsaSmall, err = rsa.GenerateKey(rand.Reader, 1024)
		must(err)
		ecP256, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		must(err)
		ecP256B, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		must(err)
		ecP384, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
		must(err)
		ecP521, err = ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
		must(err)
		_, edKey, err = ed25519.GenerateKey(rand.Reader)
		must(err)
	})
}

// fixedNow is the clock of every test that does not move time.
var fixedNow = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// testClock is a clock tests can move.
type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *testClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *testClock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

const (
	testIssuer   = "https://auth.example.com"
	testAudience = "api-service"
)

// baseClaims are valid at fixedNow for testIssuer and testAudience.
func baseClaims() jwt.MapClaims {
	return jwt.MapClaims{
		"iss":   testIssuer,
		"aud":   testAudience,
		"sub":   "user-42",
		"exp":   fixedNow.Add(time.Hour).Unix(),
		"iat":   fixedNow.Add(-time.Minute).Unix(),
		"nbf":   fixedNow.Add(-time.Minute).Unix(),
		"roles": []any{"admin", "reader"},
	}
}

// sign makes a token; kid is set when not empty.
func sign(t testing.TB, m jwt.SigningMethod, key any, kid string, claims jwt.MapClaims) string {
	t.Helper()
	tok := jwt.NewWithClaims(m, claims)
	if kid != "" {
		tok.Header["kid"] = kid
	}
	s, err := tok.SignedString(key)
	if err != nil {
		t.Fatalf("sign %s token: %v", m.Alg(), err)
	}
	return s
}

// rawToken assembles a token from a header and claims as given, with a signature made by
// signFn over the signing input (nil: an empty signature).
func rawToken(t testing.TB, header, claims any, signFn func(input string) []byte) string {
	t.Helper()
	enc := func(v any) string {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return base64.RawURLEncoding.EncodeToString(b)
	}
	input := enc(header) + "." + enc(claims)
	var sig []byte
	if signFn != nil {
		sig = signFn(input)
	}
	return input + "." + base64.RawURLEncoding.EncodeToString(sig)
}

func pemOf(t testing.TB, pub any) string {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
}

// jwkOf renders a public key as a JWK.
func jwkOf(kid string, pub any) map[string]any {
	b64 := base64.RawURLEncoding.EncodeToString
	j := map[string]any{"kid": kid, "use": "sig"}
	switch k := pub.(type) {
	case *rsa.PublicKey:
		j["kty"] = "RSA"
		j["n"] = b64(k.N.Bytes())
		j["e"] = b64(big.NewInt(int64(k.E)).Bytes())
	case *ecdsa.PublicKey:
		j["kty"] = "EC"
		j["crv"] = k.Curve.Params().Name
		point, err := k.Bytes()
		if err != nil {
			panic(err)
		}
		size := (k.Curve.Params().BitSize + 7) / 8
		j["x"] = b64(point[1 : 1+size])
		j["y"] = b64(point[1+size:])
	case ed25519.PublicKey:
		j["kty"] = "OKP"
		j["crv"] = "Ed25519"
		j["x"] = b64(k)
	default:
		panic("unsupported key")
	}
	return j
}

func jwksJSON(t testing.TB, keys ...map[string]any) []byte {
	t.Helper()
	b, err := json.Marshal(map[string]any{"keys": keys})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// jwksServer serves a JWK Set on 127.0.0.1 and can be made slow, failing or garbled.
type jwksServer struct {
	*httptest.Server
	hits  atomic.Int64
	mu    sync.Mutex
	body  []byte
	mode  string // "", "slow", "error", "garbage"
	delay time.Duration
}

func newJWKSServer(t *testing.T, body []byte) *jwksServer {
	t.Helper()
	s := &jwksServer{body: body}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.hits.Add(1)
		s.mu.Lock()
		mode, body, delay := s.mode, s.body, s.delay
		s.mu.Unlock()
		switch mode {
		case "slow":
			select {
			case <-time.After(delay):
			case <-r.Context().Done():
				return
			}
		case "error":
			http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
			return
		case "garbage":
			_, _ = w.Write([]byte("<html>not a key set</html>"))
			return
		}
		w.Header().Set("Content-Type", "application/jwk-set+json")
		_, _ = w.Write(body)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *jwksServer) set(mode string, body []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mode = mode
	if body != nil {
		s.body = body
	}
}

// newFactory makes a factory from an agent config section (JSON), with the given clock, and
// closes it when the test ends.
func newFactory(t testing.TB, cfg string, shared *sync.Map, now func() time.Time) *Factory {
	t.Helper()
	var raw json.RawMessage
	if cfg != "" {
		raw = json.RawMessage(cfg)
	}
	pf, err := newWithClock(policy.Config{Raw: raw, Shared: shared}, now)
	if err != nil {
		t.Fatalf("New(%s): %v", cfg, err)
	}
	t.Cleanup(func() { _ = pf.Close() })
	return pf
}

func build(t testing.TB, f *Factory, md map[string]string) *JWTValidation {
	t.Helper()
	p, err := f.Build(md)
	if err != nil {
		t.Fatalf("Build(%v): %v", md, err)
	}
	return p.(*JWTValidation)
}

func bearer(tok string) map[string]string {
	return map[string]string{"authorization": "Bearer " + tok}
}

func run(t testing.TB, p policy.Policy, hdrs map[string]string) policy.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := p.Execute(ctx, &policy.Context{Phase: agentv1.PolicyPhase_REQUEST, Headers: hdrs})
	if err != nil {
		t.Fatalf("Execute: %v", err)
	}
	return r
}

// denial returns the immediate response of a denied result, failing the test otherwise.
func denial(t testing.TB, r policy.Result) (int, map[string]string, policy.ErrorBody) {
	t.Helper()
	if r.Status != agentv1.StatusCode_POLICY_DENIED || len(r.Instructions) != 1 {
		t.Fatalf("want one denial, got status %v with %d instructions", r.Status, len(r.Instructions))
	}
	ir := r.Instructions[0].GetImmediateResponse()
	if ir == nil {
		t.Fatalf("want an immediate response, got %v", r.Instructions[0])
	}
	var body policy.ErrorBody
	dec := json.NewDecoder(bytes.NewReader(ir.GetBody()))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&body); err != nil {
		t.Fatalf("denial body %q is not the JSON error body: %v", ir.GetBody(), err)
	}
	return int(ir.GetStatusCode()), ir.GetHeaders(), body
}

// allowed returns the instructions of an allowed result as header sets, header removals and
// state, failing the test when it is not an allow.
func allowed(t testing.TB, r policy.Result) (set map[string]string, removed []string, state map[string]string) {
	t.Helper()
	if r.Status != agentv1.StatusCode_OK {
		if r.Status == agentv1.StatusCode_POLICY_DENIED {
			_, _, body := denial(t, r)
			t.Fatalf("want allow, got denial %q", body.Message)
		}
		t.Fatalf("want allow, got status %v", r.Status)
	}
	set, state = map[string]string{}, map[string]string{}
	for _, in := range r.Instructions {
		switch in.GetType() {
		case agentv1.InstructionType_SET_HEADER:
			set[in.GetHeader().GetKey()] = in.GetHeader().GetValue()
		case agentv1.InstructionType_REMOVE_HEADER:
			removed = append(removed, in.GetHeader().GetKey())
		case agentv1.InstructionType_SET_STATE:
			state[in.GetState().GetKey()] = in.GetState().GetValue()
		default:
			t.Fatalf("unexpected instruction %v", in)
		}
	}
	return set, removed, state
}
