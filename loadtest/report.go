package loadtest

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"text/tabwriter"
)

// Report is everything one load-test run measured.
type Report struct {
	Machine  Machine  `json:"machine"`
	Settings Settings `json:"settings"`
	Rows     []Row    `json:"rows"`
	// Checks are the targets' ratios against their limits (docs/performance.md, Targets).
	Checks []Check `json:"checks"`
	// Summary is each target's checks over the runs of -repeat: how many met, and the median.
	Summary []CheckSummary `json:"summary,omitempty"`
}

// CheckSummary is one target's check over the runs.
type CheckSummary struct {
	Target string  `json:"target"`
	What   string  `json:"what"`
	Runs   int     `json:"runs"`
	Met    int     `json:"met"`
	Median float64 `json:"median_ratio"`
	Limit  float64 `json:"limit"`
}

// Machine describes where the run happened.
type Machine struct {
	CPUs      int    `json:"cpus"`
	GoVersion string `json:"go_version"`
	Kernel    string `json:"kernel"`
	CPUModel  string `json:"cpu_model"`
	// LoadAverage is /proc/loadavg at the start of the run: other work on the machine.
	LoadAverage string `json:"load_average"`
}

// Settings are the load-test parameters of the run.
type Settings struct {
	Rates          []float64 `json:"open_loop_rates"`
	OpenSeconds    float64   `json:"open_loop_seconds"`
	ClosedSeconds  float64   `json:"closed_loop_seconds"`
	Concurrency    int       `json:"closed_loop_concurrency"`
	Connections    int       `json:"connections"`
	Streams        int       `json:"held_streams"`
	Repeat         int       `json:"repeat"`
	RequestChain   string    `json:"request_chain"`
	ResponseChain  string    `json:"response_chain"`
	MessagesPerReq int       `json:"messages_per_request"`
}

// Row is one target measured in one phase.
type Row struct {
	Run    int    `json:"run"`
	Target string `json:"target"`
	Phase  string `json:"phase"`
	// Requests completed without error, and the rate they were completed at.
	Requests int64   `json:"requests"`
	Errors   int64   `json:"errors"`
	RPS      float64 `json:"requests_per_second"`
	P50us    int64   `json:"p50_us"`
	P99us    int64   `json:"p99_us"`
	P999us   int64   `json:"p999_us"`
	// KernelP99us is the p99 of the kernel's own policy_kernel_request_duration_seconds
	// histogram over the phase (an upper bound: the bucket's top); 0 when not measured.
	KernelP99us float64 `json:"kernel_p99_us,omitempty"`
	// KernelP99Above says that the p99 lies above the histogram's largest finite bucket,
	// which KernelP99us then holds.
	KernelP99Above bool `json:"kernel_p99_above_top_bucket,omitempty"`
	// AgentCallP50us and AgentCallP99us are quantiles of the kernel's
	// policy_kernel_agent_call_duration_seconds over the phase (upper bounds: the bucket's
	// top): how long its calls to the agent took, the crossing both ways with the agent's
	// chain; 0 when not measured.
	AgentCallP50us float64 `json:"agent_call_p50_us,omitempty"`
	AgentCallP99us float64 `json:"agent_call_p99_us,omitempty"`
	// Procs lists each server process's CPU and memory over the phase.
	Procs []ProcUsage `json:"processes"`
	// CPUPer1k is the CPU seconds of all the target's processes per 1,000 requests.
	CPUPer1k float64 `json:"cpu_seconds_per_1k_requests"`
	// SwitchesPerReq is the context switches of all the target's processes per request.
	SwitchesPerReq float64 `json:"context_switches_per_request,omitempty"`
	// SyscallsPerReq is the read and write system calls of all the target's processes per
	// request.
	SyscallsPerReq float64 `json:"io_syscalls_per_request,omitempty"`
	// CPURatio is CPUPer1k divided by the baseline's in the same run and phase.
	CPURatio float64 `json:"cpu_ratio_to_baseline,omitempty"`
	// P50Ratio and P99Ratio are the client latencies divided by the baseline's in the same
	// run and phase.
	P50Ratio float64 `json:"p50_ratio_to_baseline,omitempty"`
	P99Ratio float64 `json:"p99_ratio_to_baseline,omitempty"`
	// RSSRatio is the first process's peak RSS (the kernel's) divided by the baseline's, in the
	// memory phases (idle, streams).
	RSSRatio float64 `json:"rss_ratio_to_baseline,omitempty"`
	// KernelMemory is the kernel's Go memory while streams are held; nil elsewhere.
	KernelMemory *GoMemory `json:"kernel_memory,omitempty"`
	Errs         []string  `json:"error_samples,omitempty"`
}

// GoMemory is what a Go process's memory is made of, from its /metrics.
type GoMemory struct {
	HeapInuse  int64 `json:"heap_inuse_bytes"`
	StackInuse int64 `json:"stack_inuse_bytes"`
	Goroutines int64 `json:"goroutines"`
}

