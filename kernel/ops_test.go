package kernel

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/testenv"
	"github.com/policy-engine/policy-engine/internal/tracing"
	"github.com/policy-engine/policy-engine/internal/tracing/otlptest"
)

const authSchema = `{"type":"object","additionalProperties":false,"required":["header_name"],"properties":{` +
	`"header_name":{"type":"string","minLength":1},"required":{"type":"boolean"},"rate":{"type":"integer","minimum":1},` +
	`"ratio":{"type":"number"},"roles":{"type":"array","items":{"type":"string"}},"headers":{"type":"object"},` +
	`"mode":{"enum":["a","b"]},"either":{"type":["integer","string"]},"maybe":{"type":["null","boolean"]}}}`

func TestCoerce(t *testing.T) {
	f := func(v string, types []string, want string) {
		t.Helper()
		b, _ := json.Marshal(coerce(v, types))
		if string(b) != want {
			t.Errorf("coerce(%q, %v) = %s, want %s", v, types, b, want)
		}
	}
	f("true", []string{"boolean"}, `true`)
	f("yes", []string{"boolean"}, `"yes"`)
	f(" 42 ", []string{"integer"}, `42`)
	f("4.5", []string{"integer"}, `"4.5"`)
	f("4.5", []string{"number"}, `4.5`)
	f("x", []string{"number"}, `"x"`)
	f(`["a","b"]`, []string{"array"}, `["a","b"]`)
	f(`{"a":1}`, []string{"array"}, `"{\"a\":1}"`)
	f(`{"a":1}`, []string{"object"}, `{"a":1}`)
	f(`{"a":1} x`, []string{"object"}, `"{\"a\":1} x"`)
	f("", []string{"null", "boolean"}, `null`)
	f("7", []string{"integer", "string"}, `7`)
	f("seven", []string{"integer", "string"}, `"seven"`)
	f("42", []string{"string"}, `"42"`)
	f(` [1, 2]`, nil, `[1,2]`)
	f(`{broken`, nil, `"{broken"`)
	f("plain", nil, `"plain"`)
}

func TestMetadataSchema(t *testing.T) {
	f := func(md map[string]string, want ...string) {
		t.Helper()
		var got []string
		for _, p := range checkMetadata(authSchema, md) {
			got = append(got, p.key+": "+p.msg)
		}
		if strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Errorf("checkMetadata(%v):\n%s\nwant:\n%s", md, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	}
	f(map[string]string{"header_name": "X-Key", "required": "false", "rate": "5", "ratio": "0.5", "roles": `["admin"]`, "headers": `{"a":"b"}`, "mode": "a", "either": "x", "maybe": ""})
	f(map[string]string{}, ": missing property 'header_name'")
	f(map[string]string{"header_name": "", "required": "maybe", "rate": "0", "bogus": "1", "other": "2"},
		"bogus: unknown key",
		"header_name: minLength: got 0, want 1",
		"other: unknown key",
		"rate: minimum: got 0, want 1",
		"required: got string, want boolean")
	f(map[string]string{"header_name": "h", "roles": `[1]`, "mode": "c"},
		"mode: value must be one of 'a', 'b'",
		"roles.0: got number, want string")

	if checkMetadata("", map[string]string{"x": "y"}) != nil {
		t.Error("no schema must mean no problems")
	}
	if checkMetadata(`{"type":`, map[string]string{"x": "y"}) != nil {
		t.Error("a schema that does not parse must not fail the config")
	}
	if checkMetadata(`{"type":"nonsense"}`, map[string]string{"x": "y"}) != nil {
		t.Error("a schema that does not compile must not fail the config")
	}
	a, err := compileMetadataSchema(authSchema)
	b, _ := compileMetadataSchema(authSchema)
	if err != nil || a != b {
		t.Error("compiled schemas are not cached")
	}
	if ms, err := compileMetadataSchema("  "); ms != nil || err != nil {
		t.Error("a blank schema")
	}
}

// TestCompiledInPolicySchemas compiles the metadata schema of every policy compiled into the
// agent: a schema the kernel cannot compile would go unchecked.
func TestCompiledInPolicySchemas(t *testing.T) {
	mods := policy.Modules()
	if len(mods) < 3 {
		t.Fatalf("only %d policies registered", len(mods))
	}
	for _, m := range mods {
		if m.MetadataSchema == "" {
			t.Errorf("policy %q publishes no metadata schema", m.Name)
			continue
		}
		if _, err := compileMetadataSchema(m.MetadataSchema); err != nil {
			t.Errorf("policy %q: %v", m.Name, err)
		}
	}
}

// FuzzMetadataSchema checks that any metadata map can be checked against a schema without a
// panic, and that a problem always names its key when the schema has properties.
func FuzzMetadataSchema(f *testing.F) {
	f.Add("header_name", "X", "rate", "5")
	f.Add("roles", `["a",1]`, "headers", `{"x":`)
	f.Add("maybe", "null", "either", " 12 ")
	f.Add("", "", "required", "TRUE")
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2 string) {
		for _, p := range checkMetadata(authSchema, map[string]string{k1: v1, k2: v2}) {
			if p.msg == "" {
				t.Fatalf("empty problem for %q=%q %q=%q", k1, v1, k2, v2)
			}
		}
	})
}

