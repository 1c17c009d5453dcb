package faults

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/golang-jwt/jwt/v5"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// secrets are what clients send that must never show up anywhere else: each holds a distinctive
// core that the test looks for, whole and in part.
var secrets = map[string]string{
	"valid API key":       "sk-live-Zq8VALIDk3y",
	"wrong API key":       "sk-live-Xw4WRONGk3y",
	"bearer token":        "opaque-B3ARER-t0ken-9921",
	"JWT HMAC secret":     "hm4c-JWTSECRET-0123456789abcdef0123456789",
	"cookie":              "s3ss10n-C00KIE-7731",
	"proxy authorization": "Basic cHJveHk6UFJPWFlwYXNz",
	"query token":         "qt-QUERYTOKEN-5511",
}

const secretsAgentYAML = `agent_core:
  name: default-agent
  socket_path: "{{SOCK}}"
  policies:
    config:
      apiKeyAuth:
        keys: [{key_env: FAULTS_API_KEY, user_id: fault-user}]
      jwtValidation:
        hmac_secret_env: FAULTS_JWT_SECRET
  observability:
    log_level: %s
    metrics_address: "{{AGENT_METRICS}}"
`

const secretsKernelYAML = `policy_kernel:
  server: {message_timeout_ms: 200}
  agents:
    - name: a
      socket_path: "{{SOCK}}"
      timeout_ms: 150
      health_check_interval_ms: 2000
  route_policies:
    - route_name: /key
      request_policy_chain: [{policy: apiKeyAuth, metadata: {remove_key_header: true}}]
    - route_name: /jwt
      request_policy_chain:
        - {policy: jwtValidation, metadata: {issuer: "https://auth.example.com", audience: api, claims_to_headers: {sub: X-User-ID}}}
    - route_name: /echo
      request_policy_chain:
        - {policy: apiKeyAuth, metadata: {required: false}}
        - {policy: testEcho, metadata: {from: x-in, to: x-out}}
    - route_name: /panic
      request_policy_chain: [{policy: testPanic}]
    - route_name: /badutf8
      request_policy_chain: [{policy: testBadUTF8}]
%s  observability:
    log_level: %s
`

// brokenRoute names a policy the agent lacks. The kernel starts with it (the route is marked
// invalid and denied, and the kernel is not ready) but refuses a reload that has it, so only
// the first config carries it.
const brokenRoute = `    - route_name: /broken
      request_policy_chain: [{policy: noSuchPolicy}]
`

