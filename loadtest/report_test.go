package loadtest

import (
	"bytes"
	"encoding/json"
	"math"
	"os"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
)

func sampleReport() *Report {
	r := &Report{
		Machine:  Machine{CPUs: 2, GoVersion: "go1.26", Kernel: "Linux 6", CPUModel: "cpu", LoadAverage: "0.1 0.2 0.3"},
		Settings: Settings{Rates: []float64{5000}, Connections: 2, RequestChain: "apiKeyAuth + rateLimit", ResponseChain: "addSecurityHeaders"},
		Rows: []Row{
			{Run: 1, Target: targetNoop, Phase: phaseOpen, Requests: 1000, RPS: 5000, P50us: 100, P99us: 300, P999us: 900,
				Procs: []ProcUsage{{Name: "noop", CPUSec: 0.08, CPUPer1k: 0.08, PeakRSS: 20 << 20}}, CPUPer1k: 0.08},
			{Run: 1, Target: targetKernel, Phase: phaseOpen, Requests: 1000, RPS: 4999, P50us: 150, P99us: 500, P999us: 1500, KernelP99us: 240,
				AgentCallP50us: 150, AgentCallP99us: 750,
				Procs: []ProcUsage{{Name: "kernel", CPUPer1k: 0.07, PeakRSS: 30 << 20}, {Name: "agent", CPUPer1k: 0.03, PeakRSS: 25 << 20}}, CPUPer1k: 0.10,
				Errors: 2, Errs: []string{"immediate response 500 to request_headers"}},
			{Run: 2, Target: targetKernel, Phase: phaseOpen, CPUPer1k: 0.2, KernelP99us: 5e6, KernelP99Above: true}, // no baseline in run 2
			{Run: 1, Target: targetKernel, Phase: phaseStreams + " 10000", Requests: 10000,
				Procs: []ProcUsage{{Name: "kernel", PeakRSS: 100 << 20}, {Name: "agent", PeakRSS: 30 << 20}}},
		},
	}
	r.setRatios(targetNoop)
	return r
}

func TestSetRatios(t *testing.T) {
	r := sampleReport()
	if got := r.Rows[1].CPURatio; math.Abs(got-1.25) > 1e-9 {
		t.Errorf("kernel ratio = %g, want 0.10/0.08 = 1.25", got)
	}
	if r.Rows[0].CPURatio != 1 {
		t.Errorf("baseline ratio = %g, want 1", r.Rows[0].CPURatio)
	}
	if r.Rows[2].CPURatio != 0 {
		t.Errorf("a row without a baseline in its run got ratio %g", r.Rows[2].CPURatio)
	}
}

func TestWriteTable(t *testing.T) {
	var b bytes.Buffer
	if err := sampleReport().WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"machine: 2 CPUs (cpu), Linux 6, go1.26, load average at start 0.1 0.2 0.3",
		"request chain apiKeyAuth + rateLimit; response chain addSecurityHeaders",
		"kernel 0.070 + agent 0.030 = 0.100",
		"1.25×",
		"kernel 100.0, agent 30.0",
		"streams 10000",
		">5000000",
		"150, 750",
		"run 1 kernel+agent open error: immediate response 500 to request_headers",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	// Every row of the table has as many columns as the header.
	header := strings.Fields(lines[2])
	if header[0] != "run" {
		t.Fatalf("header line %q", lines[2])
	}
}