// schemaInfo advertises the auth policy with authSchema.
func schemaInfo() *agentv1.GetAgentConfigResponse {
	info := testInfo()
	info.SupportedPolicies[0].MetadataSchema = authSchema
	return info
}

func TestSnapshotMetadataProblems(t *testing.T) {
	k := newTestKernel(t, strings.Replace(baseConfig, "metadata: {header_name: X-Other}", "metadata: {header_name: X-Other, rate: many}", 1), &fakeAgent{info: schemaInfo()})
	snap := k.s.Snapshot()
	var got []string
	for _, p := range snap.problems {
		got = append(got, p.key+" | "+p.msg)
	}
	want := []string{
		`policy_kernel.route_policies[1].request_policy_chain[0].metadata.rate | policy "auth": metadata.rate: got string, want integer`,
		`policy_kernel.route_policies[5].request_policy_chain[0].policy | policy "notThere" is not supported by agent "a"`,
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("problems:\n%s", strings.Join(got, "\n"))
	}
	r, _ := snap.routes.ByName("named-route")
	if r.invalid != `policy "auth": metadata.rate: got string, want integer` {
		t.Fatalf("route invalid %q", r.invalid)
	}
	err := problemsError("kernel.yaml", []byte(strings.Replace(baseConfig, "metadata: {header_name: X-Other}", "metadata: {header_name: X-Other, rate: many}", 1)), snap.problems)
	if err == nil || !strings.Contains(err.Error(), `kernel.yaml:17: policy_kernel.route_policies[1].request_policy_chain[0].metadata.rate: policy "auth"`) ||
		!strings.Contains(err.Error(), `kernel.yaml:28: policy_kernel.route_policies[5].request_policy_chain[0].policy`) {
		t.Fatalf("problemsError: %v", err)
	}
	if problemsError("k.yaml", []byte(":"), nil) == nil {
		t.Fatal("problemsError on a file that does not parse")
	}
}

// tracedKernel is a test kernel whose server traces to an in-test collector.
func tracedKernel(t *testing.T, rate float64) (*testKernel, *otlptest.Collector, *tracing.Tracer) {
	t.Helper()
	col, err := otlptest.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(col.Stop)
	var mu sync.Mutex
	var sent []map[string]string
	fa := &fakeAgent{fn: func(_ context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		mu.Lock()
		sent = append(sent, req.GetTraceContext())
		mu.Unlock()
		if req.GetPhase() == agentv1.PolicyPhase_RESPONSE {
			return &agentv1.PolicyResponse{Status: &agentv1.ResponseStatus{Code: agentv1.StatusCode_POLICY_ERROR, PolicyName: "hdr"}}, nil
		}
		return ok(), nil
	}}
	k := newTestKernel(t, baseConfig, fa)
	tr, err := tracing.New(tracing.Config{Enabled: true, Endpoint: col.Addr(), SamplingRate: &rate}, tracing.Root, "policy-kernel", "t", nil)
	if err != nil {
		t.Fatal(err)
	}
	if prev := k.s.SetTracer(tr); prev != nil {
		t.Fatal("a tracer was already set")
	}
	return k, col, tr
}

