package jwtvalidation

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/rs/zerolog"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

func remoteOf(t *testing.T, p *JWTValidation) *remoteKeys {
	t.Helper()
	r, ok := p.keys.(*remoteKeys)
	if !ok {
		t.Fatalf("policy keys are %T, want a remote set", p.keys)
	}
	return r
}

// TestJWKSSharedAcrossFactories checks that factories made from one Shared map (a config and
// its reload) use one cache per URL: one fetch, one refresher.
func TestJWKSSharedAcrossFactories(t *testing.T) {
	testKeys(t)
	srv := newJWKSServer(t, jwksJSON(t, jwkOf("a", &rsaA.PublicKey), jwkOf("e", &ecP256.PublicKey)))
	shared := &sync.Map{}
	cfg := `{"jwks_url":"` + srv.URL + `/keys","issuer":"` + testIssuer + `"}`
	f1 := newFactory(t, cfg, shared, func() time.Time { return fixedNow })
	p1 := build(t, f1, nil)
	allowed(t, run(t, p1, bearer(sign(t, jwt.SigningMethodRS256, rsaA, "a", baseClaims()))))
	allowed(t, run(t, p1, bearer(sign(t, jwt.SigningMethodES256, ecP256, "e", baseClaims()))))

	// The reload: a new factory first, then the old one closes.
	f2 := newFactory(t, cfg, shared, func() time.Time { return fixedNow })
	p2 := build(t, f2, map[string]string{"audience": testAudience})
	p3 := build(t, f2, map[string]string{"jwks_url": srv.URL + "/keys"})
	if err := f1.Close(); err != nil {
		t.Fatal(err)
	}
	allowed(t, run(t, p2, bearer(sign(t, jwt.SigningMethodRS256, rsaA, "a", baseClaims()))))
	allowed(t, run(t, p3, bearer(sign(t, jwt.SigningMethodRS256, rsaA, "a", baseClaims()))))
	if r2, r3 := remoteOf(t, p2), remoteOf(t, p3); r2 != remoteOf(t, p1) || r3 != r2 {
		t.Error("factories on one Shared map made separate caches for one URL")
	}
	select {
	case <-remoteOf(t, p2).done:
		t.Fatal("closing the old factory stopped the refresher the new one uses")
	default:
	}
	if n := srv.hits.Load(); n != 1 {
		t.Errorf("JWKS fetched %d times, want 1", n)
	}
	if err := f2.HealthCheck(t.Context()); err != nil {
		t.Errorf("HealthCheck: %v", err)
	}

	// Closing the last user stops the refresher; a closed factory builds no new remote policy.
	r := remoteOf(t, p2)
	if err := f2.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-r.done:
	case <-time.After(5 * time.Second):
		t.Fatal("refresher still running after the last factory closed")
	}
	if _, err := f2.Build(map[string]string{"jwks_url": srv.URL + "/other"}); err != errFactoryClosed {
		t.Errorf("Build after Close: %v", err)
	}
	// The last good set is still in memory for requests that were in flight.
	allowed(t, run(t, p2, bearer(sign(t, jwt.SigningMethodRS256, rsaA, "a", baseClaims()))))
}

// knows waits until the set in use holds kid.
func knows(t *testing.T, p *JWTValidation, kid, alg string) {
	t.Helper()
	testenv.WaitFor(t, 10*time.Second, "a set with kid "+kid, func() bool {
		_, known := remoteOf(t, p).set.Load().candidates(kid, alg)
		return known
	})
}

// unknownKey checks that a result is the 401 for an unknown kid.
func unknownKey(t *testing.T, r policy.Result) {
	t.Helper()
	if status, _, body := denial(t, r); status != 401 || body.Message != "unknown signing key" {
		t.Fatalf("unknown kid: %d %q", status, body.Message)
	}
}

