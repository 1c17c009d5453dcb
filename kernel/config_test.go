package kernel

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestConfigErrors runs one fixture per config error: its first line holds the exact message.
func TestConfigErrors(t *testing.T) {
	files, err := filepath.Glob("testdata/config/*.yaml")
	if err != nil || len(files) < 20 {
		t.Fatalf("fixtures: %v %d", err, len(files))
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			first, _, _ := strings.Cut(string(data), "\n")
			want, ok := strings.CutPrefix(first, "# error: ")
			if !ok {
				t.Fatalf("first line must be '# error: <message>'")
			}
			_, err = ParseConfig("bad.yaml", data)
			if err == nil {
				t.Fatalf("no error; want %q", want)
			}
			lines := strings.Split(err.Error(), "\n")
			found := false
			for _, l := range lines {
				found = found || l == want
			}
			if !found {
				t.Fatalf("errors:\n%s\nwant a line:\n%s", err, want)
			}
		})
	}
}

func TestConfigNegativeValuesAllReported(t *testing.T) {
	data, _ := os.ReadFile("testdata/config/negative_values.yaml")
	_, err := ParseConfig("bad.yaml", data)
	for _, want := range []string{"message_timeout_ms", "max_body_size_bytes", "drain_delay_ms", "retry.backoff_ms", "health_check_interval_ms", "connections: must be from 1 to 64", "metrics_port"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("missing %q in %v", want, err)
		}
	}
}

func TestConfigDefaultsAndExample(t *testing.T) {
	cfg, _, err := LoadConfig("../config/kernel-config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	k := cfg.PolicyKernel
	if k.Server.Port != 9001 || k.Server.MessageTimeoutMS != 200 || k.Server.MaxBodySizeBytes != DefaultMaxBodySizeBytes || k.Server.StatusOnError != 500 || k.Server.StreamWorkers != DefaultStreamWorkers {
		t.Fatalf("server defaults %+v", k.Server)
	}
	if k.Agents[0].TimeoutMS >= k.Server.MessageTimeoutMS {
		t.Fatal("the example's agent timeout must fit inside Envoy's message timeout")
	}
	if k.Observability.MetricsPort != 9090 || k.Observability.MetricsAddress != "0.0.0.0" {
		t.Fatalf("observability defaults %+v", k.Observability)
	}
	minimal, err := ParseConfig("m.yaml", []byte("policy_kernel:\n  agents: [{name: a, socket_path: /s}]\n"))
	if err != nil {
		t.Fatal(err)
	}
	if s := minimal.PolicyKernel.Server; s.Address != "127.0.0.1" || s.MaxConnections != DefaultMaxConnections || s.StreamIdleTimeoutMS != DefaultStreamIdleTimeoutMS || s.TLS.Enabled() {
		t.Fatalf("listener defaults: %+v (the ext_proc port binds loopback unless told otherwise)", s)
	}
	if o := minimal.PolicyKernel.Observability; o.PprofEnabled != nil {
		t.Fatalf("pprof_enabled default: %v", *o.PprofEnabled)
	}
	if o := minimal.PolicyKernel.Observability; o.AdminAddress != "127.0.0.1" || o.AdminPort != DefaultAdminPort {
		t.Fatalf("admin listener default %s:%d: it binds loopback unless told otherwise", o.AdminAddress, o.AdminPort)
	}
	for yaml, want := range map[string]string{
		"  observability: {admin_port: 9090}\n":                   "observability.admin_port: must differ from metrics_port",
		"  observability: {admin_port: -2}\n":                     "observability.admin_port: must be from 0 to 65535, or -1",
		"  observability: {admin_port: -1, metrics_port: 9190}\n": "",
	} {
		_, err := ParseConfig("a.yaml", []byte("policy_kernel:\n  agents: [{name: a, socket_path: /s}]\n"+yaml))
		if (want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), want)) {
			t.Errorf("%q: %v, want %q", yaml, err, want)
		}
	}
	a := minimal.PolicyKernel.Agents[0]
	if a.TimeoutMS != DefaultAgentTimeoutMS || a.Retry.MaxAttempts != 1 || a.Retry.BackoffMS != DefaultBackoffMS || a.HealthCheckIntervalMS != DefaultHealthCheckIntervalMS || a.Connections != DefaultConnections || a.FailOpen {
		t.Fatalf("agent defaults %+v", a)
	}
	if _, _, err := LoadConfig("testdata/none.yaml"); err == nil || !strings.Contains(err.Error(), "read kernel config") {
		t.Fatalf("missing file: %v", err)
	}
}
