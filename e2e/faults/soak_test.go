package faults

import (
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

const soakKernelYAML = `policy_kernel:
  version: soak-%d
  server: {message_timeout_ms: 500}
  agents:
    - name: a
      socket_path: "{{SOCK}}"
      timeout_ms: 400
      health_check_interval_ms: 2000
  route_policies:
    - route_name: /key
      request_policy_chain: [{policy: apiKeyAuth}]
      response_policy_chain: [{policy: addSecurityHeaders, metadata: {headers: {X-Frame-Options: DENY}}}]
    - route_name: /tagged
      request_policy_chain: [{policy: testTag, metadata: {tag: t}}]
      response_policy_chain: [{policy: testTag, metadata: {tag: t}}]
    - route_name: /body
      request_policy_chain: [{policy: testBody}]
      response_policy_chain: [{policy: testBody}]
  default_policy:
    request_policy_chain: [{policy: allowAll}]
`

// sample is one reading of both processes.
type sample struct {
	at                    time.Duration
	requests              int
	kernelRSS, agentRSS   int // KiB
	kernelGor, agentGor   int
	kernelHeap, agentHeap float64 // MiB in use
}

// TestSoak runs a moderate, steady mix of requests (allowed, denied, with bodies, ended early by
// Envoy) for FAULTS_SOAK (make soak: 10m), with a config reload every minute, and checks that
// the memory and goroutines of both processes stay flat and that no request is lost.
func TestSoak(t *testing.T) {
	d, err := time.ParseDuration(os.Getenv("FAULTS_SOAK"))
	if err != nil || d <= 0 {
		t.Skip("set FAULTS_SOAK to a duration (make soak) to run the soak test")
	}
	const rate = 200 // requests per second
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: strings.Replace(agentYAML, "observability:", "observability:\n    log_level: warn", 1),
		KernelYAML: fmt.Sprintf(soakKernelYAML, 0), AgentBin: testenv.Build(t, testenv.TestAgentPackage)})
	c := e.Dial(t, envoyConfig)
	conn, err := grpc.NewClient(e.KernelAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// At rest, after one exchange on each route: the goroutines to come back to.
	for _, p := range []string{"/key", "/tagged", "/body"} {
		play(c, p, keyed(p))
	}
	time.Sleep(200 * time.Millisecond)
	restKernel, restAgent := goroutines(t, e.Get), goroutines(t, e.GetAgent)
	var lost, wrong atomic.Int64
	var sent atomic.Int64
	tick := time.NewTicker(time.Second / rate)
	defer tick.Stop()
	stop := make(chan struct{})
	done := make(chan struct{})
	sem := make(chan struct{}, 32)
	go func() {
		defer close(done)
		for n := 0; ; n++ {
			select {
			case <-stop:
				for range cap(sem) {
					sem <- struct{}{}
				}
				return
			case <-tick.C:
			}
			sem <- struct{}{}
			go func() {
				defer func() { <-sem }()
				sent.Add(1)
				if n%50 == 49 {
					// Envoy ends a stream early now and then.
					if err := earlyEnds[n/50%len(earlyEnds)].play(conn); err != nil {
						wrong.Add(1)
						t.Logf("early end: %v", err)
					}
					return
				}
				var req *envoytest.Request
				want := "upstream"
				switch n % 5 {
				case 0:
					req = keyed("/key")
				case 1:
					req, want = request("/key", [2]string{"x-api-key", "wrong"}), "403 forbidden"
				case 2:
					req = request("/tagged")
				case 3:
					req = request("/body")
					req.Method, req.Body = "POST", []byte(strings.Repeat(`{"k":"v"}`, n%200+1))
				default:
					req = request("/anything/else")
				}
				s := play(c, req.Path, req)
				switch {
				case !s.kernelAnswered():
					lost.Add(1)
					t.Logf("lost: %s", s.outcome())
				case s.outcome() != want:
					wrong.Add(1)
					t.Logf("%s: %s, want %s", req.Path, s.outcome(), want)
				}
			}()
		}
	}()

	var samples []sample
	start := time.Now()
	read := func() {
		s := sample{at: time.Since(start).Round(time.Second), requests: int(sent.Load())}
		s.kernelRSS, _ = testenv.RSSKiB(e.Kernel.PID())
		s.agentRSS, _ = testenv.RSSKiB(e.Agent.PID())
		s.kernelGor = goroutines(t, e.Get)
		s.agentGor = goroutines(t, e.GetAgent)
		_, km := e.Get(t, "/metrics")
		_, am := e.GetAgent(t, "/metrics")
		s.kernelHeap = testenv.Metric(km, "go_memstats_heap_inuse_bytes") / (1 << 20)
		s.agentHeap = testenv.Metric(am, "go_memstats_heap_inuse_bytes") / (1 << 20)
		samples = append(samples, s)
	}
	every := max(d/40, 5*time.Second)
	reloads := 0
	for time.Since(start) < d {
		time.Sleep(every)
		read()
		if time.Since(start) > time.Duration(reloads+1)*time.Minute {
			reloads++
			writeAtomically(t, e, e.KernelConfig, fmt.Sprintf(soakKernelYAML, reloads))
			hupCounted(t, e.Kernel, e.Get, `policy_kernel_config_reload_total{status="success"}`)
		}
	}
	close(stop)
	<-done
	alive(t, e)
	c.Close()
	conn.Close()
	kernelRest := settles(t, e.Get, restKernel+2)
	agentRest := settles(t, e.GetAgent, restAgent+2)

	var b strings.Builder
	fmt.Fprintf(&b, "| time | requests | kernel RSS MiB | kernel heap MiB | kernel goroutines | agent RSS MiB | agent heap MiB | agent goroutines |\n")
	fmt.Fprintf(&b, "| --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for _, s := range samples {
		fmt.Fprintf(&b, "| %v | %d | %.1f | %.1f | %d | %.1f | %.1f | %d |\n", s.at, s.requests,
			float64(s.kernelRSS)/1024, s.kernelHeap, s.kernelGor, float64(s.agentRSS)/1024, s.agentHeap, s.agentGor)
	}
	t.Logf("reliability: soak %v at %d req/s, %d reloads: sent=%d lost=%d unexpected=%d; goroutines at rest before/after: kernel %d/%d, agent %d/%d\n%s",
		d, rate, reloads, sent.Load(), lost.Load(), wrong.Load(), restKernel, kernelRest, restAgent, agentRest, b.String())
	if out := os.Getenv("FAULTS_SOAK_REPORT"); out != "" {
		if err := os.WriteFile(out, []byte(b.String()), 0o644); err != nil {
			t.Error(err)
		}
	}
	if lost.Load() != 0 || wrong.Load() != 0 {
		t.Errorf("%d requests lost, %d answered unexpectedly", lost.Load(), wrong.Load())
	}
	if kernelRest > restKernel+2 || agentRest > restAgent+2 {
		t.Errorf("goroutines at rest: kernel %d → %d, agent %d → %d", restKernel, kernelRest, restAgent, agentRest)
	}
	// Flat under load: after the first quarter (warm-up), the last reading is within a small
	// margin of the highest reading of the second quarter.
	q := len(samples) / 4
	if q == 0 {
		return
	}
	base := samples[q]
	for _, s := range samples[q : 2*q] {
		base.kernelRSS, base.agentRSS = max(base.kernelRSS, s.kernelRSS), max(base.agentRSS, s.agentRSS)
		base.kernelGor, base.agentGor = max(base.kernelGor, s.kernelGor), max(base.agentGor, s.agentGor)
	}
	last := samples[len(samples)-1]
	f := func(what string, before, after, slack int) {
		if after > before+slack {
			t.Errorf("%s grew from %d to %d", what, before, after)
		}
	}
	f("kernel RSS (KiB)", base.kernelRSS, last.kernelRSS, base.kernelRSS/10+8<<10)
	f("agent RSS (KiB)", base.agentRSS, last.agentRSS, base.agentRSS/10+8<<10)
	// Goroutines under load follow the requests in flight; 32 at most are.
	f("kernel goroutines", base.kernelGor, last.kernelGor, 40)
	f("agent goroutines", base.agentGor, last.agentGor, 40)
}