// TestJWKSUnknownKidRefetch checks that an unknown kid is refused at once and refetches the
// set in the background at most once per refresh interval, and that a rotated key is picked up
// that way.
func TestJWKSUnknownKidRefetch(t *testing.T) {
	testKeys(t)
	srv := newJWKSServer(t, jwksJSON(t, jwkOf("a", &rsaA.PublicKey)))
	clock := &testClock{t: fixedNow}
	f := newFactory(t, `{"jwks_refresh_interval":"1h"}`, nil, clock.now)
	p := build(t, f, map[string]string{"jwks_url": srv.URL})
	allowed(t, run(t, p, bearer(sign(t, jwt.SigningMethodRS256, rsaA, "a", baseClaims()))))
	hits := func(want int64) {
		t.Helper()
		if n := srv.hits.Load(); n != want {
			t.Fatalf("JWKS fetched %d times, want %d", n, want)
		}
	}
	hits(1)

	// The issuer rotates to key b: the first token signed with it is refused at once and
	// starts one refetch; the tokens after it are accepted. The server takes its time, so that
	// the first token is refused before the refetch ends.
	srv.mu.Lock()
	srv.delay = 100 * time.Millisecond
	srv.mu.Unlock()
	srv.set("slow", jwksJSON(t, jwkOf("a", &rsaA.PublicKey), jwkOf("b", &rsaB.PublicKey)))
	tokB := bearer(sign(t, jwt.SigningMethodRS256, rsaB, "b", baseClaims()))
	unknownKey(t, run(t, p, tokB))
	knows(t, p, "b", "RS256")
	allowed(t, run(t, p, tokB))
	hits(2)

	// Made-up kids within the same interval cause no fetch at all.
	for i := range 20 {
		unknownKey(t, run(t, p, bearer(sign(t, jwt.SigningMethodRS256, rsaB, "made-up-"+string(rune('a'+i)), baseClaims()))))
	}
	hits(2)

	// One interval later an unknown kid may fetch again, once.
	clock.add(time.Hour)
	srv.set("slow", jwksJSON(t, jwkOf("c", &ecP256.PublicKey)))
	tokC := bearer(sign(t, jwt.SigningMethodES256, ecP256, "c", baseClaims()))
	unknownKey(t, run(t, p, tokC))
	knows(t, p, "c", "ES256")
	allowed(t, run(t, p, tokC))
	unknownKey(t, run(t, p, bearer(sign(t, jwt.SigningMethodES256, ecP256, "d", baseClaims()))))
	hits(3)
	// Key a left the set with that fetch.
	_, _, body := denial(t, run(t, p, bearer(sign(t, jwt.SigningMethodRS256, rsaA, "a", baseClaims()))))
	if body.Message != "unknown signing key" {
		t.Errorf("rotated-out key: %q", body.Message)
	}
}

// TestJWKSConcurrentUnknownKid checks that many requests with new kids, while the key server
// stalls, are all refused at once (none waits for the server) and cause one fetch, after which
// the new key is accepted.
func TestJWKSConcurrentUnknownKid(t *testing.T) {
	testKeys(t)
	srv := newJWKSServer(t, jwksJSON(t, jwkOf("a", &rsaA.PublicKey)))
	f := newFactory(t, `{"jwks_refresh_interval":"1h"}`, nil, func() time.Time { return fixedNow })
	p := build(t, f, map[string]string{"jwks_url": srv.URL})
	testenv.WaitFor(t, 10*time.Second, "first fetch", func() bool { return remoteOf(t, p).set.Load() != nil })
	srv.set("slow", jwksJSON(t, jwkOf("a", &rsaA.PublicKey), jwkOf("b", &rsaB.PublicKey)))
	srv.mu.Lock()
	srv.delay = time.Second
	srv.mu.Unlock()
	type answer struct {
		r   policy.Result
		err error
		d   time.Duration
	}
	results := make(chan answer, 32)
	for i := range 32 {
		hdrs := bearer(sign(t, jwt.SigningMethodRS256, rsaB, []string{"b", "made-up"}[i%2], baseClaims()))
		go func() {
			start := time.Now()
			r, err := p.Execute(t.Context(), &policy.Context{Headers: hdrs})
			results <- answer{r, err, time.Since(start)}
		}()
	}
	for range 32 {
		a := <-results
		if a.err != nil {
			t.Fatal(a.err)
		}
		unknownKey(t, a.r)
		if a.d > 500*time.Millisecond {
			t.Errorf("answered after %v: the request waited for the key server", a.d)
		}
	}
	knows(t, p, "b", "RS256")
	allowed(t, run(t, p, bearer(sign(t, jwt.SigningMethodRS256, rsaB, "b", baseClaims()))))
	if n := srv.hits.Load(); n != 2 {
		t.Errorf("JWKS fetched %d times, want 2", n)
	}
}