// Check is one of the performance targets, as this run measured it.
type Check struct {
	Run    int     `json:"run"`
	Target string  `json:"target"`
	What   string  `json:"what"`
	Ratio  float64 `json:"ratio"`
	Limit  float64 `json:"limit"`
	Met    bool    `json:"met"`
}

// ProcUsage is one process's share of a phase.
type ProcUsage struct {
	Name     string  `json:"name"`
	CPUSec   float64 `json:"cpu_seconds"`
	CPUPer1k float64 `json:"cpu_seconds_per_1k_requests"`
	PeakRSS  int64   `json:"peak_rss_bytes"`
	// SwitchesPerReq is the process's context switches per request over the phase: about one
	// thread wake-up each.
	SwitchesPerReq float64 `json:"context_switches_per_request,omitempty"`
	// SyscallsPerReq is the process's read and write system calls per request over the phase.
	SyscallsPerReq float64 `json:"io_syscalls_per_request,omitempty"`
}

// The targets' limits, as ratios to the baseline.
const (
	limitClosedCPU  = 1.5
	limitOpenCPU    = 1.25
	limitOpenLat    = 1.5
	limitStreamsRSS = 1.1
)

// setRatios fills the ratios of every row from the baseline row of the same run and phase, and
// the checks of the targets.
func (r *Report) setRatios(baseline string) {
	base := map[string]Row{}
	for _, row := range r.Rows {
		if row.Target == baseline {
			base[fmt.Sprint(row.Run, row.Phase)] = row
		}
	}
	ratio := func(v, b float64) float64 {
		if v > 0 && b > 0 {
			return v / b
		}
		return 0
	}
	r.Checks = nil
	for i := range r.Rows {
		row := &r.Rows[i]
		b, ok := base[fmt.Sprint(row.Run, row.Phase)]
		if !ok {
			continue
		}
		row.CPURatio = ratio(row.CPUPer1k, b.CPUPer1k)
		row.P50Ratio = ratio(float64(row.P50us), float64(b.P50us))
		row.P99Ratio = ratio(float64(row.P99us), float64(b.P99us))
		if len(row.Procs) > 0 && len(b.Procs) > 0 {
			row.RSSRatio = ratio(float64(row.Procs[0].PeakRSS), float64(b.Procs[0].PeakRSS))
		}
		if row.Target == baseline {
			continue
		}
		check := func(what string, v, limit float64) {
			if v > 0 {
				r.Checks = append(r.Checks, Check{Run: row.Run, Target: row.Target, What: what, Ratio: v, Limit: limit, Met: v <= limit})
			}
		}
		switch {
		case row.Phase == phaseClosed:
			check("closed loop: CPU per request", row.CPURatio, limitClosedCPU)
		case strings.HasPrefix(row.Phase, phaseOpen+" "):
			check(row.Phase+"/s: CPU per request", row.CPURatio, limitOpenCPU)
			check(row.Phase+"/s: client p50", row.P50Ratio, limitOpenLat)
			check(row.Phase+"/s: client p99", row.P99Ratio, limitOpenLat)
		case strings.HasPrefix(row.Phase, phaseStreams):
			check(row.Phase+": kernel peak RSS", row.RSSRatio, limitStreamsRSS)
		case row.Phase == phaseIdle:
			check("idle: kernel RSS (no limit)", row.RSSRatio, 0)
		}
	}
	r.Summary = summarize(r.Checks)
}

