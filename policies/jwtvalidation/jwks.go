package jwtvalidation

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/policy-engine/policy-engine/agent/policy"
	"github.com/policy-engine/policy-engine/internal/logging"
)

// maxJWKSBody caps the size of a fetched JWK Set; real sets are a few kilobytes.
const maxJWKSBody = 1 << 20

// maxRetryBackoff is the longest wait between two attempts while fetches fail, unless the
// refresh interval is shorter.
const maxRetryBackoff = time.Minute

// keyProvider gives a policy the keys to verify tokens with.
type keyProvider interface {
	// keys returns the current key set. A remote set whose first fetch is still running is
	// waited for until policy.AnswerBy(ctx), so that the policy's own answer (503) reaches the
	// kernel before the kernel gives up on the agent; errKeysUnavailable when there is none.
	keys(ctx context.Context) (*keySet, error)
	// refetch is called for a token whose kid the set does not know. It never waits: it asks
	// for a fetch in the background, at most once per refresh interval, and returns the newest
	// set there is now (which may be newer than the caller's), or nil when the source never
	// changes.
	refetch() *keySet
}

// staticKeys is a key set read once from the config: a PEM key, a JWKS file or an HMAC secret.
type staticKeys struct{ set *keySet }

func (s staticKeys) keys(context.Context) (*keySet, error) { return s.set, nil }
func (s staticKeys) refetch() *keySet                      { return nil }

// errKeysUnavailable means that a remote key set has never been fetched successfully.
var errKeysUnavailable = errors.New("signing keys unavailable")

// remoteKeys is a JWK Set fetched from a URL and kept fresh by one goroutine. It is shared by
// every factory that names the same URL with the same interval and timeout, across config
// reloads, through a reference-counted registry.
type remoteKeys struct {
	url       string
	interval  time.Duration
	timeout   time.Duration
	now       func() time.Time
	client    *http.Client
	transport *http.Transport

	set atomic.Pointer[keySet]
	// ready is closed when the first fetch has finished, successfully or not.
	ready chan struct{}
	// kick asks the refresher for a fetch now.
	kick   chan struct{}
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	// fetches counts fetch attempts.
	fetches atomic.Int64
	// log reports failed fetches, at most one every failLog interval; nil discards.
	log     *logging.Logger
	failLog *logging.Throttle

	mu      sync.Mutex
	lastErr error
	// lastKick is when an unknown kid last caused a fetch.
	lastKick time.Time
}

func newRemoteKeys(rawURL string, interval, timeout time.Duration, now func() time.Time) *remoteKeys {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = 1
	tr.ResponseHeaderTimeout = timeout
	ctx, cancel := context.WithCancel(context.Background())
	r := &remoteKeys{
		url:       rawURL,
		interval:  interval,
		timeout:   timeout,
		now:       now,
		transport: tr,
		ready:     make(chan struct{}),
		kick:      make(chan struct{}, 1),
		ctx:       ctx,
		cancel:    cancel,
		done:      make(chan struct{}),
		failLog:   logging.NewThrottle(10 * time.Second),
	}
	r.client = &http.Client{
		Transport: tr,
		Timeout:   timeout,
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if len(via) >= 3 {
				return errors.New("stopped after 3 redirects")
			}
			return checkJWKSURL(req.URL.String())
		},
	}
	return r
}

// start runs the refresher: one fetch now, then one every interval; after a failed fetch the
// next attempt comes sooner, with a doubling backoff capped by the interval.
func (r *remoteKeys) start() { go r.run() }

func (r *remoteKeys) run() {
	defer close(r.done)
	backoff := time.Second
	r.fetch()
	close(r.ready)
	for {
		wait := r.interval
		if r.failing() {
			wait = min(backoff, r.interval)
			backoff = min(2*backoff, maxRetryBackoff)
		} else {
			backoff = time.Second
		}
		t := time.NewTimer(wait)
		select {
		case <-r.ctx.Done():
			t.Stop()
			return
		case <-t.C:
			r.fetch()
		case <-r.kick:
			t.Stop()
			r.fetch()
		}
	}
}

// stop ends the refresher, aborting a fetch in flight, and closes idle connections.
func (r *remoteKeys) stop() {
	r.cancel()
	<-r.done
	r.transport.CloseIdleConnections()
}

func (r *remoteKeys) failing() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lastErr != nil
}

func (r *remoteKeys) keys(ctx context.Context) (*keySet, error) {
	if s := r.set.Load(); s != nil {
		return s, nil
	}
	r.waitFirst(ctx)
	if s := r.set.Load(); s != nil {
		return s, nil
	}
	return nil, errKeysUnavailable
}

// waitFirst waits for the first fetch to finish, but only until policy.AnswerBy(ctx): the
// kernel stops waiting for the agent at the chain's deadline and then applies fail_open, so
// waiting for a slow key server until then would let a forged token through a fail-open
// agent. The timer is made only on this path, while the agent has never had keys.
func (r *remoteKeys) waitFirst(ctx context.Context) {
	select {
	case <-r.ready:
		return
	case <-r.done:
		return
	default:
	}
	var expired <-chan time.Time
	if by, ok := policy.AnswerBy(ctx); ok {
		wait := time.Until(by)
		if wait <= 0 {
			return
		}
		t := time.NewTimer(wait)
		defer t.Stop()
		expired = t.C
	}
	select {
	case <-r.ready:
	case <-r.done:
	case <-ctx.Done():
	case <-expired:
	}
}