func TestWriteJSON(t *testing.T) {
	var b bytes.Buffer
	r := sampleReport()
	if err := r.WriteJSON(&b); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(b.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	if len(back.Rows) != len(r.Rows) || back.Rows[1].CPURatio != r.Rows[1].CPURatio || back.Rows[1].Procs[1].Name != "agent" {
		t.Fatalf("JSON round trip lost data: %+v", back.Rows)
	}
	if !strings.Contains(b.String(), `"cpu_seconds_per_1k_requests": 0.1`) {
		t.Errorf("JSON lacks the per-1k CPU field:\n%s", b.String())
	}
}

func TestFormatHelpers(t *testing.T) {
	if num(0, "%.0f") != "-" || num(math.NaN(), "%.0f") != "-" || num(2.5, "%.1f") != "2.5" {
		t.Error("num")
	}
	if dur(0) != "-" || dur(12) != "12" {
		t.Error("dur")
	}
}

func TestGHZDataIsCurrent(t *testing.T) {
	var b bytes.Buffer
	if err := WriteGHZData(&b, DefaultTraffic(RouteName, APIKey)); err != nil {
		t.Fatal(err)
	}
	committed, err := os.ReadFile("ghz/process.json")
	if err != nil {
		t.Fatal(err)
	}
	// The x-request-id differs per request; compare everything else.
	strip := func(s string) string {
		i := strings.Index(s, `"key": "x-request-id"`)
		if i < 0 {
			t.Fatal("no x-request-id in ghz data")
		}
		j := strings.Index(s[i:], "}")
		return s[:i] + s[i+j:]
	}
	if strip(b.String()) != strip(string(committed)) {
		t.Errorf("ghz/process.json is stale: regenerate it with go run ./loadtest/cmd/ghzdata -data loadtest/ghz/process.json")
	}
	var msgs []json.RawMessage
	if err := json.Unmarshal(committed, &msgs); err != nil || len(msgs) != 2 {
		t.Fatalf("ghz data: %d messages, %v", len(msgs), err)
	}
}

func TestProtoset(t *testing.T) {
	var b bytes.Buffer
	if err := WriteProtoset(&b); err != nil {
		t.Fatal(err)
	}
	var set descriptorpb.FileDescriptorSet
	if err := proto.Unmarshal(b.Bytes(), &set); err != nil {
		t.Fatal(err)
	}
	files, err := protodesc.NewFiles(&set)
	if err != nil {
		t.Fatalf("protoset does not resolve on its own: %v", err)
	}
	d, err := files.FindDescriptorByName("envoy.service.ext_proc.v3.ExternalProcessor")
	if err != nil {
		t.Fatal(err)
	}
	if m := d.(protoreflect.ServiceDescriptor).Methods().ByName("Process"); m == nil || !m.IsStreamingClient() || !m.IsStreamingServer() {
		t.Fatalf("Process method: %v", m)
	}
}

// TestChecks: the targets are checked against the baseline of the same run and phase: CPU and
// client latency in the open loop at each rate, CPU in the closed loop, the kernel's RSS with
// held streams and idle; the table says which are met.
func TestChecks(t *testing.T) {
	r := &Report{Rows: []Row{
		{Run: 1, Target: targetNoop, Phase: "open 2500", P50us: 100, P99us: 1000, CPUPer1k: 0.1},
		{Run: 1, Target: targetKernel, Phase: "open 2500", P50us: 140, P99us: 1600, CPUPer1k: 0.12},
		{Run: 1, Target: targetNoop, Phase: phaseClosed, CPUPer1k: 0.1},
		{Run: 1, Target: targetKernel, Phase: phaseClosed, CPUPer1k: 0.2},
		{Run: 1, Target: targetNoop, Phase: "streams 10000", Procs: []ProcUsage{{Name: "noop", PeakRSS: 100}}},
		{Run: 1, Target: targetKernel, Phase: "streams 10000", Procs: []ProcUsage{{Name: "kernel", PeakRSS: 105}, {Name: "agent", PeakRSS: 500}}},
	}}
	r.setRatios(targetNoop)
	want := map[string]bool{
		"open 2500/s: CPU per request": true, "open 2500/s: client p50": true, "open 2500/s: client p99": false,
		"closed loop: CPU per request": false, "streams 10000: kernel peak RSS": true,
	}
	if len(r.Checks) != len(want) {
		t.Fatalf("checks %+v", r.Checks)
	}
	for _, c := range r.Checks {
		if met, ok := want[c.What]; !ok || met != c.Met || c.Target != targetKernel {
			t.Errorf("check %+v", c)
		}
	}
	var b bytes.Buffer
	if err := r.WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"run 1 kernel+agent, open 2500/s: client p99: 1.60× (limit 1.50×) NOT met", "streams 10000: kernel peak RSS: 1.05× (limit 1.10×) met", "1.40×, 1.60×"} {
		if !strings.Contains(b.String(), s) {
			t.Errorf("table lacks %q:\n%s", s, b.String())
		}
	}
}

// TestSummary: over three runs each check has its median ratio and how many runs met the
// limit; checks without a limit are left out, and a single run prints no summary.
func TestSummary(t *testing.T) {
	var rows []Row
	for run, rss := range []int64{108, 114, 110} {
		rows = append(rows,
			Row{Run: run + 1, Target: targetNoop, Phase: "streams 10000", Procs: []ProcUsage{{Name: "noop", PeakRSS: 100}}},
			Row{Run: run + 1, Target: targetKernel, Phase: "streams 10000", Procs: []ProcUsage{{Name: "kernel", PeakRSS: rss}}},
			Row{Run: run + 1, Target: targetNoop, Phase: phaseClosed, CPUPer1k: 0.1},
			Row{Run: run + 1, Target: targetKernel, Phase: phaseClosed, CPUPer1k: 0.1 + 0.01*float64(run)},
		)
	}
	rows = append(rows, Row{Run: 1, Target: targetNoop, Phase: phaseIdle, Procs: []ProcUsage{{Name: "noop", PeakRSS: 10}}},
		Row{Run: 1, Target: targetKernel, Phase: phaseIdle, Procs: []ProcUsage{{Name: "kernel", PeakRSS: 20}}})
	r := &Report{Rows: rows}
	r.setRatios(targetNoop)
	if len(r.Summary) != 2 {
		t.Fatalf("summary %+v, want the memory and closed-loop checks", r.Summary)
	}
	mem, cpu := r.Summary[0], r.Summary[1]
	if mem.What != "streams 10000: kernel peak RSS" || mem.Runs != 3 || mem.Met != 2 || math.Abs(mem.Median-1.10) > 1e-9 {
		t.Errorf("memory summary %+v, want median 1.10, met in 2 of 3", mem)
	}
	if cpu.Runs != 3 || cpu.Met != 3 || math.Abs(cpu.Median-1.1) > 1e-9 {
		t.Errorf("closed-loop summary %+v, want median 1.10, met in 3 of 3", cpu)
	}
	var b bytes.Buffer
	if err := r.WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	if s := "kernel+agent, streams 10000: kernel peak RSS: median 1.10× (limit 1.10×), met in 2 of 3"; !strings.Contains(b.String(), s) {
		t.Errorf("table lacks %q:\n%s", s, b.String())
	}
	// An even count takes the mean of the middle two.
	if got := summarize([]Check{{Target: "k", What: "w", Ratio: 1, Limit: 2}, {Target: "k", What: "w", Ratio: 2, Limit: 2}}); got[0].Median != 1.5 {
		t.Errorf("median of two: %+v", got)
	}
	one := &Report{Rows: rows[:4]}
	one.setRatios(targetNoop)
	b.Reset()
	if err := one.WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(b.String(), "over the runs") {
		t.Errorf("a single run printed a summary:\n%s", b.String())
	}
}