// summarize groups the checks by target and what they measure, in the order they first
// appear; checks without a limit are left out.
func summarize(checks []Check) []CheckSummary {
	var out []CheckSummary
	var ratios [][]float64 // by index in out
	index := map[[2]string]int{}
	for _, c := range checks {
		if c.Limit == 0 {
			continue
		}
		i, ok := index[[2]string{c.Target, c.What}]
		if !ok {
			i = len(out)
			index[[2]string{c.Target, c.What}] = i
			out = append(out, CheckSummary{Target: c.Target, What: c.What, Limit: c.Limit})
			ratios = append(ratios, nil)
		}
		out[i].Runs++
		if c.Met {
			out[i].Met++
		}
		ratios[i] = append(ratios[i], c.Ratio)
	}
	for i, v := range ratios {
		slices.Sort(v)
		if n := len(v); n%2 == 1 {
			out[i].Median = v[n/2]
		} else {
			out[i].Median = (v[n/2-1] + v[n/2]) / 2
		}
	}
	return out
}

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteTable writes the report as an aligned text table.
func (r *Report) WriteTable(w io.Writer) error {
	m := r.Machine
	fmt.Fprintf(w, "machine: %d CPUs (%s), %s, %s, load average at start %s\n", m.CPUs, m.CPUModel, m.Kernel, m.GoVersion, m.LoadAverage)
	s := r.Settings
	fmt.Fprintf(w, "traffic: request chain %s; response chain %s; headers only; %d connections\n", s.RequestChain, s.ResponseChain, s.Connections)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "run\ttarget\tphase\treq/s\tp50 µs\tp99 µs\tp99.9 µs\terrors\tkernel p99 µs\tagent call p50, p99 µs\tCPU s/1k req\tratio\tswitches/req\tsyscalls/req\tp50, p99 ratio\tpeak RSS MiB\tratio\t")
	for _, row := range r.Rows {
		var cpu, rss, sw, sc []string
		for _, p := range row.Procs {
			cpu = append(cpu, fmt.Sprintf("%s %.3f", p.Name, p.CPUPer1k))
			sw = append(sw, fmt.Sprintf("%.1f", p.SwitchesPerReq))
			sc = append(sc, fmt.Sprintf("%.1f", p.SyscallsPerReq))
			rss = append(rss, fmt.Sprintf("%s %.1f", p.Name, float64(p.PeakRSS)/(1<<20)))
		}
		cpuCol := fmt.Sprintf("%.3f", row.CPUPer1k)
		if len(row.Procs) > 1 {
			cpuCol = strings.Join(cpu, " + ") + " = " + cpuCol
		}
		swCol, scCol := perProcess(sw, row.SwitchesPerReq), perProcess(sc, row.SyscallsPerReq)
		if strings.HasPrefix(row.Phase, phaseStreams) || row.Phase == phaseIdle {
			cpuCol, swCol, scCol = "-", "-", "-"
		}
		lat := "-"
		if row.P50Ratio > 0 {
			lat = fmt.Sprintf("%.2f×, %.2f×", row.P50Ratio, row.P99Ratio)
		}
		calls := "-"
		if row.AgentCallP50us > 0 {
			calls = fmt.Sprintf("%.0f, %s", row.AgentCallP50us, num(row.AgentCallP99us, "%.0f"))
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n",
			row.Run, row.Target, row.Phase, num(row.RPS, "%.0f"), dur(row.P50us), dur(row.P99us), dur(row.P999us), row.Errors,
			kernelP99(row), calls, cpuCol, num(row.CPURatio, "%.2f×"), swCol, scCol, lat, strings.Join(rss, ", "), num(row.RSSRatio, "%.2f×"))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, row := range r.Rows {
		if m := row.KernelMemory; m != nil && m.Goroutines > 0 {
			fmt.Fprintf(w, "kernel with %s: Go heap in use %.1f MiB, stacks %.1f MiB for %d goroutines (%.1f KiB each)\n",
				row.Phase, float64(m.HeapInuse)/(1<<20), float64(m.StackInuse)/(1<<20), m.Goroutines, float64(m.StackInuse)/float64(m.Goroutines)/1024)
		}
	}
	if len(r.Checks) > 0 {
		fmt.Fprintln(w, "targets (ratio to the baseline in the same run and phase):")
		for _, c := range r.Checks {
			verdict := "met"
			switch {
			case c.Limit == 0:
				verdict = "for information"
			case !c.Met:
				verdict = "NOT met"
			}
			limit := ""
			if c.Limit > 0 {
				limit = fmt.Sprintf(" (limit %.2f×)", c.Limit)
			}
			fmt.Fprintf(w, "  run %d %s, %s: %.2f×%s %s\n", c.Run, c.Target, c.What, c.Ratio, limit, verdict)
		}
	}
	if len(r.Summary) > 0 && r.Summary[0].Runs > 1 {
		fmt.Fprintln(w, "over the runs (median ratio; how many runs met the limit):")
		for _, c := range r.Summary {
			fmt.Fprintf(w, "  %s, %s: median %.2f× (limit %.2f×), met in %d of %d\n", c.Target, c.What, c.Median, c.Limit, c.Met, c.Runs)
		}
	}
	for _, row := range r.Rows {
		for _, e := range row.Errs {
			fmt.Fprintf(w, "run %d %s %s error: %s\n", row.Run, row.Target, row.Phase, e)
		}
	}
	return nil
}

func kernelP99(row Row) string {
	if row.KernelP99Above {
		return ">" + num(row.KernelP99us, "%.0f")
	}
	return num(row.KernelP99us, "%.0f")
}

func num(v float64, format string) string {
	if v == 0 || math.IsNaN(v) {
		return "-"
	}
	return fmt.Sprintf(format, v)
}

func dur(us int64) string {
	if us == 0 {
		return "-"
	}
	return fmt.Sprint(us)
}

// perProcess is a per-request count of a row: the total, or "kernel + agent = total" when the
// target has more than one process.
func perProcess(each []string, total float64) string {
	col := num(total, "%.1f")
	if len(each) > 1 && total > 0 {
		col = strings.Join(each, " + ") + " = " + col
	}
	return col
}
