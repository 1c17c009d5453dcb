package kernel

import (
	"strings"
	"testing"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// realPolicies advertises the real agent's policy names.
func realPolicies() map[string]*agentv1.PolicyInfo {
	adv := map[string]*agentv1.PolicyInfo{}
	for _, n := range []string{"apiKeyAuth", "jwtValidation", "roleCheck", "rateLimit", "addSecurityHeaders", "responseBodyTransform", "auditLog", "allowAll"} {
		adv[n] = &agentv1.PolicyInfo{Name: n, SupportedPhases: []agentv1.PolicyPhase{agentv1.PolicyPhase_REQUEST}}
	}
	return adv
}

func TestClosestPolicy(t *testing.T) {
	adv := realPolicies()
	for name, want := range map[string]string{
		"apikeyauth":    "apiKeyAuth", // case only
		"APIKEYAUTH":    "apiKeyAuth",
		"apiKeyAth":     "apiKeyAuth", // a letter dropped
		"apiKeyAuht":    "apiKeyAuth", // two letters swapped
		"jwtValidaton":  "jwtValidation",
		"ratelimt":      "rateLimit", // case and a letter
		"rolecheck":     "roleCheck",
		"auditLogs":     "auditLog",
		"nope":          "",
		"notThere":      "",
		"":              "",
		"x":             "",
		"allow":         "",
		"basicAuth":     "",
		"rateLimitting": "rateLimit",
	} {
		if got := closestPolicy(name, adv); got != want {
			t.Errorf("closestPolicy(%q) = %q, want %q", name, got, want)
		}
	}
	// A case-only match wins over a nearer name by edit distance.
	adv["abc"] = &agentv1.PolicyInfo{Name: "abc"}
	adv["ABD"] = &agentv1.PolicyInfo{Name: "ABD"}
	if got := closestPolicy("abd", adv); got != "ABD" {
		t.Errorf("closestPolicy(abd) = %q, want the case-only match ABD", got)
	}
	// Long input costs nothing: its length alone rules every name out.
	if got := closestPolicy(strings.Repeat("a", 1<<20), adv); got != "" {
		t.Errorf("long name: %q", got)
	}
	if got := closestPolicy("anything", nil); got != "" {
		t.Errorf("no policies advertised: %q", got)
	}
}

// TestUnsupportedPolicySuggestsAName checks the problem a misspelled chain entry gets at load,
// reload and --validate.
func TestUnsupportedPolicySuggestsAName(t *testing.T) {
	adv := realPolicies()
	_, problems := compileChain([]ChainEntry{{Policy: "apikeyAuth"}, {Policy: "allowAll"}, {Policy: "noSuchPolicy"}}, agentv1.PolicyPhase_REQUEST, "default-agent", adv, "k", nil)
	if len(problems) != 2 {
		t.Fatalf("problems: %v", problems)
	}
	if problems[0].key != "k[0].policy" || problems[0].msg != `policy "apikeyAuth" is not supported by agent "default-agent" (did you mean "apiKeyAuth"?)` {
		t.Errorf("misspelled: %+v", problems[0])
	}
	if problems[1].key != "k[2].policy" || problems[1].msg != `policy "noSuchPolicy" is not supported by agent "default-agent"` {
		t.Errorf("unknown: %+v", problems[1])
	}
}
