package ops

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

// hostIP returns an address of this host that is not loopback, or "" when it has none.
func hostIP() string {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return ""
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && !n.IP.IsLoopback() && n.IP.To4() != nil {
			return n.IP.String()
		}
	}
	return ""
}

// TestAdminListener shows where the admin endpoints (/config, /debug/explain, /debug/pprof/)
// are served: on observability.admin_port bound to 127.0.0.1 when the config does not name an
// address, not on the metrics port (which keeps /metrics and the probes), and not on the host's
// other addresses; an operator's admin_address is obeyed. The same for the agent.
func TestAdminListener(t *testing.T) {
	kbin, _ := testenv.Binaries(t)
	agentAdmin := agentYAML + "    admin_address: \"{{AGENT_ADMIN}}\"\n    pprof_enabled: true\n"
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentAdmin, KernelYAML: fmt.Sprintf(kernelYAML, "adm")})

	ip := hostIP()
	start := func(name, observability string) (metrics string) {
		t.Helper()
		cfg := filepath.Join(e.Dir, name+".yaml")
		if err := os.WriteFile(cfg, []byte(e.Expand(fmt.Sprintf(kernelYAML, name)+observability)), 0o600); err != nil {
			t.Fatal(err)
		}
		metrics = testenv.FreeAddr(t)
		// No --admin-listen: the config decides.
		k := testenv.Start(t, kbin, nil, "--config", cfg, "--listen", testenv.FreeAddr(t), "--metrics-listen", metrics, "--agent-wait", "5s", "--watch-config=false")
		testenv.WaitFor(t, testenv.StartTimeout, name+" ready", func() bool {
			if k.Exited() {
				t.Fatalf("kernel exited:\n%s", k.Output())
			}
			code, _ := testenv.HTTPGet("http://" + metrics + "/health/ready")
			return code == 200
		})
		return metrics
	}

	// admin_address left to its default.
	_, port, _ := net.SplitHostPort(testenv.FreeAddr(t))
	metrics := start("default", "  observability:\n    pprof_enabled: true\n    admin_port: "+port+"\n")
	admin := "127.0.0.1:" + port
	for _, p := range []string{"/config", "/debug/pprof/cmdline", "/debug/explain"} {
		if code, _ := testenv.HTTPGet("http://" + metrics + p); code != 404 {
			t.Errorf("%s on the metrics listener: %d, want 404", p, code)
		}
	}
	if code, body := testenv.HTTPGet("http://" + admin + "/config"); code != 200 || !strings.Contains(body, `"config_version"`) {
		t.Errorf("/config on %s: %d %.200s", admin, code, body)
	}
	if code, _ := testenv.HTTPGet("http://" + admin + "/debug/pprof/cmdline"); code != 200 {
		t.Errorf("pprof on %s: %d", admin, code)
	}
	for _, p := range []string{"/metrics", "/health/ready"} {
		if code, _ := testenv.HTTPGet("http://" + metrics + p); code != 200 {
			t.Errorf("%s on the metrics listener: %d", p, code)
		}
	}
	if ip != "" {
		if c, err := net.DialTimeout("tcp", net.JoinHostPort(ip, port), time.Second); err == nil {
			c.Close()
			t.Errorf("the admin port answers on %s, not only on loopback", ip)
		}
	}

	// The agent: /config and pprof on its admin address only.
	if code, _ := e.GetAgentAdmin(t, "/config"); code != 200 {
		t.Errorf("agent /config on its admin address: %d", code)
	}
	if code, _ := e.GetAgentAdmin(t, "/debug/pprof/cmdline"); code != 200 {
		t.Errorf("agent pprof on its admin address: %d", code)
	}
	for _, p := range []string{"/config", "/debug/pprof/cmdline"} {
		if code, _ := e.GetAgent(t, p); code != 404 {
			t.Errorf("agent %s on its metrics address: %d, want 404", p, code)
		}
	}

	// The operator opens it: admin_address 0.0.0.0 answers on the host's address.
	if ip == "" {
		t.Log("no address but loopback here: admin_address 0.0.0.0 not tried")
		return
	}
	_, port, _ = net.SplitHostPort(testenv.FreeAddr(t))
	start("open", "  observability:\n    admin_address: 0.0.0.0\n    admin_port: "+port+"\n")
	if code, _ := testenv.HTTPGet("http://" + net.JoinHostPort(ip, port) + "/config"); code != 200 {
		t.Errorf("admin_address 0.0.0.0: /config on %s:%s: %d", ip, port, code)
	}
}
