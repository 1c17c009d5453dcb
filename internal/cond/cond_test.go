package cond

import (
	"strings"
	"testing"
)

func sample() *Input {
	return &Input{
		Method: "POST", Path: "/api/orders?limit=5", Host: "shop.example", Scheme: "https",
		SourceAddress: "10.0.0.7", Route: "orders",
		Headers: map[string]string{"x-api-key": "k1", "content-type": "application/json"},
		Query:   map[string]string{"limit": "5"},
		State:   map[string]string{"user_id": "alice"},
	}
}

func TestCondition(t *testing.T) {
	f := func(src string, want bool) {
		t.Helper()
		e, err := CompileCondition(src)
		if err != nil {
			t.Fatalf("%s: %v", src, err)
		}
		got, err := e.Condition(sample())
		if err != nil {
			t.Fatalf("%s: %v", src, err)
		}
		if got != want {
			t.Errorf("%s = %v, want %v", src, got, want)
		}
	}
	f(`request.method != "GET"`, true)
	f(`request.method == "GET"`, false)
	f(`"x-api-key" in request.headers`, true)
	f(`"authorization" in request.headers`, false)
	f(`request.url_path.startsWith("/api/")`, true)
	f(`request.url_path == "/api/orders"`, true)
	f(`request.path.endsWith("limit=5")`, true)
	f(`request.query["limit"] == "5"`, true)
	f(`request.host == "shop.example" && request.scheme == "https"`, true)
	f(`source.address.startsWith("10.")`, true)
	f(`route.name == "orders"`, true)
	f(`state["user_id"] == "alice"`, true)
	f(`request.headers.exists(k, k.startsWith("x-"))`, true)
	f(`request.headers["content-type"].matches("^application/(json|xml)$")`, true)
}

func TestConditionNilMaps(t *testing.T) {
	e, err := CompileCondition(`"a" in request.headers || "a" in request.query || "a" in state`)
	if err != nil {
		t.Fatal(err)
	}
	got, err := e.Condition(&Input{})
	if err != nil || got {
		t.Fatalf("got %v, %v; want false, nil", got, err)
	}
}

func TestResponseVariables(t *testing.T) {
	in := sample()
	in.ResponseCode = 503
	in.ResponseHeaders = map[string]string{"retry-after": "5"}
	for src, want := range map[string]bool{
		`response.code >= 500`:                                 true,
		`response.code == 200`:                                 false,
		`"retry-after" in response.headers`:                    true,
		`request.method == "POST" && response.code / 100 == 5`: true,
	} {
		e, err := CompileCondition(src)
		if err != nil {
			t.Fatalf("%s: %v", src, err)
		}
		if !e.ReadsResponse() {
			t.Errorf("%s: ReadsResponse false", src)
		}
		if got, err := e.Condition(in); err != nil || got != want {
			t.Errorf("%s = %v, %v; want %v", src, got, err, want)
		}
	}
	if e, _ := CompileCondition(`request.method == "GET"`); e.ReadsResponse() {
		t.Error("a request condition reads the response")
	}
	// A cache key is computed before the entry runs: it cannot read the response.
	if _, err := CompileKey(`response.code`); err == nil || !strings.Contains(err.Error(), "undeclared reference") {
		t.Errorf("a key on the response compiled: %v", err)
	}
}

func TestQueryFromPath(t *testing.T) {
	e, err := CompileCondition(`request.query["page"] == "2" && !("x" in request.query)`)
	if err != nil {
		t.Fatal(err)
	}
	in := &Input{Path: "/items?page=2&page=3&q=a%20b"}
	if got, err := e.Condition(in); err != nil || !got {
		t.Fatalf("got %v, %v; want true", got, err)
	}
	if in.Query["q"] != "a b" {
		t.Errorf("query parsed as %v", in.Query)
	}
	for _, p := range []string{"/items", "/items?", "/items?%zz"} {
		got, err := e.Condition(&Input{Path: p})
		if err == nil || got {
			t.Errorf("%s: got %v, %v; want a missing key error", p, got, err)
		}
	}
}