// TestJWKSLastGoodSet checks that a set that was fetched once keeps serving when the endpoint
// returns errors or garbage, or goes away entirely.
func TestJWKSLastGoodSet(t *testing.T) {
	testKeys(t)
	srv := newJWKSServer(t, jwksJSON(t, jwkOf("a", &rsaA.PublicKey)))
	clock := &testClock{t: fixedNow}
	f := newFactory(t, `{"jwks_refresh_interval":"1h"}`, nil, clock.now)
	p := build(t, f, map[string]string{"jwks_url": srv.URL})
	// Tokens are made for the moved clock: good until far past the test's last move.
	claims := baseClaims()
	claims["exp"] = fixedNow.Add(24 * time.Hour).Unix()
	good := bearer(sign(t, jwt.SigningMethodRS256, rsaA, "a", claims))
	allowed(t, run(t, p, good))
	r := remoteOf(t, p)

	lastErr := func() string {
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.lastErr == nil {
			return ""
		}
		return r.lastErr.Error()
	}
	for _, c := range [][2]string{{"error", "status 503"}, {"garbage", "decode JWK set"}, {"closed", "connection refused"}} {
		mode, msg := c[0], c[1]
		t.Run(mode, func(t *testing.T) {
			before := r.fetches.Load()
			if mode == "closed" {
				srv.Close()
			} else {
				srv.set(mode, nil)
			}
			clock.add(time.Hour)
			// An unknown kid forces a fetch, which fails.
			unknownKey(t, run(t, p, bearer(sign(t, jwt.SigningMethodRS256, rsaB, "b", claims))))
			testenv.WaitFor(t, 10*time.Second, "the failed fetch", func() bool { return strings.Contains(lastErr(), msg) })
			if n := r.fetches.Load(); n != before+1 {
				t.Fatalf("%d fetches, want 1", n-before)
			}
			allowed(t, run(t, p, good))
			if err := f.HealthCheck(t.Context()); err != nil {
				t.Errorf("HealthCheck with a stale set: %v", err)
			}
		})
	}
}

