package e2e

import (
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// exampleConfig reads a config of config/ with the container's directories moved under the
// test's: the agents' socket directory and the log directory; and with the demo public key of
// config/demo where the agent config reads the JWT issuer's key, as scripts/run.sh does.
func exampleConfig(t *testing.T, name string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "config", name))
	if err != nil {
		t.Fatal(err)
	}
	demoKey, err := filepath.Abs(filepath.Join("..", "config", "demo", "jwt-demo-public.pem"))
	if err != nil {
		t.Fatal(err)
	}
	return strings.NewReplacer(
		"/var/run/policy-engine/agents/default.sock", "{{SOCK}}",
		"/var/log/policy-engine", "{{DIR}}",
		"/etc/policy-engine/keys/jwt-public.pem", demoKey,
		`metrics_address: "127.0.0.1:9091"`, `metrics_address: "{{AGENT_METRICS}}"`,
		`admin_address: "127.0.0.1:9191"`, `admin_address: "{{AGENT_ADMIN}}"`,
	).Replace(string(data))
}

// demoKeyEnv is what scripts/run.sh sets for the example agent config: the SHA-256 of the
// demo API key "demo-key-123".
const demoKeyEnv = "POLICY_ENGINE_API_KEY_SHA256=a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873"

// TestExampleConfigs serves the shipped example configs with the demo keys, as `make run` does,
// and checks what the README promises of them.
func TestExampleConfigs(t *testing.T) {
	kbin, abin := testenv.Binaries(t)
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: exampleConfig(t, "agent-config.yaml"), KernelYAML: exampleConfig(t, "kernel-config.yaml"),
		AgentEnv: []string{demoKeyEnv}})
	for bin, cfg := range map[string]string{abin: e.AgentConfig, kbin: e.KernelConfig} {
		cmd := exec.Command(bin, "--config", cfg, "--validate")
		cmd.Env = append(os.Environ(), demoKeyEnv)
		if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "valid") {
			t.Fatalf("%s --validate: %v\n%s", filepath.Base(bin), err, out)
		}
	}
	c := e.Dial(t, envoyConfig)
	upstream := func(f *envoytest.Forwarded) *envoytest.Response {
		return &envoytest.Response{Status: 200, Headers: [][2]string{{"content-type", "application/json"}, {"content-length", "43"}},
			Body: []byte(`{"id":7,"internal_id":"db-1","name":"Ada"}` + " ")}
	}
	get := func(path string, headers ...[2]string) *envoytest.Result {
		t.Helper()
		res, err := c.Do(t.Context(), &envoytest.Request{Path: path, Headers: headers, Attributes: map[string]string{"source.address": "192.0.2.1:1"}}, upstream)
		if err != nil {
			t.Fatal(err)
		}
		return res
	}

	// /api/v1/users: API key, then security headers and internal_id removed on the way back.
	if r := get("/api/v1/users"); r.Status != 401 {
		t.Fatalf("users without key: %d", r.Status)
	}
	r := get("/api/v1/users/7", [2]string{"x-api-key", "demo-key-123"})
	if r.Status != 200 || string(r.Body) != `{"id":7,"name":"Ada"} ` {
		t.Fatalf("users with key: %d %q %q", r.Status, r.Body, r.Details)
	}
	if v := testenv.Header(r.Forwarded.Headers, "x-user-id"); v != "api-client" {
		t.Fatalf("x-user-id %q", v)
	}
	if v := testenv.Header(r.Headers, "x-frame-options"); v != "DENY" {
		t.Fatalf("response headers %v", r.Headers)
	}

	// /api/v1/admin: a token from the demo key with the admin role; audited.
	keyPEM, err := os.ReadFile("../config/demo/jwt-demo-private.pem")
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(keyPEM)
	key, err := x509.ParseECPrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	token := func(roles ...string) string {
		s, err := jwt.NewWithClaims(jwt.SigningMethodES256, jwt.MapClaims{"iss": "https://auth.example.com", "aud": "api-service",
			"sub": "demo-admin", "roles": roles, "exp": time.Now().Add(time.Hour).Unix()}).SignedString(key)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	if r := get("/api/v1/admin"); r.Status != 401 {
		t.Fatalf("admin without token: %d", r.Status)
	}
	if r := get("/api/v1/admin", [2]string{"authorization", "Bearer " + token("reader")}); r.Status != 403 {
		t.Fatalf("admin as reader: %d", r.Status)
	}
	r = get("/api/v1/admin/users", [2]string{"authorization", "Bearer " + token("admin")})
	if v := testenv.Header(r.Forwarded.Headers, "x-user-id"); r.Status != 200 || v != "demo-admin" {
		t.Fatalf("admin as admin: %d %q", r.Status, v)
	}
	var recs []map[string]any
	testenv.WaitFor(t, 10*time.Second, "three audit records", func() bool {
		data, _ := os.ReadFile(filepath.Join(e.Dir, "audit.log"))
		recs = nil
		for _, l := range strings.Split(strings.TrimSpace(string(data)), "\n") {
			var m map[string]any
			if json.Unmarshal([]byte(l), &m) == nil {
				recs = append(recs, m)
			}
		}
		return len(recs) == 3
	})
	want := []string{"denied jwtValidation 401", "denied roleCheck 403", "allowed  200"}
	for i, rec := range recs {
		got := strings.TrimSpace(rec["decision"].(string) + " " + str(rec["decided_by"]) + " " + str(rec["status"]))
		if strings.Join(strings.Fields(got), " ") != strings.Join(strings.Fields(want[i]), " ") {
			t.Errorf("audit record %d: %s, want %s", i, got, want[i])
		}
	}
	// Unknown paths fall to the default policy.
	if r := get("/"); r.Status != 200 {
		t.Fatalf("default: %d", r.Status)
	}
}

func str(v any) string {
	if v == nil {
		return ""
	}
	return fmt.Sprint(v)
}
