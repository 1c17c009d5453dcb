package policyctl

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/kernel"
)

// TestExplainRemoteOldAgent: a kernel whose agent predates PolicyRequest.explain answers with
// agent calls and no traces; policyctl says the entries' outcomes are unknown instead of
// "not run", and still prints the answer. The request it POSTs is the one of the flags.
func TestExplainRemoteOldAgent(t *testing.T) {
	var got kernel.ExplainInput
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/debug/explain" || r.Method != http.MethodPost {
			http.NotFound(w, r)
			return
		}
		b, _ := io.ReadAll(r.Body)
		if err := json.Unmarshal(b, &got); err != nil {
			t.Error(err)
		}
		rep := kernel.ExplainReport{Route: "/r", Rule: "path prefix", Agent: "a", AgentCalls: 1,
			RequestChain: []kernel.ExplainEntry{{Policy: "apiKeyAuth"}}, ResponseChain: []kernel.ExplainEntry{}, Traces: []kernel.ExplainTrace{},
			Result: kernel.ExplainResult{Status: 403, LocalReply: true, Details: "forbidden", Body: `{"error":"forbidden"}`}}
		_ = json.NewEncoder(w).Encode(rep)
	}))
	defer srv.Close()
	var out, errOut bytes.Buffer
	code := Main(context.Background(), []string{"explain", "--kernel-admin", srv.URL, "POST", "/r/x", "-H", "X-API-Key: k1", "--route", "/r"}, &out, &errOut)
	if code != ExitRefused {
		t.Fatalf("exit %d: %s%s", code, out.String(), errOut.String())
	}
	for _, want := range []string{"note: the agent answered without per-entry traces", "1. apiKeyAuth", " unknown\n", "local reply 403"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
	if got.Method != "POST" || got.Path != "/r/x" || got.Attributes["xds.route_name"] != "/r" || len(got.Headers) != 1 || got.Upstream.Status != 200 {
		t.Errorf("posted %+v", got)
	}
	// Configs and --kernel-admin together: a usage error.
	if code := Main(context.Background(), []string{"explain", "--kernel-admin", srv.URL, "--config", "k.yaml", "/r"}, &out, &errOut); code != ExitError {
		t.Errorf("--kernel-admin with --config: exit %d", code)
	}
}
