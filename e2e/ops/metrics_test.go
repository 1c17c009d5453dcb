package ops

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/agent"
	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/obs"
	"github.com/policy-engine/policy-engine/internal/testenv"
	"github.com/policy-engine/policy-engine/kernel"
)

// series parses a Prometheus text exposition into the label names of each sample, by metric
// name (one label set per distinct set of names).
func series(t *testing.T, text string) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	re := regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="(?:[^"\\]|\\.)*"`)
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		name, labels := line, ""
		if i := strings.IndexByte(line, '{'); i >= 0 {
			name, labels = line[:i], line[i:]
		} else if i := strings.IndexByte(line, ' '); i >= 0 {
			name = line[:i]
		}
		var names []string
		for _, m := range re.FindAllStringSubmatch(labels, -1) {
			names = append(names, m[1])
		}
		sort.Strings(names)
		key := strings.Join(names, ",")
		found := false
		for _, k := range out[name] {
			found = found || k == key
		}
		if !found {
			out[name] = append(out[name], key)
		}
	}
	return out
}

// promtool runs promtool with args, stdin from in.
func promtool(t *testing.T, in string, args ...string) string {
	t.Helper()
	if _, err := exec.LookPath("promtool"); err != nil {
		t.Fatal("promtool is not installed (Debian package prometheus; .ci/run installs it)")
	}
	cmd := exec.Command("promtool", args...)
	cmd.Stdin = strings.NewReader(in)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestMetrics runs traffic with every kind of outcome and checks the real /metrics output of
// both processes: promtool accepts it, and every metric of the specification's §7.1 is there
// with exactly its labels.
func TestMetrics(t *testing.T) {
	// One more route, whose apiKeyAuth is in shadow: its families are exported once it ran.
	cfg := strings.Replace(fmt.Sprintf(kernelYAML, "m1"), "  default_policy:\n", `    - route_name: /shadow
      request_policy_chain:
        - policy: apiKeyAuth
          mode: shadow
  default_policy:
`, 1)
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: cfg})
	c := e.Dial(t, envoyConfig)
	do(t, c)                                  // allow
	do(t, c, [2]string{"x-api-key", "wrong"}) // a second key header: joined, so denied
	r, err := c.Do(t.Context(), &envoytest.Request{Path: "/api/v1/users"}, nil)
	if err != nil || r.Status != 401 {
		t.Fatalf("no key: %v %v", r, err)
	}
	if r, err := c.Do(t.Context(), &envoytest.Request{Path: "/shadow"}, nil); err != nil || r.Status != 200 {
		t.Fatalf("shadow route without a key: %v %v", r, err)
	}
	e.Reload(t, "config unchanged; reload skipped")

	_, kout := e.Get(t, "/metrics")
	code, aout := e.GetAgent(t, "/metrics")
	if code != 200 {
		t.Fatalf("agent /metrics: %d %s", code, aout)
	}
	promtool(t, kout, "check", "metrics")
	promtool(t, aout, "check", "metrics")

	want := map[string]string{
		// §7.1, the kernel.
		"policy_kernel_requests_total":                  "agent,route,status",
		"policy_kernel_request_duration_seconds_count":  "agent,route",
		"policy_kernel_request_duration_seconds_bucket": "agent,le,route",
		"policy_kernel_agent_health":                    "agent",
		"policy_kernel_agent_timeouts_total":            "agent",
		"policy_kernel_config_reload_total":             "status",
		// §7.1, the agent.
		"policy_agent_executions_total":                  "policy,status",
		"policy_agent_execution_duration_seconds_count":  "policy",
		"policy_agent_execution_duration_seconds_bucket": "le,policy",
		"policy_agent_policy_failures_total":             "policy,reason",
		"policy_agent_context_size_bytes_bucket":         "le,type",
		"policy_agent_shadow_decisions_total":            "decision,policy,route",
		// Reloads, versions and rejected mutations.
		"policy_kernel_config_info":              "version",
		"policy_agent_config_info":               "version",
		"policy_agent_config_reload_total":       "status",
		"policy_kernel_mutations_rejected_total": "agent,route",
		// Go runtime and process.
		"go_goroutines":                 "",
		"go_memlimit_bytes":             "",
		"process_resident_memory_bytes": "",
		"process_cpu_seconds_total":     "",
	}
	ks, as := series(t, kout), series(t, aout)
	for name, labels := range want {
		got := ks[name]
		if strings.HasPrefix(name, "policy_agent_") {
			got = as[name]
		}
		if len(got) != 1 || got[0] != labels {
			t.Errorf("%s: label sets %q, want exactly [%q]", name, got, labels)
		}
	}
	for _, s := range []string{
		`policy_kernel_requests_total{route="/api/v1/users",agent="default-agent",status="allow"} 1`,
		`policy_kernel_requests_total{route="/api/v1/users",agent="default-agent",status="deny"} 2`,
		`# TYPE policy_kernel_request_duration_seconds histogram`,
		`# TYPE policy_kernel_requests_total counter`,
		`policy_kernel_agent_health{agent="default-agent"} 1`,
		// The response chain (addSecurityHeaders) is static: the kernel answers it.
		`policy_kernel_response_phase_total{route="/api/v1/users",agent="default-agent",status="allow"} 1`,
	} {
		if !strings.Contains(kout, s) {
			t.Errorf("kernel metrics lack %s", s)
		}
	}
	for _, s := range []string{
		`policy_agent_executions_total{policy="apiKeyAuth",status="ok"} 1`,
		`policy_agent_executions_total{policy="apiKeyAuth",status="denied"} 2`,
		`policy_agent_shadow_decisions_total{policy="apiKeyAuth",route="/shadow",decision="deny"} 1`,
		`policy_agent_context_size_bytes_count{type="request_headers"} 4`, // the three above and /shadow
		`# TYPE policy_agent_execution_duration_seconds histogram`,
	} {
		if !strings.Contains(aout, s) {
			t.Errorf("agent metrics lack %s", s)
		}
	}
	if t.Failed() {
		t.Logf("kernel:\n%s\nagent:\n%s", kout, aout)
	}

	// Every metric the alerts and the dashboard query is one the processes export.
	exported := map[string]bool{}
	for n := range ks {
		exported[n] = true
	}
	for n := range as {
		exported[n] = true
	}
	for _, f := range []string{"deploy/prometheus/alerts.yml", "deploy/grafana/policy-engine-dashboard.json"} {
		b, err := os.ReadFile(repoRoot + f)
		if err != nil {
			t.Fatal(err)
		}
		names := regexp.MustCompile(`\b(?:policy_(?:kernel|agent)|process|go)_[a-z_]+\b`).FindAllString(string(b), -1)
		if len(names) < 5 {
			t.Fatalf("%s names %d metrics", f, len(names))
		}
		for _, n := range names {
			if !exported[n] {
				t.Errorf("%s queries %s, which neither process exports", f, n)
			}
		}
	}
}

