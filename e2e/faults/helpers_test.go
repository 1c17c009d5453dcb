package faults

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// full reports whether the long form of the suite runs (make faults): longer traffic, more
// cycles. The short form is what make test runs.
func full() bool { return os.Getenv("FAULTS_FULL") != "" }

// scale picks the short or the long value.
func scale[T any](short, long T) T {
	if full() {
		return long
	}
	return short
}

// envoyConfig is the filter config of the README's Envoy example, but for its message timeout:
// a second instead of 200 ms. The suite runs on shared machines where a process can lose the
// CPU for a few hundred milliseconds, and a late answer is not a lost one; each test asserts the
// bound the kernel promises (its answer within the agent's timeout and a margin) on the latency
// it measures.
var envoyConfig = envoytest.FilterConfig{
	AllowModeOverride: true,
	RequestAttributes: []string{"xds.route_name", "source.address"},
	MessageTimeout:    time.Second,
}

// margin is what the latency bounds allow beyond the kernel's own timeouts, for a machine that
// is busy with other work.
const margin = 750 * time.Millisecond

// shot is one HTTP request played through the filter.
type shot struct {
	route   string
	start   time.Time
	latency time.Duration
	res     *envoytest.Result
	err     error
}

// kernelAnswered reports whether the kernel answered the request itself: not Envoy's message
// timeout, not a failed stream, not a reply Envoy rejects.
func (s shot) kernelAnswered() bool {
	if s.err != nil || s.res == nil {
		return false
	}
	d := s.res.Details
	return d != envoytest.DetailsMessageTimeout && d != envoytest.DetailsSpurious && d != envoytest.DetailsUnhandled &&
		!strings.HasPrefix(d, envoytest.DetailsGRPCErrorPrefix)
}

// outcome names the answer: "upstream" for a request that reached the upstream, else the status
// and the JSON error code of the local reply.
func (s shot) outcome() string {
	switch {
	case s.err != nil:
		return "no answer: " + s.err.Error()
	case !s.kernelAnswered():
		return fmt.Sprintf("envoy %d %s", s.res.Status, s.res.Details)
	case s.res.Forwarded != nil && !s.res.LocalReply:
		return "upstream"
	}
	return fmt.Sprintf("%d %s", s.res.Status, errorCode(s.res.Body))
}

func errorCode(body []byte) string {
	var b struct {
		Error string `json:"error"`
	}
	if json.Unmarshal(body, &b) != nil {
		return fmt.Sprintf("(body %.40q)", body)
	}
	return b.Error
}

// request makes a request on path with the given headers.
func request(path string, headers ...[2]string) *envoytest.Request {
	return &envoytest.Request{Method: "GET", Path: path, Authority: "api.example.com", Headers: headers,
		Attributes: map[string]string{"source.address": "192.0.2.10:40000"}}
}

// okUpstream answers 200 with a small JSON body.
func okUpstream(*envoytest.Forwarded) *envoytest.Response {
	return &envoytest.Response{Status: 200, Headers: [][2]string{{"content-type", "application/json"}}, Body: []byte(`{"ok":true}`)}
}

// play runs one request and times it.
func play(c *envoytest.Client, route string, req *envoytest.Request) shot {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s := shot{route: route, start: time.Now()}
	s.res, s.err = c.Do(ctx, req, okUpstream)
	s.latency = time.Since(s.start)
	return s
}

// traffic is steady load: workers that each play a request, pause, and play the next, until
// stopped.
type traffic struct {
	mu    sync.Mutex
	shots []shot
	stop  chan struct{}
	wg    sync.WaitGroup
}

// startTraffic starts workers that play next(worker, n) in a loop with pause between requests.
func startTraffic(c *envoytest.Client, workers int, pause time.Duration, next func(worker, n int) (string, *envoytest.Request)) *traffic {
	tr := &traffic{stop: make(chan struct{})}
	for w := range workers {
		tr.wg.Add(1)
		go func() {
			defer tr.wg.Done()
			for n := 0; ; n++ {
				select {
				case <-tr.stop:
					return
				default:
				}
				route, req := next(w, n)
				s := play(c, route, req)
				tr.mu.Lock()
				tr.shots = append(tr.shots, s)
				tr.mu.Unlock()
				select {
				case <-tr.stop:
					return
				case <-time.After(pause):
				}
			}
		}()
	}
	return tr
}

// count returns how many requests have been played so far.
func (tr *traffic) count() int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return len(tr.shots)
}

// finish stops the workers and returns every request played, in start order.
func (tr *traffic) finish() []shot {
	close(tr.stop)
	tr.wg.Wait()
	sort.Slice(tr.shots, func(i, j int) bool { return tr.shots[i].start.Before(tr.shots[j].start) })
	return tr.shots
}

// tally is the request accounting of a run: sent, answered by the kernel, lost, by outcome,
// and the slowest answer.
type tally struct {
	sent, answered int
	outcomes       map[string]int
	maxLatency     time.Duration
}

func count(shots []shot) tally {
	t := tally{outcomes: map[string]int{}}
	for _, s := range shots {
		t.sent++
		if s.kernelAnswered() {
			t.answered++
		}
		t.outcomes[s.outcome()]++
		t.maxLatency = max(t.maxLatency, s.latency)
	}
	return t
}

func (t tally) lost() int { return t.sent - t.answered }

// report logs the run's figures in the form docs/reliability.md quotes.
func (t tally) report(tb testing.TB, name string) {
	tb.Helper()
	keys := make([]string, 0, len(t.outcomes))
	for k := range t.outcomes {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s ×%d", k, t.outcomes[k]))
	}
	tb.Logf("reliability: %s: sent=%d answered=%d lost=%d max_latency=%v outcomes: %s",
		name, t.sent, t.answered, t.lost(), t.maxLatency.Round(time.Millisecond), strings.Join(parts, ", "))
}

// requestsCounted is the kernel's count of requests on a route, every status added up.
func requestsCounted(t *testing.T, e *testenv.Env, route string) int {
	t.Helper()
	_, body := e.Get(t, "/metrics")
	return int(testenv.SumMetrics(body, `policy_kernel_requests_total{route="`+route+`"`))
}

// metric reads one series of the kernel's metrics.
func metric(t *testing.T, e *testenv.Env, series string) float64 {
	t.Helper()
	_, body := e.Get(t, "/metrics")
	return testenv.Metric(body, series)
}

// agentMetric reads one series of the agent's metrics.
func agentMetric(t *testing.T, e *testenv.Env, series string) float64 {
	t.Helper()
	_, body := e.GetAgent(t, "/metrics")
	return testenv.Metric(body, series)
}

// writeAtomically replaces a config file in one rename, so that a reload never reads half of
// it.
func writeAtomically(t *testing.T, e *testenv.Env, path, yaml string) {
	t.Helper()
	tmp := path + ".tmp"
	e.WriteConfig(t, tmp, yaml)
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// alive fails the test if either process has exited.
func alive(t *testing.T, e *testenv.Env) {
	t.Helper()
	if e.Kernel.Exited() {
		t.Fatalf("the kernel exited:\n%s", e.Kernel.Logs.String())
	}
	if e.Agent != nil && e.Agent.Exited() {
		t.Fatalf("the agent exited:\n%s", e.Agent.Logs.String())
	}
}