// refetch asks for the set again for a token with an unknown kid, at most once per interval:
// tokens with made-up kids cannot make the agent hammer the issuer. It never waits for the
// fetch: the token is refused at once (a request held for the issuer would hand its answer to
// the kernel's fail_open), and the tokens that come after the fetch see the new set.
func (r *remoteKeys) refetch() *keySet {
	r.mu.Lock()
	if r.lastKick.IsZero() || r.now().Sub(r.lastKick) >= r.interval {
		r.lastKick = r.now()
		select {
		case r.kick <- struct{}{}:
		default: // a fetch is already asked for
		}
	}
	r.mu.Unlock()
	// A fetch may have ended since the caller read the set.
	return r.set.Load()
}

// fetch gets the set once; on failure the last good set stays in use.
func (r *remoteKeys) fetch() {
	r.fetches.Add(1)
	ctx, cancel := context.WithTimeout(r.ctx, r.timeout)
	defer cancel()
	set, err := r.get(ctx)
	if err == nil {
		r.set.Store(set)
	} else if r.ctx.Err() == nil {
		r.reportFailure(err)
	}
	r.mu.Lock()
	r.lastErr = err
	r.mu.Unlock()
}

// reportFailure logs a failed fetch, at most once per failLog interval, saying what it means
// for requests.
func (r *remoteKeys) reportFailure(err error) {
	if !r.failLog.Allow() {
		return
	}
	ev := r.log.Warn()
	if ev == nil {
		return
	}
	msg := "JWK set fetch failed; the last good set stays in use"
	if r.set.Load() == nil {
		msg = "JWK set fetch failed; tokens are refused with 503 jwks_unavailable until a set is fetched"
	}
	ev.Str("policy", Name).Str("error", err.Error()).Msg(msg)
}

func (r *remoteKeys) get(ctx context.Context) (*keySet, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.url, nil)
	if err != nil {
		return nil, fmt.Errorf("fetch JWK set from %q: %w", r.url, err)
	}
	req.Header.Set("Accept", "application/jwk-set+json, application/json")
	resp, err := r.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetch JWK set: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("fetch JWK set from %q: status %d", r.url, resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxJWKSBody+1))
	if err != nil {
		return nil, fmt.Errorf("read JWK set from %q: %w", r.url, err)
	}
	if len(body) > maxJWKSBody {
		return nil, fmt.Errorf("JWK set from %q exceeds %d bytes", r.url, maxJWKSBody)
	}
	set, err := parseJWKS(body)
	if err != nil {
		return nil, fmt.Errorf("JWK set from %q: %w", r.url, err)
	}
	return set, nil
}

// health reports an error while the set has never been fetched. A set that was fetched once
// keeps serving when later fetches fail, so that is not an error.
func (r *remoteKeys) health() error {
	if r.set.Load() != nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.lastErr != nil {
		return r.lastErr
	}
	return fmt.Errorf("JWK set from %q not fetched yet", r.url)
}

// checkJWKSURL accepts https URLs, and http URLs only for a loopback host, since keys fetched
// in clear over a network could be replaced by anyone on the path.
func checkJWKSURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("invalid URL %q", s)
	}
	if u.Host == "" {
		return fmt.Errorf("URL %q has no host", s)
	}
	if u.User != nil {
		return fmt.Errorf("URL %q must not hold credentials", u.Redacted())
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if isLoopback(u.Hostname()) {
			return nil
		}
		return fmt.Errorf("URL %q: http is allowed only for a loopback host; use https", s)
	default:
		return fmt.Errorf("URL %q: scheme must be https", s)
	}
}

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// remoteKey identifies a shared remote set.
type remoteKey struct {
	url      string
	interval time.Duration
	timeout  time.Duration
}

// registry holds the remote sets of every factory made from one policy.Config.Shared.
type registry struct {
	mu      sync.Mutex
	entries map[remoteKey]*registryEntry
}

type registryEntry struct {
	keys *remoteKeys
	refs int
}

// sharedKey is the key of the registry in policy.Config.Shared; a private type, so no other
// policy can collide with it.
type sharedKey struct{}

func sharedRegistry(m *sync.Map) *registry {
	if v, ok := m.Load(sharedKey{}); ok {
		return v.(*registry)
	}
	v, _ := m.LoadOrStore(sharedKey{}, &registry{entries: map[remoteKey]*registryEntry{}})
	return v.(*registry)
}

// acquire returns the shared set for k, starting its refresher when it is the first user, who
// also gives it the logger.
func (g *registry) acquire(k remoteKey, now func() time.Time, log *logging.Logger) *remoteKeys {
	g.mu.Lock()
	defer g.mu.Unlock()
	if e, ok := g.entries[k]; ok {
		e.refs++
		return e.keys
	}
	r := newRemoteKeys(k.url, k.interval, k.timeout, now)
	r.log = log
	g.entries[k] = &registryEntry{keys: r, refs: 1}
	r.start()
	return r
}

// release drops one reference; the last one stops the refresher.
func (g *registry) release(k remoteKey) {
	g.mu.Lock()
	e, ok := g.entries[k]
	if !ok {
		g.mu.Unlock()
		return
	}
	e.refs--
	if e.refs > 0 {
		g.mu.Unlock()
		return
	}
	delete(g.entries, k)
	g.mu.Unlock()
	e.keys.stop()
}
