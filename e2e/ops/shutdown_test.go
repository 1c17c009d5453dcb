package ops

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// TestSIGTERMDrains holds an HTTP exchange open across SIGTERM and shows the order of a
// graceful shutdown: readiness and gRPC health turn false at once, new streams are still
// served during drain_delay_ms and refused after it, the open exchange finishes (its response
// chain runs), and the process exits 0.
func TestSIGTERMDrains(t *testing.T) {
	const drainDelay = 1500 * time.Millisecond
	kernelCfg := strings.Replace(fmt.Sprintf(kernelYAML, "d1"), "    message_timeout_ms: 2000\n",
		"    message_timeout_ms: 2000\n    drain_delay_ms: 1500\n    shutdown_timeout_ms: 20000\n", 1)
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: kernelCfg})
	c := e.Dial(t, envoyConfig)

	reached, release := make(chan struct{}), make(chan struct{})
	held := make(chan *envoytest.Result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		r, err := c.Do(ctx, &envoytest.Request{
			Path:       "/api/v1/users",
			Headers:    [][2]string{{"x-api-key", "demo-key-123"}},
			Attributes: map[string]string{"xds.route_name": "/api/v1/users"},
		}, func(*envoytest.Forwarded) *envoytest.Response {
			close(reached)
			<-release
			return &envoytest.Response{Status: 200, Body: []byte("slow")}
		})
		if err != nil {
			t.Error(err)
		}
		held <- r
	}()
	select {
	case <-reached:
	case <-time.After(10 * time.Second):
		t.Fatal("the held request did not reach the upstream")
	}
	if _, m := e.Get(t, "/metrics"); !strings.Contains(m, "policy_kernel_streams_active 1") {
		t.Fatal("the held exchange is not an open stream")
	}

	sigterm := time.Now()
	if err := e.Kernel.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, time.Second, "readiness off", func() bool {
		c, b := ready(t, e)
		return c == 503 && b.Draining && len(b.NotReady) == 1 && b.NotReady[0] == "shutting down"
	})
	if st := grpcHealth(t, e.KernelAddr); st != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("gRPC health during drain: %v", st)
	}
	if r := do(t, c); r.Status != 200 || time.Since(sigterm) >= drainDelay {
		t.Fatalf("a new stream during the drain delay: %d after %v", r.Status, time.Since(sigterm))
	}

	var refused *envoytest.Result
	testenv.WaitFor(t, 10*time.Second, "new streams refused", func() bool {
		r := do(t, c)
		if r.Status == 200 {
			return false
		}
		refused = r
		return true
	})
	if since := time.Since(sigterm); since < drainDelay {
		t.Fatalf("new streams refused after %v, before the drain delay", since)
	}
	if refused.Status != 500 || refused.Forwarded != nil || !strings.HasPrefix(refused.Details, envoytest.DetailsGRPCErrorPrefix+"14") {
		t.Fatalf("refused stream: %d %q", refused.Status, refused.Details)
	}
	if e.Kernel.Exited() {
		t.Fatal("the kernel exited with an exchange still open")
	}

	close(release)
	r := <-held
	if r == nil || r.Status != 200 || string(r.Body) != "slow" || testenv.Header(r.Headers, "x-config-version") != "d1" {
		t.Fatalf("the held exchange did not finish through its response chain: %+v", r)
	}
	err, ok := e.Kernel.Wait(10 * time.Second)
	if !ok {
		t.Fatal("the kernel did not exit after its last stream")
	}
	if err != nil {
		t.Fatalf("exit: %v\n%s", err, e.Kernel.Logs.String())
	}
	logs := e.Kernel.Logs.String()
	for _, want := range []string{"shutting down: draining", `"message":"stopped"`} {
		if !strings.Contains(logs, want) {
			t.Errorf("kernel log lacks %s", want)
		}
	}
}

// TestAgentSIGTERM shows the agent finishing and exiting 0 on SIGTERM.
func TestAgentSIGTERM(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: fmt.Sprintf(kernelYAML, "d2")})
	if err := e.Agent.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	err, ok := e.Agent.Wait(10 * time.Second)
	if !ok || err != nil {
		t.Fatalf("agent exit: %v %v\n%s", ok, err, e.Agent.Logs.String())
	}
	if !strings.Contains(e.Agent.Logs.String(), `"message":"stopped"`) {
		t.Fatalf("agent log:\n%s", e.Agent.Logs.String())
	}
}