// hupCounted sends SIGHUP and waits until the process counts one more of series.
func hupCounted(t *testing.T, p *testenv.Proc, get func(testing.TB, string) (int, string), series string) {
	t.Helper()
	read := func() float64 { _, body := get(t, "/metrics"); return testenv.Metric(body, series) }
	before := read()
	if err := p.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for read() <= before {
		if time.Now().After(deadline) {
			t.Fatalf("%s did not count the reload:\n%s", series, p.Logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestSecretsNeverLeak sends API keys, tokens and cookies through every route and failure, at
// every log level, and checks that none of them appears in a log line of either process, in a
// metric, in an answer to the client, or in a gRPC error.
func TestSecretsNeverLeak(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{
		AgentYAML:  fmt.Sprintf(secretsAgentYAML, "debug"),
		KernelYAML: fmt.Sprintf(secretsKernelYAML, brokenRoute, "debug"),
		AgentEnv:   []string{"FAULTS_API_KEY=" + secrets["valid API key"], "FAULTS_JWT_SECRET=" + secrets["JWT HMAC secret"]},
		AgentBin:   testenv.Build(t, testenv.TestAgentPackage),
		NotReady:   true,
	})
	// Tokens: valid, signed with another secret, expired, and unsigned.
	sign := func(key []byte, method jwt.SigningMethod, exp time.Duration) string {
		tok, err := jwt.NewWithClaims(method, jwt.MapClaims{"iss": "https://auth.example.com", "aud": "api", "sub": "alice",
			"exp": time.Now().Add(exp).Unix()}).SignedString(key)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	tokens := map[string]string{
		"valid JWT":   sign([]byte(secrets["JWT HMAC secret"]), jwt.SigningMethodHS256, time.Hour),
		"forged JWT":  sign([]byte("another-secret-of-enough-length-0123456789"), jwt.SigningMethodHS256, time.Hour),
		"expired JWT": sign([]byte(secrets["JWT HMAC secret"]), jwt.SigningMethodHS256, -time.Hour),
	}
	none, err := jwt.NewWithClaims(jwt.SigningMethodNone, jwt.MapClaims{"sub": "mallory", "iss": "https://auth.example.com", "aud": "api"}).SignedString(jwt.UnsafeAllowNoneSignatureType)
	if err != nil {
		t.Fatal(err)
	}
	tokens["unsigned JWT"] = none
	c := e.Dial(t, envoyConfig)
	conn, err := grpc.NewClient(e.KernelAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var answers, agentLogs strings.Builder
	record := func(s shot) {
		if s.err != nil {
			fmt.Fprintln(&answers, s.err)
			return
		}
		fmt.Fprintln(&answers, s.res.Status, s.res.Details, string(s.res.Body), s.res.Headers)
		for _, m := range s.res.Received {
			fmt.Fprintln(&answers, m.String())
		}
	}
	withSecrets := func(path, key, bearer string) *envoytest.Request {
		return request(path+"?access_token="+secrets["query token"],
			[2]string{"x-api-key", key},
			[2]string{"authorization", "Bearer " + bearer},
			[2]string{"cookie", "session=" + secrets["cookie"] + "; theme=dark"},
			[2]string{"proxy-authorization", secrets["proxy authorization"]},
		)
	}
	traffic := func() {
		keys := []string{secrets["valid API key"], secrets["wrong API key"], "", secrets["valid API key"] + "\xff", secrets["wrong API key"] + "\r\nx: y"}
		bearers := []string{secrets["bearer token"], tokens["valid JWT"], tokens["forged JWT"], tokens["expired JWT"], tokens["unsigned JWT"]}
		for i, key := range keys {
			for _, path := range []string{"/key", "/jwt", "/echo", "/panic", "/badutf8", "/broken", "/unrouted"} {
				record(play(c, path, withSecrets(path, key, bearers[i])))
			}
		}
		// A token that the echo policy copies with a line break: the mutation is dropped and
		// logged, by header name only.
		r := withSecrets("/echo", secrets["valid API key"], tokens["valid JWT"])
		r.Headers = append(r.Headers, [2]string{"x-in", "Bearer " + secrets["bearer token"] + "\r\nx-injected: 1"})
		record(play(c, "/echo", r))
		// Protocol errors on streams that carry the secrets.
		msg := reqHeadersMsg("/key?access_token="+secrets["query token"], true, "x-api-key", secrets["valid API key"], "authorization", "Bearer "+secrets["bearer token"])
		for _, msgs := range [][]*extprocv3.ProcessingRequest{{msg, msg}, {reqBodyMsg(secrets["cookie"])}} {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			st, err := extprocv3.NewExternalProcessorClient(conn).Process(ctx)
			if err == nil {
				for _, m := range msgs {
					_ = st.Send(m)
				}
				for {
					r, err := st.Recv()
					if err != nil {
						fmt.Fprintln(&answers, err)
						break
					}
					fmt.Fprintln(&answers, r.String())
				}
			}
			cancel()
		}
	}

	for _, level := range []string{"debug", "info", "warn", "error"} {
		if level != "debug" {
			// Reloads are logged at info, so they are watched in the metrics.
			writeAtomically(t, e, e.KernelConfig, fmt.Sprintf(secretsKernelYAML, "", level))
			hupCounted(t, e.Kernel, e.Get, `policy_kernel_config_reload_total{status="success"}`)
			writeAtomically(t, e, e.AgentConfig, fmt.Sprintf(secretsAgentYAML, level))
			hupCounted(t, e.Agent, e.GetAgent, `policy_agent_config_reload_total{status="success"}`)
		}
		traffic()
		// The agent goes away and comes back: failures are logged on both sides.
		agentLogs.WriteString(e.Agent.Logs.String())
		e.Agent.Kill()
		traffic()
		e.StartAgent(t)
		testenv.WaitFor(t, 2*healthInterval, "the agent to serve again", func() bool {
			return served(play(c, "/key", request("/key", [2]string{"x-api-key", secrets["valid API key"]}))) &&
				play(c, "/jwt", request("/jwt", [2]string{"authorization", "Bearer " + tokens["valid JWT"]})).outcome() == "upstream"
		})
	}
	alive(t, e)

	_, kernelMetrics := e.Get(t, "/metrics")
	_, agentMetrics := e.GetAgent(t, "/metrics")
	_, ready := e.Get(t, "/health/ready")
	places := map[string]string{
		"kernel log":       e.Kernel.Logs.String(),
		"agent log":        agentLogs.String() + e.Agent.Logs.String(),
		"kernel metrics":   kernelMetrics,
		"agent metrics":    agentMetrics,
		"kernel readiness": ready,
		"client answers":   answers.String(),
	}
	all := map[string]string{}
	for k, v := range secrets {
		all[k] = v
	}
	for k, v := range tokens {
		// A JWT's first segment is the same public header in every token; its claims and
		// signature are what must not leak.
		_, rest, _ := strings.Cut(v, ".")
		all[k] = rest
	}
	for kind, secret := range all {
		for where, text := range places {
			// The whole secret, and any 10 bytes of it: a truncated or partly redacted copy is a
			// leak too.
			for i := 0; i+10 <= len(secret); i++ {
				if part := secret[i : i+10]; strings.Contains(text, part) {
					t.Errorf("%s leaked into the %s (%q)", kind, where, part)
					break
				}
			}
		}
	}
	// The check above looks at real output: the logs hold the failures it was meant to cover.
	for _, want := range []string{"policy agent call failed", "invalid agent response", "request on an invalid route denied", "dropped mutations"} {
		if !strings.Contains(places["kernel log"], want) {
			t.Errorf("the kernel log lacks %q: the test did not exercise that path", want)
		}
	}
	if !strings.Contains(places["agent log"], "policy panicked") {
		t.Error("the agent log lacks the panic")
	}
	t.Logf("reliability: secrets: %d secrets and tokens × 4 log levels, agent killed at each; kernel log %d bytes, agent log %d bytes: no secret found",
		len(all), len(places["kernel log"]), len(places["agent log"]))
}
