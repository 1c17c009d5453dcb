package policy

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

func TestRegisterPanics(t *testing.T) {
	newF := func(Config) (Factory, error) { return nil, nil }
	f := func(name string, m Module) {
		t.Helper()
		defer func() {
			v := recover()
			if v == nil || !strings.HasPrefix(v.(string), "BUG: ") {
				t.Errorf("%s: want a BUG panic, got %v", name, v)
			}
		}()
		Register(m)
	}
	f("empty name", Module{New: newF, Phases: Request})
	f("no New", Module{Name: "x-test-nonew", Phases: Request})
	f("no phase", Module{Name: "x-test-nophase", New: newF})
	Register(Module{Name: "x-test-dup", New: newF, Phases: Request})
	defer unregister("x-test-dup")
	f("duplicate", Module{Name: "x-test-dup", New: newF, Phases: Request})
	if _, ok := Lookup("x-test-dup"); !ok {
		t.Fatal("registered module not found")
	}
	found := false
	for i, m := range Modules() {
		if i > 0 && Modules()[i-1].Name > m.Name {
			t.Fatal("Modules not sorted")
		}
		found = found || m.Name == "x-test-dup"
	}
	if !found {
		t.Fatal("Modules misses a registered module")
	}
}

func TestPhases(t *testing.T) {
	if !Request.Has(agentv1.PolicyPhase_REQUEST) || Request.Has(agentv1.PolicyPhase_RESPONSE) {
		t.Fatal("Request phase set wrong")
	}
	if !Both.Has(agentv1.PolicyPhase_RESPONSE) || !Response.Has(agentv1.PolicyPhase_RESPONSE) || Response.Has(agentv1.PolicyPhase_REQUEST) {
		t.Fatal("Response phase set wrong")
	}
}

func TestInstructions(t *testing.T) {
	if in := SetHeader("a", "b"); in.GetType() != agentv1.InstructionType_SET_HEADER || in.GetHeader().GetValue() != "b" || in.GetHeader().GetAppend() {
		t.Fatal(in)
	}
	if in := AppendHeader("a", "b"); !in.GetHeader().GetAppend() {
		t.Fatal(in)
	}
	if in := RemoveHeader("a"); in.GetType() != agentv1.InstructionType_REMOVE_HEADER || in.GetHeader().GetKey() != "a" {
		t.Fatal(in)
	}
	if in := SetBody([]byte("x")); string(in.GetBody().GetBody()) != "x" {
		t.Fatal(in)
	}
	if in := SetState("k", "v"); in.GetState().GetKey() != "k" || in.GetState().GetValue() != "v" {
		t.Fatal(in)
	}
	if r := Allow(SetHeader("a", "b")); r.Status != agentv1.StatusCode_OK || len(r.Instructions) != 1 {
		t.Fatal(r)
	}
}

func TestDenyEscapes(t *testing.T) {
	hostile := `"}, "admin": true, "x": "` + "\n<script>"
	r := Deny(401, "unauthorized", hostile, map[string]string{"www-authenticate": "API-Key"})
	if r.Status != agentv1.StatusCode_POLICY_DENIED || len(r.Instructions) != 1 {
		t.Fatalf("%+v", r)
	}
	ir := r.Instructions[0].GetImmediateResponse()
	if ir.GetStatusCode() != 401 || ir.GetHeaders()["www-authenticate"] != "API-Key" || ir.GetHeaders()["content-type"] != "application/json" || ir.GetDetails() != "unauthorized" {
		t.Fatalf("%+v", ir)
	}
	var body map[string]any
	if err := json.Unmarshal(ir.GetBody(), &body); err != nil {
		t.Fatal(err)
	}
	if len(body) != 2 || body["message"] != hostile || body["error"] != "unauthorized" {
		t.Fatalf("body %v", body)
	}
}

type settings struct {
	Name     string            `json:"name" required:"true"`
	Flag     bool              `json:"flag"`
	N        int               `json:"n"`
	U        uint16            `json:"u"`
	F        float64           `json:"f"`
	D        time.Duration     `json:"d"`
	List     []string          `json:"list"`
	Map      map[string]string `json:"map"`
	Default  string
	Opt      *bool  `json:"opt"`
	Skipped  string `json:"-"`
	internal string
}

func TestDecodeMetadata(t *testing.T) {
	var s settings
	err := DecodeMetadata(map[string]string{
		"name": "x", "flag": "true", "n": "-3", "u": "7", "f": "1.5", "d": "250ms",
		"list": `["a","b"]`, "map": `{"k":"v"}`, "Default": "dflt", "opt": "false",
	}, &s)
	if err != nil {
		t.Fatal(err)
	}
	if s.Name != "x" || !s.Flag || s.N != -3 || s.U != 7 || s.F != 1.5 || s.D != 250*time.Millisecond || len(s.List) != 2 || s.Map["k"] != "v" || s.Default != "dflt" || s.Opt == nil || *s.Opt {
		t.Fatalf("%+v", s)
	}
}