func TestCompileErrors(t *testing.T) {
	f := func(src, want string) {
		t.Helper()
		_, err := CompileCondition(src)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: error %v, want it to contain %q", src, err, want)
		}
	}
	f(``, "empty expression")
	f(`request.methd == "GET"`, "undeclared reference")
	f(`request.methd == "GET"`, "the variables are request.method, request.path")
	f(`request.method == 1`, "no matching overload")
	f(`request.method`, "must be a bool, got string")
	f(`request.method ==`, "Syntax error")
	f(`has(request.headers["x-api-key"])`, `for a map key write "x-api-key" in request.headers`)
	f(strings.Repeat("a", MaxExpressionLength+1), "longer than")
	if _, err := CompileKey(`request.headers`); err == nil || !strings.Contains(err.Error(), "cannot be") && !strings.Contains(err.Error(), "cache key must be") {
		t.Errorf("a map key compiled: %v", err)
	}
}

func TestEvalErrors(t *testing.T) {
	f := func(src, want string) {
		t.Helper()
		e, err := CompileCondition(src)
		if err != nil {
			t.Fatalf("%s: %v", src, err)
		}
		_, err = e.Condition(sample())
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %v, want it to contain %q", src, err, want)
		}
	}
	// A missing key is an error, not false: the entry's on_failure decides.
	f(`request.headers["authorization"] == "x"`, "no such key")
	// The cost limit stops an expression that grows without bound.
	f(`[1,2,3,4,5,6,7,8,9,10].all(a, [1,2,3,4,5,6,7,8,9,10].all(b, [1,2,3,4,5,6,7,8,9,10].all(c, [1,2,3,4,5,6,7,8,9,10].all(d, a+b+c+d > 0))))`, "cost limit")
}

func TestReadsState(t *testing.T) {
	f := func(src string, want bool) {
		t.Helper()
		e, err := CompileCondition(src)
		if err != nil {
			t.Fatal(err)
		}
		if e.ReadsState() != want {
			t.Errorf("%s: ReadsState = %v, want %v", src, e.ReadsState(), want)
		}
	}
	f(`request.method == "GET"`, false)
	f(`"role" in state`, true)
	f(`request.method == "GET" || state["x"] == "y"`, true)
}

func TestKey(t *testing.T) {
	key := func(srcs ...string) string {
		t.Helper()
		var b []byte
		for _, s := range srcs {
			e, err := CompileKey(s)
			if err != nil {
				t.Fatalf("%s: %v", s, err)
			}
			if b, err = e.AppendKey(b, sample()); err != nil {
				t.Fatalf("%s: %v", s, err)
			}
		}
		return string(b)
	}
	if got := key(`request.headers["x-api-key"]`, `request.method`); got != "2:k14:POST" {
		t.Errorf("key = %q", got)
	}
	// Parts never run into each other.
	if key(`"ab"`, `"c"`) == key(`"a"`, `"bc"`) {
		t.Error("keys of different parts are equal")
	}
	if got := key(`size(request.headers)`, `true`, `1u`, `1.5`); got != "1:24:true2:1u3:1.5" {
		t.Errorf("key = %q", got)
	}
	e, err := CompileKey(`request.query["nope"]`)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.AppendKey(nil, sample()); err == nil {
		t.Error("a missing query parameter made a key")
	}
}

func BenchmarkCondition(b *testing.B) {
	e, err := CompileCondition(`request.method != "GET" && "x-api-key" in request.headers`)
	if err != nil {
		b.Fatal(err)
	}
	in := sample()
	b.ReportAllocs()
	for b.Loop() {
		if ok, err := e.Condition(in); !ok || err != nil {
			b.Fatal(ok, err)
		}
	}
}

func BenchmarkKey(b *testing.B) {
	e, err := CompileKey(`request.headers["x-api-key"]`)
	if err != nil {
		b.Fatal(err)
	}
	in := sample()
	buf := make([]byte, 0, 64)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := e.AppendKey(buf[:0], in); err != nil {
			b.Fatal(err)
		}
	}
}

// FuzzCompile feeds the compiler what a config file may hold: it must return an expression or
// an error, never panic, and what compiled must evaluate (to a value or an error) within the
// cost limit.
func FuzzCompile(f *testing.F) {
	for _, s := range []string{`request.method == "GET"`, `"x" in request.headers`, `state["a"].matches("^b+$")`,
		`request.headers.exists(k, k.size() > 3)`, `[1,2].map(x, x * 2)[0] == 2`, `)(`, `request.path + 1`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, src string) {
		if k, err := CompileKey(src); err == nil {
			_, _ = k.AppendKey(nil, sample())
		} else if k != nil {
			t.Fatal("a key and an error")
		}
		e, err := CompileCondition(src)
		if err != nil {
			if e != nil {
				t.Fatal("a condition and an error")
			}
			return
		}
		_, _ = e.Condition(sample())
	})
}