func TestStreamSpans(t *testing.T) {
	k, col, tr := tracedKernel(t, 1)
	st := k.open(t)
	st.send(t, reqHeaders("/api/v1/users", false, "", "traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "x-request-id", "r1"))
	st.send(t, respHeaders("200", true))
	st.end(t)
	// A parent marked not sampled: the client's flag does not decide, the kernel's rate (1)
	// does, and the stream is traced under the client's trace id.
	st = k.open(t)
	st.send(t, reqHeaders("/api/v1/users", true, "", "traceparent", "00-0af7651916cd43dd8448eb211c80319d-b7ad6b7169203331-00"))
	st.end(t)
	// An invalid route ends the stream with an error outcome and no agent call.
	st = k.open(t)
	st.send(t, reqHeaders("/broken", true, ""))
	st.end(t)
	if err := tr.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	spans, _ := col.WaitFor(5*time.Second, func(s []otlptest.Span) bool { return len(s) >= 6 })
	var names []string
	for _, s := range spans {
		names = append(names, s.Name+"/"+s.Attributes["outcome"]+"/"+s.Attributes["status"]+"/"+s.StatusCode.String())
	}
	got := strings.Join(names, " ")
	for _, want := range []string{
		"ext_proc stream/error//STATUS_CODE_ERROR", // allowed, then the response chain failed
		"agent call//OK/STATUS_CODE_UNSET",
		"agent call//POLICY_ERROR/STATUS_CODE_UNSET",
		"ext_proc stream/invalid_route//STATUS_CODE_ERROR",
		"ext_proc stream/allow//STATUS_CODE_UNSET", // the parent marked not sampled
	} {
		if !strings.Contains(got, want) {
			t.Errorf("spans %s lack %s", got, want)
		}
	}
	if len(spans) != 6 {
		t.Errorf("want 6 spans, got %s", got)
	}
	if k.agent.ncalls() != 3 {
		t.Fatalf("agent calls %d", k.agent.ncalls())
	}
}

func TestAgentCallSpanError(t *testing.T) {
	k, col, tr := tracedKernel(t, 1)
	k.agent.fn = func(context.Context, *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		return nil, context.DeadlineExceeded
	}
	st := k.open(t)
	if r := st.send(t, reqHeaders("/api/v1/users", true, "")); r.GetImmediateResponse() == nil {
		t.Fatal("no denial")
	}
	st.end(t)
	_ = tr.Shutdown(context.Background())
	spans, ok := col.WaitFor(5*time.Second, func(s []otlptest.Span) bool { return len(s) >= 2 })
	if !ok {
		t.Fatalf("spans %+v", spans)
	}
	for _, s := range spans {
		if s.StatusCode.String() != "STATUS_CODE_ERROR" {
			t.Errorf("span %s: status %s", s.Name, s.StatusCode)
		}
	}
}

// TestTracingSamplingRateZero shows no span work and no trace context when nothing is sampled.
func TestTracingSamplingRateZero(t *testing.T) {
	k, col, tr := tracedKernel(t, 0)
	var sent []map[string]string
	k.agent.fn = func(_ context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
		sent = append(sent, req.GetTraceContext())
		return ok(), nil
	}
	st := k.open(t)
	st.send(t, reqHeaders("/api/v1/users", true, "", "traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"))
	st.end(t)
	_ = tr.Shutdown(context.Background())
	if len(sent) != 1 || len(sent[0]) != 0 {
		t.Fatalf("trace context sent: %v", sent)
	}
	if s := col.Spans(); len(s) != 0 {
		t.Fatalf("spans at rate 0: %+v", s)
	}
}

// newUnitKernel is a Kernel around a test kernel's server, for the reload and health logic.
func newUnitKernel(t *testing.T, tk *testKernel, configPath string) *Kernel {
	t.Helper()
	k := &Kernel{
		flags:   &flags{config: configPath},
		log:     tk.s.log,
		metrics: tk.m,
		server:  tk.s,
		pool:    &agentPool{byName: tk.s.Snapshot().agents, metrics: tk.m},
		health:  health.NewServer(),
	}
	return k
}

// TestRoutesCheckedAgainAtErrorLevel shows that the rebuild after an agent's policy list
// changes is logged, as an audit line, even at log level error.
func TestRoutesCheckedAgainAtErrorLevel(t *testing.T) {
	tk := newTestKernel(t, baseConfig, &fakeAgent{})
	k := newUnitKernel(t, tk, "unused")
	k.log.SetLevel(zerolog.ErrorLevel)
	info := testInfo()
	info.SupportedPolicies = append(info.SupportedPolicies, &agentv1.PolicyInfo{Name: "notThere", SupportedPhases: []agentv1.PolicyPhase{agentv1.PolicyPhase_REQUEST}})
	tk.agent.mu.Lock()
	tk.agent.info = info
	tk.agent.mu.Unlock()
	k.checkAgent(context.Background(), tk.state)
	msg := "routes checked again against the agents' policies"
	line := testenv.CheckAuditLog(t, tk.logs.String(), map[string]string{msg: "info"})[msg]
	if line.Metadata["invalid_routes"] != 0.0 || line.Metadata["config_version"] != "v1" {
		t.Fatalf("rebuild line: %s", line.Text)
	}
}

// TestAgentPolicySetChange shows the health loop's rediscovery: an agent that comes back with
// other policies gets its routes checked again, and the gRPC health service follows both the
// agent's health and the routes that cannot serve.
func TestAgentPolicySetChange(t *testing.T) {
	tk := newTestKernel(t, baseConfig, &fakeAgent{})
	k := newUnitKernel(t, tk, "unused")
	k.syncHealth()
	hs := func() healthpb.HealthCheckResponse_ServingStatus {
		r, err := k.health.Check(context.Background(), &healthpb.HealthCheckRequest{})
		if err != nil {
			t.Fatal(err)
		}
		return r.GetStatus()
	}
	if hs() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatal("serving with the invalid route /broken")
	}
	// The agent advertises "notThere" now: the /broken route becomes valid.
	a := tk.state
	info := testInfo()
	info.SupportedPolicies = append(info.SupportedPolicies, &agentv1.PolicyInfo{Name: "notThere", SupportedPhases: []agentv1.PolicyPhase{agentv1.PolicyPhase_REQUEST}})
	tk.agent.mu.Lock()
	tk.agent.info = info
	tk.agent.mu.Unlock()
	before := tk.s.Snapshot()
	k.checkAgent(context.Background(), a)
	k.syncHealth()
	after := tk.s.Snapshot()
	if after == before || len(after.invalid) != 0 || hs() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("snapshot not rebuilt: invalid %v", after.invalid)
	}
	if !strings.Contains(tk.logs.String(), "routes checked again") {
		t.Fatalf("logs:\n%s", tk.logs.String())
	}
	tk.agent.checkErr = context.DeadlineExceeded
	k.checkAgent(context.Background(), a)
	k.syncHealth()
	if a.healthy.Load() || hs() != healthpb.HealthCheckResponse_NOT_SERVING || !strings.Contains(tk.logs.String(), "agent unhealthy") {
		t.Fatal("a failed check must make the agent unhealthy and the kernel not serving")
	}
	// Back with the same policies: serving again, nothing rebuilt.
	tk.agent.mu.Lock()
	tk.agent.checkErr = nil
	tk.agent.mu.Unlock()
	k.checkAgent(context.Background(), a)
	k.syncHealth()
	if tk.s.Snapshot() != after || hs() != healthpb.HealthCheckResponse_SERVING || !strings.Contains(tk.logs.String(), "agent healthy") {
		t.Fatal("an agent back with an unchanged policy set must serve without a rebuild")
	}
	// A cancelled check (shutting down) does not mark the agent down.
	tk.agent.checkErr = context.Canceled
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	k.checkAgent(ctx, a)
	if !a.healthy.Load() {
		t.Fatal("shutdown marked the agent unhealthy")
	}
}

