package yamlconf

import (
	"errors"
	"strings"
	"testing"
	"time"
)

type inner struct {
	Name    string   `yaml:"name" required:"true"`
	Count   int      `yaml:"count"`
	Ratio   float64  `yaml:"ratio"`
	On      bool     `yaml:"on"`
	Size    uint32   `yaml:"size"`
	Tags    []string `yaml:"tags"`
	Meta    Metadata `yaml:"meta"`
	Timeout time.Duration
}

type outer struct {
	Top   *inner           `yaml:"top" required:"true"`
	List  []inner          `yaml:"list"`
	Map   map[string]inner `yaml:"map"`
	Raw   map[string]Raw   `yaml:"raw"`
	Any   any              `yaml:"any"`
	Skip  string           `yaml:"-"`
	lower string
}

func TestDecodeValid(t *testing.T) {
	src := `
top:
  name: a
  count: 3
  ratio: 0.5
  on: true
  size: 7
  tags: [x, y]
  timeout: 250ms
  meta:
    header_name: X-API-Key
    required: true
    n: 5
    empty: null
    headers:
      X-Frame-Options: DENY
    list: [a, 1, true]
list:
  - name: b
map:
  k:
    name: c
raw:
  p:
    keys: [{key: k1, user_id: u1}]
any: {free: form}
`
	var o outer
	if err := Decode("f.yaml", []byte(src), &o); err != nil {
		t.Fatal(err)
	}
	if o.Top.Name != "a" || o.Top.Count != 3 || o.Top.Ratio != 0.5 || !o.Top.On || o.Top.Size != 7 || len(o.Top.Tags) != 2 || o.Top.Timeout != 250*time.Millisecond {
		t.Fatalf("top decoded wrong: %+v", o.Top)
	}
	want := map[string]string{
		"header_name": "X-API-Key",
		"required":    "true",
		"n":           "5",
		"empty":       "",
		"headers":     `{"X-Frame-Options":"DENY"}`,
		"list":        `["a",1,true]`,
	}
	for k, v := range want {
		if o.Top.Meta[k] != v {
			t.Errorf("meta[%q] = %q, want %q", k, o.Top.Meta[k], v)
		}
	}
	if o.List[0].Name != "b" || o.Map["k"].Name != "c" {
		t.Fatalf("list/map decoded wrong: %+v %+v", o.List, o.Map)
	}
	if got := string(o.Raw["p"]); got != `{"keys":[{"key":"k1","user_id":"u1"}]}` {
		t.Fatalf("raw = %s", got)
	}
}

func TestDecodeErrors(t *testing.T) {
	f := func(src string, want ...string) {
		t.Helper()
		var o outer
		err := Decode("cfg.yaml", []byte(src), &o)
		if err == nil {
			t.Fatalf("no error for:\n%s", src)
		}
		for _, w := range want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("error %q does not contain %q", err, w)
			}
		}
	}
	f("", "cfg.yaml: empty config")
	f("top: [", "cfg.yaml: yaml:")
	f("top:\n  name: a\n  bogus: 1\n", "cfg.yaml:3: top.bogus: unknown key (known keys: count, meta, name, on, ratio, size, tags, timeout)")
	f("top:\n  count: 1\n", "cfg.yaml:2: top.name: missing required key")
	f("list: []\n", "cfg.yaml:1: top: missing required key")
	f("top:\n  name: a\n  count: many\n", `cfg.yaml:3: top.count: want an integer, got "many"`)
	f("top:\n  name: a\n  ratio: x\n", `top.ratio: want a number, got "x"`)
	f("top:\n  name: a\n  on: maybe\n", `top.on: want true or false, got "maybe"`)
	f("top:\n  name: a\n  size: -1\n", `top.size: want a non-negative integer, got "-1"`)
	f("top:\n  name: a\n  timeout: soon\n", `top.timeout: want a duration such as "250ms", got "soon"`)
	f("top:\n  name: a\n  tags: x\n", `top.tags: want a list, got "x"`)
	f("top:\n  name: a\n  name: b\n", "top.name: duplicate key")
	f("top: 3\n", `top: want a map, got "3"`)
	f("top:\n  name: [a]\n", `top.name: want a string, got a list`)
	f("top:\n  name: a\nmap: [1]\n", `map: want a map, got a list`)
	f("top:\n  name: a\n  meta: [1]\n", `cfg.yaml:3: top.meta: want a map, got a list`)
	// Every problem at once.
	var o outer
	err := Decode("cfg.yaml", []byte("top:\n  count: x\n  zzz: 1\nlist:\n  - count: 2\n"), &o)
	var n int
	for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
		var ye *Error
		if errors.As(e, &ye) {
			n++
		}
	}
	if n != 4 {
		t.Fatalf("want 4 problems (count, zzz, top.name, list[0].name), got %d: %v", n, err)
	}
}

func TestNullLeavesZero(t *testing.T) {
	var o outer
	if err := Decode("f", []byte("top:\n  name: a\n  count: null\n"), &o); err != nil {
		t.Fatal(err)
	}
	if o.Top.Count != 0 {
		t.Fatal("null must leave the zero value")
	}
}

func TestAnchors(t *testing.T) {
	var o outer
	src := "base: &b\n  name: shared\ntop: *b\n"
	// base is unknown; the alias itself resolves.
	err := Decode("f", []byte(src), &o)
	if err == nil || !strings.Contains(err.Error(), "base: unknown key") {
		t.Fatalf("got %v", err)
	}
	if err := Decode("f", []byte("top: &b\n  name: x\nlist:\n  - *b\n"), &o); err != nil {
		t.Fatal(err)
	}
	if o.List[0].Name != "x" {
		t.Fatal("alias not resolved")
	}
}

func TestNodeJSONNonStringKey(t *testing.T) {
	var o outer
	err := Decode("f", []byte("top:\n  name: a\n  meta:\n    m: {1: a, true: b}\n"), &o)
	if err != nil {
		t.Fatalf("scalar keys become JSON strings: %v", err)
	}
	if got := o.Top.Meta["m"]; got != `{"1":"a","true":"b"}` {
		t.Fatalf("m = %s", got)
	}
	err = Decode("f", []byte("top:\n  name: a\n  meta:\n    m: {[1]: a}\n"), &o)
	if err == nil || !strings.Contains(err.Error(), `f:4: top.meta: key "m"`) {
		t.Fatalf("a list as a key must fail clearly, got %v", err)
	}
}

func FuzzDecode(f *testing.F) {
	f.Add("top:\n  name: a\n  meta:\n    x: [1, 2]\n")
	f.Add("top: {name: a, count: 1}\nlist: [{name: b}]\n")
	f.Add("top:\n  name: &a x\n  tags: [*a]\n")
	f.Fuzz(func(t *testing.T, src string) {
		var o outer
		_ = Decode("fuzz.yaml", []byte(src), &o)
	})
}