// TestJWKSUnavailable checks the answer while no set was ever fetched: 503 before the
// request's deadline, with time left for the answer to reach the kernel, and an unhealthy
// factory.
func TestJWKSUnavailable(t *testing.T) {
	testKeys(t)
	tok := bearer(sign(t, jwt.SigningMethodRS256, rsaA, "a", baseClaims()))
	check := func(t *testing.T, p *JWTValidation, maxWait time.Duration) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		start := time.Now()
		r, err := p.Execute(ctx, &policy.Context{Phase: agentv1.PolicyPhase_REQUEST, Headers: tok})
		if err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d > maxWait {
			t.Errorf("answered after %s, want within %s", d, maxWait)
		}
		if ctx.Err() != nil {
			t.Error("answered after the request's deadline")
		}
		status, hdrs, body := denial(t, r)
		if status != 503 || body.Error != "jwks_unavailable" || body.Message != "signing keys unavailable" || hdrs["retry-after"] != "1" {
			t.Errorf("got %d %v %+v", status, hdrs, body)
		}
	}

	t.Run("down", func(t *testing.T) {
		srv := newJWKSServer(t, nil)
		url := srv.URL
		srv.Close()
		f := newFactory(t, `{"jwks_url":"`+url+`"}`, nil, func() time.Time { return fixedNow })
		p := build(t, f, nil)
		check(t, p, time.Second)
		testenv.WaitFor(t, 10*time.Second, "first fetch", func() bool { return remoteOf(t, p).failing() })
		if err := f.HealthCheck(t.Context()); err == nil || !strings.Contains(err.Error(), "fetch JWK set") {
			t.Errorf("HealthCheck: %v", err)
		}
	})
	t.Run("slow", func(t *testing.T) {
		srv := newJWKSServer(t, jwksJSON(t, jwkOf("a", &rsaA.PublicKey)))
		srv.set("slow", nil)
		srv.mu.Lock()
		srv.delay = 5 * time.Second
		srv.mu.Unlock()
		f := newFactory(t, `{"jwks_url":"`+srv.URL+`","jwks_fetch_timeout":"2s"}`, nil, func() time.Time { return fixedNow })
		p := build(t, f, nil)
		// The first fetch is still running: the policy waits for it until a quarter of the
		// 200 ms is left.
		check(t, p, 175*time.Millisecond)
		if err := f.HealthCheck(t.Context()); err == nil || !strings.Contains(err.Error(), "not fetched yet") {
			t.Errorf("HealthCheck while the first fetch runs: %v", err)
		}
		// The fetch gives up at its timeout, not at the server's pace.
		testenv.WaitFor(t, 10*time.Second, "fetch timeout", func() bool { return remoteOf(t, p).failing() })
	})
	t.Run("garbage then recovery", func(t *testing.T) {
		srv := newJWKSServer(t, jwksJSON(t, jwkOf("a", &rsaA.PublicKey)))
		srv.set("garbage", nil)
		f := newFactory(t, `{"jwks_url":"`+srv.URL+`"}`, nil, func() time.Time { return fixedNow })
		p := build(t, f, nil)
		check(t, p, time.Second)
		// A failing first fetch is retried after a second, not after the refresh interval.
		srv.set("", nil)
		testenv.WaitFor(t, 10*time.Second, "retry", func() bool { return remoteOf(t, p).set.Load() != nil })
		allowed(t, run(t, p, tok))
		if err := f.HealthCheck(t.Context()); err != nil {
			t.Errorf("HealthCheck after recovery: %v", err)
		}
	})
}

// TestJWKSFailureLogged checks that a failed fetch is logged, once per throttle interval,
// saying that tokens are refused while no set was ever fetched.
func TestJWKSFailureLogged(t *testing.T) {
	srv := newJWKSServer(t, nil)
	url := srv.URL
	srv.Close()
	var logs testenv.SyncBuffer
	f, err := newWithClock(policy.Config{Raw: json.RawMessage(`{"jwks_url":"` + url + `"}`),
		Log: logging.New(&logs, "agent", zerolog.InfoLevel)}, time.Now)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	testenv.WaitFor(t, 10*time.Second, "the failure logged", func() bool {
		return strings.Contains(logs.String(), "tokens are refused with 503 jwks_unavailable until a set is fetched")
	})
	// The retry a second later fails too, and is not logged again.
	r := f.defaultKeys.(*remoteKeys)
	testenv.WaitFor(t, 10*time.Second, "a retry", func() bool { return r.fetches.Load() >= 2 })
	if n := strings.Count(logs.String(), "JWK set fetch failed"); n != 1 {
		t.Errorf("logged %d times, want once:\n%s", n, logs.String())
	}
}

// TestJWKSBackgroundRefresh checks that the set is refreshed on the interval without any
// request asking for it.
func TestJWKSBackgroundRefresh(t *testing.T) {
	testKeys(t)
	srv := newJWKSServer(t, jwksJSON(t, jwkOf("a", &rsaA.PublicKey)))
	f := newFactory(t, `{"jwks_refresh_interval":"1s"}`, nil, func() time.Time { return fixedNow })
	p := build(t, f, map[string]string{"jwks_url": srv.URL})
	testenv.WaitFor(t, 10*time.Second, "first fetch", func() bool { return srv.hits.Load() == 1 })
	srv.set("", jwksJSON(t, jwkOf("b", &rsaB.PublicKey)))
	testenv.WaitFor(t, 10*time.Second, "refresh", func() bool { return srv.hits.Load() >= 2 })
	testenv.WaitFor(t, 10*time.Second, "new set", func() bool {
		_, known := remoteOf(t, p).set.Load().candidates("b", "RS256")
		return known
	})
	n := srv.hits.Load()
	allowed(t, run(t, p, bearer(sign(t, jwt.SigningMethodRS256, rsaB, "b", baseClaims()))))
	if srv.hits.Load() > n+1 {
		t.Errorf("the request fetched the set itself")
	}
}