func TestDecodeMetadataErrors(t *testing.T) {
	f := func(md map[string]string, want string) {
		t.Helper()
		var s settings
		err := DecodeMetadata(md, &s)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("DecodeMetadata(%v) = %v, want %q", md, err, want)
		}
	}
	f(map[string]string{}, `metadata key "name": required`)
	f(map[string]string{"name": "x", "bogus": "1"}, `metadata key "bogus": unknown key`)
	f(map[string]string{"name": "x", "Skipped": "1"}, `metadata key "Skipped": unknown key`)
	f(map[string]string{"name": "x", "flag": "yes"}, `metadata key "flag": want true or false, got "yes"`)
	f(map[string]string{"name": "x", "n": "1.5"}, `want an integer`)
	f(map[string]string{"name": "x", "opt": "nope"}, `metadata key "opt": want true or false`)
	f(map[string]string{"name": "x", "u": "-1"}, `want a non-negative integer`)
	f(map[string]string{"name": "x", "u": "70000"}, `want a non-negative integer`)
	f(map[string]string{"name": "x", "f": "x"}, `want a number`)
	f(map[string]string{"name": "x", "d": "5"}, `want a duration`)
	f(map[string]string{"name": "x", "list": `["a"] x`}, `invalid JSON`)
	f(map[string]string{"name": "x", "list": `{"a":1}`}, `invalid JSON`)
	// All problems at once, sorted by key.
	var s settings
	err := DecodeMetadata(map[string]string{"z": "1", "a": "1"}, &s)
	if err == nil || strings.Index(err.Error(), `"a"`) > strings.Index(err.Error(), `"z"`) || !strings.Contains(err.Error(), `"name": required`) {
		t.Fatalf("got %v", err)
	}
}

func TestDecodeMetadataPanicsOnNonStruct(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("no panic")
		}
	}()
	var n int
	_ = DecodeMetadata(nil, &n)
}

func TestConfigDecode(t *testing.T) {
	var v struct {
		A int `json:"a"`
	}
	if err := (Config{}).Decode(&v); err != nil || v.A != 0 {
		t.Fatal(err)
	}
	if err := (Config{Raw: []byte("null")}).Decode(&v); err != nil {
		t.Fatal(err)
	}
	if err := (Config{Raw: []byte(`{"a":2}`)}).Decode(&v); err != nil || v.A != 2 {
		t.Fatal(err, v)
	}
	if err := (Config{Raw: []byte(`{"b":2}`)}).Decode(&v); err == nil || !strings.Contains(err.Error(), `unknown field "b"`) {
		t.Fatal(err)
	}
}

func TestFactoryFuncAndContext(t *testing.T) {
	called := false
	var f Factory = FactoryFunc(func(md map[string]string) (Policy, error) { called = md["x"] == "1"; return nil, nil })
	_, _ = f.Build(map[string]string{"x": "1"})
	if !called {
		t.Fatal("FactoryFunc did not call through")
	}
	c := &Context{Headers: map[string]string{"a": "b"}}
	if c.Header("a") != "b" {
		t.Fatal("Header")
	}
	_ = context.Background()
}

func FuzzDecodeMetadata(f *testing.F) {
	f.Add("name", "x", "list", `["a"]`)
	f.Add("d", "1s", "map", `{"a":"b"}`)
	f.Add("n", "99999999999999999999", "f", "NaN")
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2 string) {
		var s settings
		_ = DecodeMetadata(map[string]string{k1: v1, k2: v2}, &s)
	})
}

func TestQueryParams(t *testing.T) {
	c := &Context{Path: "/a?x=1&y=2&x=3&z"}
	q := c.QueryParams()
	if q["x"] != "1" || q["y"] != "2" || q["z"] != "" || len(q) != 3 {
		t.Fatalf("query %v", q)
	}
	q["x"] = "changed"
	if c.QueryParams()["x"] != "changed" {
		t.Error("query parsed again instead of kept")
	}
	if q := (&Context{Path: "/no-query"}).QueryParams(); q == nil || len(q) != 0 {
		t.Errorf("no query: %v", q)
	}
	c = &Context{Path: "/a?x=1"}
	c.SetQueryParams(map[string]string{"k": "v"})
	if q := c.QueryParams(); q["k"] != "v" || q["x"] != "" {
		t.Errorf("query sent by the kernel: %v", q)
	}
}
