package e2e

import (
	"encoding/json"
	"os"
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/internal/testenv"
)

// TestConfigDumpRedacted serves the shipped example configs, with every kind of secret they
// can hold added (a literal API key, a key from the environment, the issuer's PEM read from a
// file, tracing headers with a literal token and a reference), and reads /config from both
// processes: the dump shows the config in force, the shadow entry, the agents and their
// versions, the references as written, and no secret value.
func TestConfigDumpRedacted(t *testing.T) {
	const (
		literalKey     = "literal-api-key-5f1b9c"
		tracingToken   = "tracing-token-7d3e21"
		kernelTracing  = "kernel-tracing-token-9a8b7c"
		demoKeySHA     = "a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873"
		agentTracingUp = `    tracing:
      enabled: false
      endpoint: "collector.example.com:4317"
      headers:
        authorization: "Bearer ` + tracingToken + `"
        x-api-token: "${env:OTLP_TOKEN}"
`
	)
	agentCfg := exampleConfig(t, "agent-config.yaml")
	agentCfg = strings.Replace(agentCfg, `            user_id: "api-client"`, `            user_id: "api-client"
          - key: "`+literalKey+`"
            user_id: "literal-client"`, 1)
	agentCfg = strings.Replace(agentCfg, `  observability:
`, `  observability:
`+agentTracingUp, 1)
	kernelCfg := exampleConfig(t, "kernel-config.yaml")
	kernelCfg = strings.Replace(kernelCfg, `        - policy: "rateLimit"
`, `        - policy: "rateLimit"
          mode: shadow
`, 1)
	kernelCfg = strings.Replace(kernelCfg, `      sampling_rate: 0.01`, `      sampling_rate: 0.01
      headers:
        authorization: "Bearer `+kernelTracing+`"
        x-ref: "${file:/etc/policy-engine/otlp-token}"`, 1)
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentCfg, KernelYAML: kernelCfg, AgentEnv: []string{demoKeyEnv, "OTLP_TOKEN=env-otlp-token-31c2"}})

	pem, err := os.ReadFile("../config/demo/jwt-demo-public.pem")
	if err != nil {
		t.Fatal(err)
	}
	pemLine := strings.Split(strings.TrimSpace(string(pem)), "\n")[1]
	forbidden := []string{literalKey, tracingToken, kernelTracing, demoKeySHA, "env-otlp-token-31c2", pemLine}

	code, kbody := e.GetAdmin(t, "/config")
	if code != 200 {
		t.Fatalf("kernel /config: %d %s", code, kbody)
	}
	code, abody := e.GetAgentAdmin(t, "/config")
	if code != 200 {
		t.Fatalf("agent /config: %d %s", code, abody)
	}
	// Not on the metrics listeners, which Prometheus and the kubelet reach.
	if code, _ := e.Get(t, "/config"); code != 404 {
		t.Errorf("kernel /config on the metrics listener: %d", code)
	}
	if code, _ := e.GetAgent(t, "/config"); code != 404 {
		t.Errorf("agent /config on the metrics listener: %d", code)
	}
	for _, s := range forbidden {
		for name, body := range map[string]string{"kernel": kbody, "agent": abody} {
			if strings.Contains(body, s) {
				t.Errorf("%s /config shows the secret %.10s...:\n%s", name, s, body)
			}
		}
	}
	// exampleConfig moved the PEM's path to config/demo.
	for _, want := range []string{`"${env:POLICY_ENGINE_API_KEY_SHA256}"`, `/config/demo/jwt-demo-public.pem}"`, `"${env:OTLP_TOKEN}"`, `{"key":"[REDACTED]"`} {
		if !strings.Contains(abody, want) {
			t.Errorf("agent /config lacks %s:\n%s", want, abody)
		}
	}

	var k struct {
		ConfigVersion string `json:"config_version"`
		LoadedAt      string `json:"loaded_at"`
		Ready         bool   `json:"ready"`
		Routes        []struct {
			Name    string `json:"name"`
			Status  string `json:"status"`
			Request []struct {
				Policy string         `json:"policy"`
				Mode   string         `json:"mode"`
				Meta   map[string]any `json:"metadata"`
			} `json:"request_policy_chain"`
		} `json:"routes"`
		Default *struct{ Name string } `json:"default_route"`
		Agents  []struct {
			Name          string   `json:"name"`
			Healthy       bool     `json:"healthy"`
			ConfigVersion string   `json:"config_version"`
			Policies      []string `json:"policies"`
		} `json:"agents"`
		Tracing struct {
			Headers map[string]string `json:"headers"`
		} `json:"tracing"`
	}
	if err := json.Unmarshal([]byte(kbody), &k); err != nil {
		t.Fatalf("kernel /config is not JSON: %v\n%s", err, kbody)
	}
	if k.ConfigVersion == "" || k.LoadedAt == "" || !k.Ready || len(k.Routes) != 2 || k.Default == nil || k.Default.Name != "default" {
		t.Fatalf("kernel /config: %+v", k)
	}
	users := k.Routes[0]
	if users.Name != "/api/v1/users" || users.Status != "ok" || len(users.Request) != 2 ||
		users.Request[0].Mode != "enforce" || users.Request[1].Policy != "rateLimit" || users.Request[1].Mode != "shadow" ||
		users.Request[0].Meta["header_name"] != "X-API-Key" {
		t.Fatalf("route /api/v1/users: %+v", users)
	}
	if len(k.Agents) != 1 || !k.Agents[0].Healthy || k.Agents[0].ConfigVersion == "" || len(k.Agents[0].Policies) < 8 {
		t.Fatalf("agents: %+v", k.Agents)
	}
	if k.Tracing.Headers["authorization"] != "[REDACTED]" || k.Tracing.Headers["x-ref"] != "${file:/etc/policy-engine/otlp-token}" {
		t.Fatalf("tracing headers: %v", k.Tracing.Headers)
	}

	var a struct {
		ConfigVersion  string                    `json:"config_version"`
		PolicySettings map[string]map[string]any `json:"policy_settings"`
	}
	if err := json.Unmarshal([]byte(abody), &a); err != nil {
		t.Fatalf("agent /config is not JSON: %v\n%s", err, abody)
	}
	if pemRef, _ := a.PolicySettings["jwtValidation"]["public_key_pem"].(string); a.ConfigVersion != k.Agents[0].ConfigVersion || !strings.HasPrefix(pemRef, "${file:") {
		t.Fatalf("agent /config: %+v", a)
	}
}
