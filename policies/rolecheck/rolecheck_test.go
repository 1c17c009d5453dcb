package rolecheck

import (
	"bytes"
	"encoding/json"
	"maps"
	"reflect"
	"slices"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/policies/jwtvalidation"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func mustBuild(t testing.TB, md map[string]string) *RoleCheck {
	t.Helper()
	p, err := build(md)
	if err != nil {
		t.Fatalf("build(%v): %v", md, err)
	}
	return p.(*RoleCheck)
}

func runWith(t testing.TB, p *RoleCheck, state map[string]string) policy.Result {
	t.Helper()
	r, err := p.Execute(t.Context(), &policy.Context{Phase: agentv1.PolicyPhase_REQUEST, Headers: map[string]string{}, State: state})
	if err != nil {
		t.Fatalf("Execute: %v", err)
	}
	return r
}

// denied returns the status and body of a denial, or 0 for an allow.
func denied(t testing.TB, r policy.Result) (int, map[string]string, policy.ErrorBody) {
	t.Helper()
	var body policy.ErrorBody
	switch r.Status {
	case agentv1.StatusCode_OK:
		if len(r.Instructions) != 0 {
			t.Fatalf("allow with instructions %v", r.Instructions)
		}
		return 0, nil, body
	case agentv1.StatusCode_POLICY_DENIED:
	default:
		t.Fatalf("status %v", r.Status)
	}
	ir := r.Instructions[0].GetImmediateResponse()
	dec := json.NewDecoder(bytes.NewReader(ir.GetBody()))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&body); err != nil {
		t.Fatalf("body %q: %v", ir.GetBody(), err)
	}
	return int(ir.GetStatusCode()), ir.GetHeaders(), body
}

func TestRoleCheck(t *testing.T) {
	claims := `{"sub":"u","roles":["admin","reader",7],"scope":"read:users  write:users","realm_access":{"roles":["ops"]},` +
		`"https://example.com/roles":["tenant-admin"],"group":"solo","count":3}`
	cases := []struct {
		name string
		md   map[string]string
		want int
	}{
		{"one role held", map[string]string{"required_roles": `["admin"]`}, 0},
		{"single string form", map[string]string{"required_roles": "reader"}, 0},
		{"role not held", map[string]string{"required_roles": `["root"]`}, 403},
		{"any of two", map[string]string{"required_roles": `["root","reader"]`}, 0},
		{"explicit any", map[string]string{"required_roles": `["root","reader"]`, "match": "any"}, 0},
		{"all held", map[string]string{"required_roles": `["admin","reader"]`, "match": "all"}, 0},
		{"all, one missing", map[string]string{"required_roles": `["admin","root"]`, "match": "all"}, 403},
		{"numbers are not roles", map[string]string{"required_roles": `["7"]`}, 403},
		{"scope string", map[string]string{"required_roles": `["write:users"]`, "claim": "scope"}, 0},
		{"scope string, all", map[string]string{"required_roles": `["read:users","write:users"]`, "claim": "scope", "match": "all"}, 0},
		{"scope is split, not matched by substring", map[string]string{"required_roles": `["read"]`, "claim": "scope"}, 403},
		{"nested claim", map[string]string{"required_roles": `["ops"]`, "claim": "realm_access.roles"}, 0},
		{"nested claim, other role", map[string]string{"required_roles": `["admin"]`, "claim": "realm_access.roles"}, 403},
		{"claim name with dots", map[string]string{"required_roles": `["tenant-admin"]`, "claim": "https://example.com/roles"}, 0},
		{"plain string claim", map[string]string{"required_roles": `["solo"]`, "claim": "group"}, 0},
		{"number claim", map[string]string{"required_roles": `["3"]`, "claim": "count"}, 403},
		{"object claim", map[string]string{"required_roles": `["ops"]`, "claim": "realm_access"}, 403},
		{"missing claim", map[string]string{"required_roles": `["admin"]`, "claim": "groups"}, 403},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := mustBuild(t, c.md)
			status, h, body := denied(t, runWith(t, p, map[string]string{jwtvalidation.StateClaims: claims}))
			if status != c.want {
				t.Fatalf("status %d, want %d", status, c.want)
			}
			if status == 403 {
				if body.Error != "forbidden" || body.Message != "insufficient role" ||
					h["www-authenticate"] != `Bearer error="insufficient_scope", error_description="insufficient role"` {
					t.Errorf("denial %v %+v", h, body)
				}
			}
		})
	}
}

// TestNoClaims checks that the policy fails closed without verified claims.
func TestNoClaims(t *testing.T) {
	p := mustBuild(t, map[string]string{"required_roles": "admin"})
	for name, state := range map[string]map[string]string{
		"no state":         nil,
		"other state only": {"user_id": "u", "auth_method": "api_key"},
		"empty claims":     {jwtvalidation.StateClaims: ""},
		"not JSON":         {jwtvalidation.StateClaims: "roles=admin"},
		"JSON null":        {jwtvalidation.StateClaims: "null"},
		"JSON list":        {jwtvalidation.StateClaims: `["admin"]`},
	} {
		t.Run(name, func(t *testing.T) {
			r := runWith(t, p, state)
			status, _, body := denied(t, r)
			if status != 403 || body.Error != "forbidden" || body.Message != "no verified token claims" {
				t.Errorf("got %d %+v", status, body)
			}
			if !strings.Contains(r.Message, "jwtValidation must run before roleCheck") {
				t.Errorf("result message %q does not tell the operator why", r.Message)
			}
		})
	}
}

