package yamlconf

import (
	"errors"
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/config"
)

const docYAML = `root:
  name: x
  list:
    - a: 1
    - a: 2
      b: &anchor
        deep: true
  alias: *anchor
`

func TestDocLines(t *testing.T) {
	d, err := ParseDoc("f.yaml", []byte(docYAML))
	if err != nil {
		t.Fatal(err)
	}
	f := func(path string, want int) {
		t.Helper()
		if got := d.Line(path); got != want {
			t.Errorf("Line(%q) = %d, want %d", path, got, want)
		}
	}
	f("root", 1)
	f("root.name", 2)
	f("root.list", 3)
	f("root.list[0]", 4)
	f("root.list[1].b", 6)
	f("root.list[1].b.deep", 7)
	f("root.alias.deep", 7)  // through the alias, to where the anchor's value is
	f("root.missing", 1)     // absent: the nearest parent
	f("root.list[9].a", 3)   // an index past the end
	f("root.list[x]", 3)     // not an index
	f("root.name.sub", 2)    // below a scalar
	f("root.list[1]b[0]", 6) // odd syntax is still split
	f("root.list[1", 3)      // an unclosed bracket
	if e := d.Errorf("root.list[1].a", "bad %d", 7); e.Error() != "f.yaml:5: root.list[1].a: bad 7" {
		t.Fatalf("Errorf: %v", e)
	}
	for _, bad := range []string{"", "# only a comment\n", "a: [\n"} {
		if _, err := ParseDoc("f.yaml", []byte(bad)); err == nil || !strings.HasPrefix(err.Error(), "f.yaml: ") {
			t.Errorf("ParseDoc(%q) = %v", bad, err)
		}
	}
}

func TestSplitPath(t *testing.T) {
	f := func(in, want string) {
		t.Helper()
		if got := strings.Join(splitPath(in), "|"); got != want {
			t.Errorf("splitPath(%q) = %q, want %q", in, got, want)
		}
	}
	f("a.b[2].c", "a|b|2|c")
	f("a[0][1]", "a|0|1")
	f("[3]", "3")
	f("a[", "a|[")
	f("", "")
}

const testSchema = `{"type":"object","additionalProperties":false,"required":["root"],"properties":{"root":{
  "type":"object","additionalProperties":false,"required":["name","must"],"properties":{
    "name":{"type":"string","minLength":2},
    "n":{"type":"integer","minimum":1,"maximum":10},
    "mode":{"enum":["a","b"]},
    "list":{"type":"array","items":{"type":"object","properties":{"a":{"type":"integer"}}}},
    "must":{"type":"boolean"}}}}}`