func TestPolicySetChanged(t *testing.T) {
	a, b := testInfo(), testInfo()
	if policySetChanged(a, b) {
		t.Fatal("equal sets")
	}
	b.SupportedPolicies[1].Version = "2"
	if !policySetChanged(a, b) {
		t.Fatal("a changed policy")
	}
	b.SupportedPolicies = b.SupportedPolicies[:2]
	if !policySetChanged(a, b) {
		t.Fatal("fewer policies")
	}
}

func TestValidateReport(t *testing.T) {
	tk := newTestKernel(t, baseConfig, &fakeAgent{})
	var out bytes.Buffer
	err := validateReport(&out, "kernel.yaml", []byte(baseConfig), tk.s.Snapshot(), nil, false)
	if err == nil || !strings.Contains(err.Error(), `kernel.yaml:28: policy_kernel.route_policies[5].request_policy_chain[0].policy: policy "notThere"`) || out.Len() != 0 {
		t.Fatalf("validateReport: %v %q", err, out.String())
	}
	good := strings.Replace(baseConfig, "policy: notThere", "policy: allowAll", 1)
	tk = newTestKernel(t, good, &fakeAgent{})
	if err := validateReport(&out, "kernel.yaml", []byte(good), tk.s.Snapshot(), nil, false); err != nil || !strings.Contains(out.String(), "kernel.yaml: valid (version v1)") {
		t.Fatalf("valid: %v %q", err, out.String())
	}
	tk.state.info.Store(nil)
	err = validateReport(&out, "kernel.yaml", []byte(good), tk.s.Snapshot(), nil, false)
	if err == nil || !strings.Contains(err.Error(), `kernel.yaml:4: policy_kernel.agents[0].socket_path: agent "a" did not answer at "/unused.sock"`) {
		t.Fatalf("unreached agent: %v", err)
	}
}