// TestAlertRules checks deploy/prometheus/alerts.yml with promtool and runs its unit tests,
// which show each alert of the specification's §9.4 firing on the series that should fire it
// and not on the others.
func TestAlertRules(t *testing.T) {
	out := promtool(t, "", "check", "rules", repoRoot+"deploy/prometheus/alerts.yml")
	rules, err := os.ReadFile(repoRoot + "deploy/prometheus/alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(rules), "- alert: "); n < 5 || !strings.Contains(out, fmt.Sprintf("SUCCESS: %d rules found", n)) {
		t.Fatalf("promtool check rules: %s", out)
	}
	promtool(t, "", "test", "rules", repoRoot+"deploy/prometheus/alerts_test.yml")
}

// TestDashboard checks that the Grafana dashboard is well-formed: every panel queries
// something, panel ids are unique, and the data source is a variable.
func TestDashboard(t *testing.T) {
	b, err := os.ReadFile(repoRoot + "deploy/grafana/policy-engine-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Title  string `json:"title"`
		UID    string `json:"uid"`
		Panels []struct {
			ID      int    `json:"id"`
			Type    string `json:"type"`
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatal(err)
	}
	if d.Title == "" || d.UID == "" || len(d.Panels) < 10 {
		t.Fatalf("dashboard %q %q with %d panels", d.Title, d.UID, len(d.Panels))
	}
	ids := map[int]bool{}
	for _, p := range d.Panels {
		if ids[p.ID] {
			t.Errorf("duplicate panel id %d", p.ID)
		}
		ids[p.ID] = true
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q queries nothing", p.Title)
		}
		for _, tg := range p.Targets {
			if strings.Count(tg.Expr, "(") != strings.Count(tg.Expr, ")") || strings.Count(tg.Expr, "{") != strings.Count(tg.Expr, "}") {
				t.Errorf("panel %q: unbalanced expression %s", p.Title, tg.Expr)
			}
		}
	}
	if !strings.Contains(string(b), `"uid": "${datasource}"`) {
		t.Error("panels must use the datasource variable")
	}
}

// TestMetricsDocumented finds every metric family of both processes in the operations guide.
func TestMetricsDocumented(t *testing.T) {
	b, err := os.ReadFile(repoRoot + "docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range append(append([]obs.Family{}, kernel.Families...), agent.Families...) {
		if !strings.Contains(string(b), "`"+f.Name+"`") {
			t.Errorf("docs/operations.md does not document %s", f.Name)
		}
	}
}