// TestJWKSBodyCap checks that an oversized answer is refused.
func TestJWKSBodyCap(t *testing.T) {
	srv := newJWKSServer(t, []byte(`{"keys":[],"pad":"`+strings.Repeat("x", maxJWKSBody)+`"}`))
	r := newRemoteKeys(srv.URL, time.Hour, time.Second, time.Now)
	defer r.transport.CloseIdleConnections()
	_, err := r.get(t.Context())
	if err == nil || !strings.Contains(err.Error(), "exceeds 1048576 bytes") {
		t.Errorf("oversized set: %v", err)
	}
	srv.set("error", nil)
	if _, err := r.get(t.Context()); err == nil || !strings.Contains(err.Error(), "status 503") {
		t.Errorf("status 503: %v", err)
	}
}

// TestJWKSRedirects checks that a redirect must land on an acceptable URL.
func TestJWKSRedirects(t *testing.T) {
	testKeys(t)
	keys := newJWKSServer(t, jwksJSON(t, jwkOf("a", &rsaA.PublicKey)))
	redir := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/ok":
			http.Redirect(w, r, keys.URL, http.StatusFound)
		case "/insecure":
			http.Redirect(w, r, "http://auth.example.com/keys", http.StatusFound)
		default:
			http.Redirect(w, r, r.URL.Path, http.StatusFound)
		}
	}))
	defer redir.Close()
	r := newRemoteKeys(redir.URL, time.Hour, time.Second, time.Now)
	defer r.transport.CloseIdleConnections()
	for path, want := range map[string]string{
		"/ok":       "",
		"/insecure": "http is allowed only for a loopback host",
		"/loop":     "stopped after 3 redirects",
	} {
		r.url = redir.URL + path
		_, err := r.get(t.Context())
		if (want == "" && err != nil) || (want != "" && (err == nil || !strings.Contains(err.Error(), want))) {
			t.Errorf("%s: %v, want %q", path, err, want)
		}
	}
	r.url = "http://[::1"
	if _, err := r.get(t.Context()); err == nil {
		t.Error("want an error for an unparsable URL")
	}
}

func TestCheckJWKSURL(t *testing.T) {
	f := func(u, want string) {
		t.Helper()
		err := checkJWKSURL(u)
		if (want == "" && err != nil) || (want != "" && (err == nil || err.Error() != want)) {
			t.Errorf("checkJWKSURL(%q) = %v, want %q", u, err, want)
		}
	}
	f("https://auth.example.com/.well-known/jwks.json", "")
	f("http://127.0.0.1:8080/keys", "")
	f("http://localhost/keys", "")
	f("http://[::1]:80/keys", "")
	f("http://10.0.0.1/keys", `URL "http://10.0.0.1/keys": http is allowed only for a loopback host; use https`)
	f("https://user:pw@auth.example.com/", `URL "https://user:xxxxx@auth.example.com/" must not hold credentials`)
	f("/keys", `URL "/keys" has no host`)
	f("https://a b/", `invalid URL "https://a b/"`)
	f("file://host/etc/keys", `URL "file://host/etc/keys": scheme must be https`)
}

func TestRegistryRelease(t *testing.T) {
	g := sharedRegistry(&sync.Map{})
	k := remoteKey{url: "http://127.0.0.1:1/", interval: time.Hour, timeout: 50 * time.Millisecond}
	a := g.acquire(k, time.Now, nil)
	b := g.acquire(k, time.Now, nil)
	if a != b {
		t.Fatal("one key, two caches")
	}
	g.release(k)
	select {
	case <-a.done:
		t.Fatal("stopped while still referenced")
	default:
	}
	g.release(k)
	<-a.done
	g.release(k) // a release without a reference is ignored
	if len(g.entries) != 0 {
		t.Errorf("entries left: %v", g.entries)
	}
}