func TestMetricsAddr(t *testing.T) {
	kc := &KernelConfig{Observability: ObservabilityConfig{MetricsPort: 9090, MetricsAddress: "0.0.0.0"}}
	if a := metricsAddr(&flags{}, kc); a != "0.0.0.0:9090" {
		t.Fatal(a)
	}
	if a := metricsAddr(&flags{metrics: "127.0.0.1:1"}, kc); a != "127.0.0.1:1" {
		t.Fatal(a)
	}
	kc.Observability.MetricsPort = -1
	if a := metricsAddr(&flags{}, kc); a != "" {
		t.Fatal(a)
	}
}

func TestRestartOnly(t *testing.T) {
	parse := func(extra string) *KernelConfig {
		cfg, err := ParseConfig("k.yaml", []byte("policy_kernel:\n  agents: [{name: a, socket_path: /s}]\n"+extra))
		if err != nil {
			t.Fatal(err)
		}
		return cfg.PolicyKernel
	}
	old := parse("")
	if got := restartOnly(old, parse("  version: x\n  observability: {log_level: debug}\n")); len(got) != 0 {
		t.Fatalf("reloadable keys flagged: %v", got)
	}
	got := restartOnly(old, parse("  server: {address: 0.0.0.0, port: 9002, max_concurrent_streams: 10, stream_workers: 8, max_body_size_bytes: 10, max_connections: 5, stream_idle_timeout_ms: 1000, tls: {cert_file: c, key_file: k}}\n  observability: {metrics_port: 1, metrics_address: 127.0.0.1, pprof_enabled: false}\n"))
	want := "policy_kernel.server.address policy_kernel.server.port policy_kernel.server.max_concurrent_streams policy_kernel.server.stream_workers policy_kernel.server.max_body_size_bytes policy_kernel.server.max_connections policy_kernel.server.stream_idle_timeout_ms policy_kernel.server.tls policy_kernel.observability.metrics_port policy_kernel.observability.metrics_address policy_kernel.observability.pprof_enabled"
	if strings.Join(got, " ") != want {
		t.Fatalf("restartOnly = %v", got)
	}
}