func TestBuildErrors(t *testing.T) {
	f := func(md map[string]string, want string) {
		t.Helper()
		p, err := build(md)
		if err == nil {
			t.Fatalf("build(%v) = %v, want error %q", md, p, want)
		}
		if err.Error() != want {
			t.Errorf("build(%v):\n got %q\nwant %q", md, err, want)
		}
	}
	f(nil, `metadata key "required_roles": required`)
	f(map[string]string{"required_roles": ""}, `required_roles: empty`)
	f(map[string]string{"required_roles": "[]"}, `required_roles: empty list`)
	f(map[string]string{"required_roles": `["a",""]`}, `required_roles: empty role in list`)
	f(map[string]string{"required_roles": `["a",1]`}, `required_roles: want a role or a JSON list of roles: json: cannot unmarshal number into Go value of type string`)
	f(map[string]string{"required_roles": "a", "match": "most"}, `match: want "any" or "all", got "most"`)
	f(map[string]string{"required_roles": "a", "claim": ""}, `claim: invalid claim path ""`)
	f(map[string]string{"required_roles": "a", "claim": "a..b"}, `claim: invalid claim path "a..b"`)
	f(map[string]string{"required_roles": "a", "claim": ".a"}, `claim: invalid claim path ".a"`)
	f(map[string]string{"required_roles": "a", "rolez": "x"}, `metadata key "rolez": unknown key`)
	f(map[string]string{"required_roles": "[", "match": "x"}, "required_roles: want a role or a JSON list of roles: unexpected end of JSON input\nmatch: want \"any\" or \"all\", got \"x\"")
}

func TestBuildDefaults(t *testing.T) {
	p := mustBuild(t, map[string]string{"required_roles": ` ["a","b"] `})
	if !slices.Equal(p.roles, []string{"a", "b"}) || p.all || p.claim != DefaultClaim {
		t.Errorf("got %+v", p)
	}
	m, ok := policy.Lookup(Name)
	if !ok || m.Phases != policy.Request {
		t.Fatalf("module: %+v", m)
	}
	fac, err := m.New(policy.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fac.Build(map[string]string{"required_roles": "a"}); err != nil {
		t.Errorf("factory Build: %v", err)
	}
}

// TestSchema checks that the published schema is JSON and names exactly the metadata keys.
func TestSchema(t *testing.T) {
	var s struct {
		Required   []string                   `json:"required"`
		Properties map[string]json.RawMessage `json:"properties"`
	}
	if err := json.Unmarshal([]byte(schema), &s); err != nil {
		t.Fatalf("schema is not JSON: %v", err)
	}
	var want []string
	st := reflect.TypeOf(Settings{})
	for i := 0; i < st.NumField(); i++ {
		want = append(want, st.Field(i).Tag.Get("json"))
	}
	slices.Sort(want)
	if got := slices.Sorted(maps.Keys(s.Properties)); !slices.Equal(got, want) || !slices.Equal(s.Required, []string{"required_roles"}) {
		t.Errorf("schema properties %v required %v, want %v", got, s.Required, want)
	}
	if m, _ := policy.Lookup(Name); m.MetadataSchema != schema {
		t.Error("module publishes another schema")
	}
}

// FuzzRoleCheck runs arbitrary claims and settings. Properties: Execute never fails; a
// decision agrees with a plain reading of the claim; a denial is one of the fixed answers.
func FuzzRoleCheck(f *testing.F) {
	f.Add(`{"roles":["admin"]}`, "roles", "admin", false)
	f.Add(`{"scope":"a b c"}`, "scope", `["a","c"]`, true)
	f.Add(`{"realm_access":{"roles":["x"]}}`, "realm_access.roles", `["x","y"]`, false)
	f.Add(`{"a.b":"z","a":{"b":"y"}}`, "a.b", "y", false)
	f.Add(`null`, "roles", "r", true)
	f.Add(`{"roles":[1,null,{"x":"admin"}]}`, "roles", "admin", false)
	f.Fuzz(func(t *testing.T, claims, claim, roles string, all bool) {
		md := map[string]string{"required_roles": roles, "claim": claim}
		if all {
			md["match"] = "all"
		}
		pol, err := build(md)
		if err != nil {
			return
		}
		p := pol.(*RoleCheck)
		r := runWith(t, p, map[string]string{jwtvalidation.StateClaims: claims})
		status, _, body := denied(t, r)

		var m map[string]any
		dec := json.NewDecoder(strings.NewReader(claims))
		dec.UseNumber()
		if err := dec.Decode(&m); err != nil || m == nil {
			if status != 403 || body.Message != "no verified token claims" {
				t.Fatalf("unreadable claims %q: got %d %+v", claims, status, body)
			}
			return
		}
		v, _ := jwtvalidation.LookupClaim(m, claim)
		held := map[string]bool{}
		for _, h := range heldRoles(v) {
			held[h] = true
		}
		n := 0
		for _, want := range p.roles {
			if held[want] {
				n++
			}
		}
		ok := n > 0
		if all {
			ok = n == len(p.roles)
		}
		if ok != (status == 0) {
			t.Fatalf("claims %q claim %q roles %v all=%v: status %d, want allow=%v", claims, claim, p.roles, all, status, ok)
		}
		if status != 0 && (status != 403 || body.Message != "insufficient role") {
			t.Fatalf("denial %d %+v", status, body)
		}
	})
}
