package ops

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/testenv"
	"github.com/policy-engine/policy-engine/internal/tracing/otlptest"
)

// TestLockdownClientCannotForceTracing: a client that sends its own sampled traceparent does not
// get its request traced against the kernel's sampling_rate. It tries the trace ids a ratio
// sampler keyed on the trace id always takes (low 64 bits zero) at a tiny rate, then a sampled
// parent at rate 0; neither is traced by default. With respect_parent_sampling the incoming
// decision is obeyed: the sampled parent is traced at rate 0 (under the client's trace id) and a
// parent marked not sampled is not.
func TestLockdownClientCannotForceTracing(t *testing.T) {
	col, err := otlptest.Start()
	if err != nil {
		t.Fatal(err)
	}
	defer col.Stop()
	kernel := func(version, tracing string) string {
		return fmt.Sprintf(kernelYAML, version) + "  observability:\n    tracing:\n      enabled: true\n      endpoint: " + col.Addr() + "\n" + tracing
	}
	agentCfg := agentYAML + "    tracing:\n      enabled: true\n      endpoint: " + col.Addr() + "\n"
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentCfg, KernelYAML: kernel("tiny", "      sampling_rate: 0.000000001\n")})
	c := e.Dial(t, envoyConfig)
	traceparent := func(lowZero bool, flags string) (string, string) {
		var b [16]byte
		_, _ = rand.Read(b[:])
		if lowZero {
			clear(b[8:])
		}
		id := hex.EncodeToString(b[:])
		return id, "00-" + id + "-" + envoySpanID + "-" + flags
	}
	send := func(n int, lowZero bool, flags string) map[string]bool {
		ids := map[string]bool{}
		for range n {
			id, tp := traceparent(lowZero, flags)
			ids[id] = true
			if r := do(t, c, [2]string{"traceparent", tp}); r.Status != 200 {
				t.Fatalf("status %d", r.Status)
			}
		}
		return ids
	}
	// Spans are exported within the batch timeout (1 s); a reload flushes the previous tracer.
	settle := func() { time.Sleep(3 * time.Second) }
	tracedIn := func(ids map[string]bool) int {
		n := 0
		for _, s := range col.Spans() {
			if ids[s.TraceID] && s.Name == "ext_proc stream" {
				n++
			}
		}
		return n
	}

	forced := send(20, true, "01")
	settle()
	if n := tracedIn(forced); n != 0 {
		t.Fatalf("sampling_rate 1e-9: %d of 20 client-chosen sampled trace ids traced", n)
	}

	e.WriteConfig(t, e.KernelConfig, kernel("zero", "      sampling_rate: 0\n"))
	e.Reload(t, "config reloaded")
	sampled := send(5, false, "01")
	settle()
	if n := tracedIn(sampled); n != 0 {
		t.Fatalf("sampling_rate 0: %d of 5 sampled parents traced", n)
	}

	e.WriteConfig(t, e.KernelConfig, kernel("respect", "      sampling_rate: 0\n      respect_parent_sampling: true\n"))
	e.Reload(t, "config reloaded")
	sampled = send(5, false, "01")
	unsampled := send(5, false, "00")
	settle()
	if n := tracedIn(sampled); n != 5 {
		t.Fatalf("respect_parent_sampling: %d of 5 sampled parents traced, want 5", n)
	}
	if n := tracedIn(unsampled); n != 0 {
		t.Fatalf("respect_parent_sampling: %d of 5 parents marked not sampled traced", n)
	}
	for _, s := range col.Spans() {
		if s.Name == "ext_proc stream" && sampled[s.TraceID] && s.ParentSpanID != envoySpanID {
			t.Fatalf("stream span %+v is not a child of the client's span", s)
		}
		if strings.HasPrefix(s.Name, "policy ") && forced[s.TraceID] {
			t.Fatalf("agent span under a forced trace: %+v", s)
		}
	}
}