// TestReloadUnit drives reload() with a fake agent: a rejected snapshot leaves everything (the
// snapshot, the metric series) as it was; a tracing change swaps the tracer; a tracer that
// cannot be made rejects the reload.
func TestReloadUnit(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "kernel.yaml")
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	good := strings.Replace(baseConfig, "policy: notThere", "policy: allowAll", 1)
	write(good)
	tk := newTestKernel(t, good, &fakeAgent{info: schemaInfo()})
	k := newUnitKernel(t, tk, path)
	k.current = []byte(good)
	k.metrics.setInfo("v1")
	snap := tk.s.Snapshot()
	var metricsBefore bytes.Buffer
	tk.m.set.WritePrometheus(&metricsBefore)

	write(strings.Replace(strings.Replace(good, "metadata: {header_name: X-Other}", "metadata: {header_name: X-Other, rate: many}", 1),
		"  default_policy:", "    - route_name: /new\n      request_policy_chain: [{policy: allowAll}]\n  default_policy:", 1))
	k.reload()
	if tk.s.Snapshot() != snap || tk.m.reloadFailure.Get() != 1 {
		t.Fatal("a snapshot with problems was installed")
	}
	// Building the rejected snapshot may have made series for its routes; installing one is
	// what drops series, so every series of the routes in force must still be there.
	var metricsAfter bytes.Buffer
	tk.m.set.WritePrometheus(&metricsAfter)
	for _, line := range strings.Split(metricsBefore.String(), "\n") {
		if strings.HasPrefix(line, "policy_kernel_requests_total") && !strings.Contains(metricsAfter.String(), strings.Fields(line)[0]) {
			t.Fatalf("a rejected reload dropped %s", line)
		}
	}
	if !strings.Contains(tk.logs.String(), `kernel.yaml:17: policy_kernel.route_policies[1].request_policy_chain[0].metadata.rate`) {
		t.Fatalf("logs:\n%s", tk.logs.String())
	}

	col, err := otlptest.Start()
	if err != nil {
		t.Fatal(err)
	}
	defer col.Stop()
	traced := good + "  observability:\n    log_level: warn\n    tracing: {enabled: true, endpoint: \"" + col.Addr() + "\"}\n"
	write(traced)
	k.reload()
	if tk.s.Snapshot() == snap || tk.m.reloadSuccess.Get() != 1 || tk.s.tracer.Load() == nil || k.log.Level() != zerolog.WarnLevel {
		t.Fatalf("valid reload: success %d, tracer %v, level %v", tk.m.reloadSuccess.Get(), tk.s.tracer.Load(), k.log.Level())
	}
	k.log.SetLevel(zerolog.InfoLevel)
	k.reload()
	if !strings.Contains(tk.logs.String(), "config unchanged; reload skipped") {
		t.Fatal("identical bytes")
	}
	write(strings.Replace(traced, "tracing: {", "tracing: {headers: {authorization: \"${env:POLICY_ENGINE_TEST_UNSET}\"}, ", 1))
	k.reload()
	if tk.m.reloadFailure.Get() != 2 || !strings.Contains(tk.logs.String(), "${env:POLICY_ENGINE_TEST_UNSET}") {
		t.Fatalf("a tracer that cannot be made must reject the reload:\n%s", tk.logs.String())
	}
	write("policy_kernel: {agents: [{name: a, socket_path: /other.sock}]}\n")
	k.reload()
	if tk.m.reloadSuccess.Get() != 2 {
		t.Fatalf("a reload to another socket: %s", tk.logs.String())
	}
	os.Remove(path)
	k.reload()
	if tk.m.reloadFailure.Get() != 3 {
		t.Fatal("a missing file must fail the reload")
	}
	tk.s.SetTracer(nil).Close()
}

// TestNewTracerLogsExportErrors points the kernel's tracer at nothing and finds the export
// failure in the log, once.
func TestNewTracerLogsExportErrors(t *testing.T) {
	var buf testenv.SyncBuffer
	log := logging.New(&buf, "kernel", zerolog.InfoLevel)
	tr, err := tracing.NewLogged(tracing.Config{Enabled: true, Endpoint: "127.0.0.1:1"}, tracing.Root, "policy-kernel", Version, log)
	if err != nil {
		t.Fatal(err)
	}
	_, span := tr.StartRemote(context.Background(), nil, "x", 0)
	span.End()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	_ = tr.Shutdown(ctx)
	if off, err := tracing.NewLogged(tracing.Config{}, tracing.Root, "policy-kernel", Version, log); off != nil || err != nil {
		t.Fatal("tracing off")
	}
}