func TestValidate(t *testing.T) {
	s := MustCompileSchema("test.json", []byte(testSchema))
	f := func(doc string, want ...string) {
		t.Helper()
		d, err := ParseDoc("f.yaml", []byte(doc))
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, e := range d.Validate(s) {
			got = append(got, e.Error())
		}
		if strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Errorf("Validate(%q):\n%s\nwant:\n%s", doc, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	}
	f("root: {name: ok, must: true, n: 3, mode: a, list: [{a: 1}]}\n")
	f("root:\n  name: x\n  n: 11\n  mode: c\n  bogus: 1\n  list:\n    - a: no\n",
		"f.yaml:1: root.must: missing required key",
		"f.yaml:2: root.name: minLength: got 1, want 2",
		"f.yaml:3: root.n: must be at most 10, got 11",
		"f.yaml:4: root.mode: value must be one of 'a', 'b'",
		"f.yaml:5: root.bogus: unknown key",
		"f.yaml:7: root.list[0].a: got string, want integer")
	f("root: {name: ok, must: true, n: 0}\nother: 1\n",
		"f.yaml:1: root.n: must be at least 1, got 0",
		"f.yaml:2: other: unknown key")
	f("[1, 2]\n", "f.yaml:1: got array, want object")
	f("root: {name: ok, must: true, list: {[1]: x}}\n", "f.yaml:1: yaml: invalid map key: []interface {}{1}")
}

func TestCompileSchemaErrors(t *testing.T) {
	for in, want := range map[string]string{
		`{"type":`:              `parse JSON schema "x.json"`,
		`{"type":"nonsense"}`:   `compile JSON schema "x.json"`,
		`{"$ref":"#/nowhere"}`:  `compile JSON schema "x.json"`,
		`{"$id":"http://[::1"}`: `JSON schema "x.json"`,
	} {
		if _, err := CompileSchema("x.json", []byte(in)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("CompileSchema(%s) = %v, want %q", in, err, want)
		}
	}
	defer func() {
		if r := recover(); r == nil || !strings.HasPrefix(r.(string), "BUG: ") {
			t.Fatalf("MustCompileSchema did not panic with a BUG: %v", r)
		}
	}()
	MustCompileSchema("x.json", []byte(`{`))
}

// TestShippedSchemasCompile compiles the schemas of both config files.
func TestShippedSchemasCompile(t *testing.T) {
	for name, s := range map[string][]byte{"kernel": config.KernelSchema, "agent": config.AgentSchema} {
		if _, err := CompileSchema(name, s); err != nil {
			t.Errorf("%s schema: %v", name, err)
		}
	}
}

func TestProblems(t *testing.T) {
	d, err := ParseDoc("f.yaml", []byte("a: 1\nb: 2\n"))
	if err != nil {
		t.Fatal(err)
	}
	p := NewProblems(d)
	if p.Err() != nil {
		t.Fatal("no problems yet")
	}
	p.Addf("b", "first on b")
	p.Add(nil, errors.New("no key"), errors.Join(d.Errorf("a", "on a"), d.Errorf("b", "second on b")))
	p.Add(&Error{File: "f.yaml", Line: 1, Msg: "whole file"})
	want := "f.yaml:1: whole file\nf.yaml:1: a: on a\nf.yaml:2: b: first on b\nno key"
	if err := p.Err(); err == nil || err.Error() != want {
		t.Fatalf("Err:\n%v\nwant:\n%s", err, want)
	}
}

// FuzzDocValidate parses any document, validates it against the kernel's schema and looks up
// keys in it: none of it may panic, and every problem names its file and a line in the
// document.
func FuzzDocValidate(f *testing.F) {
	f.Add([]byte("policy_kernel:\n  agents: [{name: a, socket_path: /s}]\n"), "policy_kernel.agents[0].name")
	f.Add([]byte("policy_kernel:\n  server: {port: 70000, bogus: 1}\n"), "policy_kernel.server.port")
	f.Add([]byte("a: &x {b: *x}\n"), "a.b.b")
	f.Add([]byte("- 1\n- [2, {3: 4}]\n"), "[1][1]")
	s := MustCompileSchema("kernel.json", config.KernelSchema)
	f.Fuzz(func(t *testing.T, data []byte, path string) {
		d, err := ParseDoc("f.yaml", data)
		if err != nil {
			return
		}
		// YAML breaks lines at \n, \r\n and \r, and libyaml also at NEL, LS and PS.
		text := strings.ReplaceAll(string(data), "\r\n", "\n")
		lines := 1
		for _, r := range text {
			switch r {
			case '\n', '\r', '\u0085', '\u2028', '\u2029':
				lines++
			}
		}
		if l := d.Line(path); l < 0 || l > lines {
			t.Fatalf("Line(%q) = %d in a document of %d lines", path, l, lines)
		}
		for _, e := range d.Validate(s) {
			ye, ok := e.(*Error)
			if !ok || ye.File != "f.yaml" || ye.Line < 0 || ye.Line > lines {
				t.Fatalf("problem %v (%T) outside the document", e, e)
			}
		}
	})
}

// TestNulls shows that a null where a value is required is an error, not a nil that a caller
// would dereference, and that a document of nothing but null is empty.
func TestNulls(t *testing.T) {
	type inner struct {
		Name string `yaml:"name" required:"true"`
	}
	type top struct {
		Inner *inner `yaml:"inner" required:"true"`
		Opt   *inner `yaml:"opt"`
	}
	f := func(doc, want string) {
		t.Helper()
		var v top
		err := Decode("f.yaml", []byte(doc), &v)
		if want == "" {
			if err != nil {
				t.Fatalf("Decode(%q) = %v", doc, err)
			}
			return
		}
		if err == nil || err.Error() != want {
			t.Fatalf("Decode(%q) = %v, want %q", doc, err, want)
		}
	}
	f("---\n", "f.yaml: empty config")
	f("~\n", "f.yaml: empty config")
	f("inner: ~\n", "f.yaml:1: inner: must not be null")
	f("inner: &n ~\nopt: *n\n", "f.yaml:1: inner: must not be null")
	f("inner: {name: null}\n", "f.yaml:1: inner.name: must not be null")
	f("inner: {name: x}\nopt: ~\n", "")
	if _, err := ParseDoc("f.yaml", []byte("---\n")); err == nil || err.Error() != "f.yaml: empty config" {
		t.Fatalf("ParseDoc: %v", err)
	}
}

// TestDecodeWithSchema decodes files into a struct that matches testSchema: parse and decode
// failures come back as one error with the schema's problems, and a check's own problem for a
// key wins over the schema's.
func TestDecodeWithSchema(t *testing.T) {
	type root struct {
		Root struct {
			Name string `yaml:"name"`
			N    int    `yaml:"n"`
			Must bool   `yaml:"must"`
		} `yaml:"root" required:"true"`
	}
	s := MustCompileSchema("test.json", []byte(testSchema))
	type result struct {
		probs *Problems
		cfg   root
	}
	decode := func(doc string) (result, error) {
		t.Helper()
		var r result
		p, err := DecodeWithSchema("f.yaml", []byte(doc), &r.cfg, s)
		r.probs = p
		return r, err
	}
	fail := func(doc, want string) {
		t.Helper()
		r, err := decode(doc)
		if err == nil || err.Error() != want || r.probs != nil {
			t.Errorf("DecodeWithSchema(%q) = %v, %v; want the error:\n%s", doc, r.probs, err, want)
		}
	}
	fail("", "f.yaml: empty config")
	fail("root: [\n", "f.yaml: yaml: line 1: did not find expected node content")
	// A decode failure comes with every schema problem, at most one per key.
	fail("root:\n  name: x\n  n: many\n  must: true\n",
		"f.yaml:2: root.name: minLength: got 1, want 2\nf.yaml:3: root.n: want an integer, got \"many\"")

	r, err := decode("root: {name: ok, n: 3, must: true}\n")
	if err != nil || r.probs.Err() != nil || r.cfg.Root.Name != "ok" || r.cfg.Root.N != 3 || !r.cfg.Root.Must {
		t.Fatalf("a valid file: %+v, %v", r.cfg, err)
	}

	// Decoded, with schema problems: a check's own message for root.n replaces the schema's,
	// the schema's stay for the other keys, and Err says the same when called again.
	r, err = decode("root:\n  name: x\n  n: 11\n  must: true\n")
	if err != nil || r.cfg.Root.N != 11 {
		t.Fatalf("decode: %+v, %v", r.cfg, err)
	}
	r.probs.Addf("root.n", "too many: %d", r.cfg.Root.N)
	want := "f.yaml:2: root.name: minLength: got 1, want 2\nf.yaml:3: root.n: too many: 11"
	for range 2 {
		if err := r.probs.Err(); err == nil || err.Error() != want {
			t.Fatalf("Err:\n%v\nwant:\n%s", err, want)
		}
	}
}
