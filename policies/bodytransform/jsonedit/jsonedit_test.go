package jsonedit

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// keyVisitor applies one action to every member with a given key, at any depth.
type keyVisitor map[string]Action

func (v keyVisitor) Member(_ struct{}, key []byte) (Action, struct{}) {
	return v[string(key)], struct{}{}
}

func (v keyVisitor) Element(struct{}, int) struct{} { return struct{}{} }

// pathVisitor records the path of every member and element it is asked about, to show which
// values are visited.
type pathVisitor struct{ seen []string }

func (v *pathVisitor) Member(s string, key []byte) (Action, string) {
	p := s + "." + string(key)
	v.seen = append(v.seen, p)
	if string(key) == "drop" {
		return Action{Op: Remove}, p
	}
	if string(key) == "hide" {
		return Action{Op: Replace, Raw: []byte(`0`)}, p
	}
	return Action{}, p
}

func (v *pathVisitor) Element(s string, i int) string {
	p := s + "[" + string(rune('0'+i)) + "]"
	v.seen = append(v.seen, p)
	return p
}

func TestEdit(t *testing.T) {
	remove := keyVisitor{"x": {Op: Remove}}
	f := func(v keyVisitor, in, want string) {
		t.Helper()
		out, changed, err := Edit([]byte(in), 64, struct{}{}, v)
		if err != nil {
			t.Fatalf("Edit(%s): %v", in, err)
		}
		if string(out) != want {
			t.Fatalf("Edit(%s) = %s, want %s", in, out, want)
		}
		if changed != (in != want) {
			t.Fatalf("Edit(%s): changed = %v", in, changed)
		}
		if !json.Valid(out) {
			t.Fatalf("Edit(%s) = %s: not valid JSON", in, out)
		}
	}
	// Removal at every position, with the commas around it.
	f(remove, `{"x":1}`, `{}`)
	f(remove, `{"x":1,"a":2}`, `{"a":2}`)
	f(remove, `{"a":1,"x":2}`, `{"a":1}`)
	f(remove, `{"a":1,"x":2,"b":3}`, `{"a":1,"b":3}`)
	f(remove, `{"x":1,"x":2,"a":3,"x":4}`, `{"a":3}`)
	f(remove, `{"x":1,"x":2}`, `{}`)
	f(remove, ` { "a" : 1 , "x" : [1,{"x":2}] , "b" : 3 } `, ` { "a" : 1  , "b" : 3 } `)
	f(remove, `{ "x" : 1 , "a" : 2 }`, `{   "a" : 2 }`)
	// Nested objects and arrays are visited; a removed value is not.
	f(remove, `{"a":{"x":1,"b":{"x":{"x":2}}}}`, `{"a":{"b":{}}}`)
	f(remove, `[{"x":1},{"y":2,"x":3},[{"x":4}]]`, `[{},{"y":2},[{}]]`)
	// Untouched bytes stay exact: numbers, escapes, whitespace, order.
	f(remove, `{"n":12345678901234567890,"f":1.000000000000000000001e-400,"s":"\u00e9\n\"","x":0,"z":-0}`,
		`{"n":12345678901234567890,"f":1.000000000000000000001e-400,"s":"\u00e9\n\"","z":-0}`)
	// Keys are compared decoded.
	f(remove, `{"\u0078":1,"a":2}`, `{"a":2}`)
	f(keyVisitor{"a\"b": {Op: Remove}}, `{"a\"b":1,"c":2}`, `{"c":2}`)
	// Nothing to do.
	f(remove, `{"a":[1,2,{"b":null}],"c":true}`, `{"a":[1,2,{"b":null}],"c":true}`)
	f(remove, `"x"`, `"x"`)
	f(remove, `[]`, `[]`)
	f(remove, `{}`, `{}`)
	// Rename and replace.
	f(keyVisitor{"a": {Op: Rename, Raw: []byte(`"b"`)}}, `{"a":{"a":1}}`, `{"b":{"b":1}}`)
	f(keyVisitor{"x": {Op: Remove}, "a": {Op: Rename, Raw: []byte(`"b"`)}}, `{"x":0,"a":1}`, `{"b":1}`)
	f(keyVisitor{"s": {Op: Replace, Raw: []byte(`"***"`)}}, `{"s":{"s":[1,2]},"t":"s","u":{"s":"v"}}`,
		`{"s":"***","t":"s","u":{"s":"***"}}`)
	f(keyVisitor{"s": {Op: Replace, Raw: []byte(`"***"`)}, "x": {Op: Remove}}, `{"x":1,"s":2}`, `{"s":"***"}`)
}

func TestEditVisits(t *testing.T) {
	v := &pathVisitor{}
	out, _, err := Edit([]byte(`{"a":[{"b":1},2],"drop":{"c":1},"hide":{"d":1},"e":{}}`), 16, "$", v)
	if err != nil {
		t.Fatal(err)
	}
	if string(out) != `{"a":[{"b":1},2],"hide":0,"e":{}}` {
		t.Fatalf("out = %s", out)
	}
	want := []string{"$.a", "$.a[0]", "$.a[0].b", "$.a[1]", "$.drop", "$.hide", "$.e"}
	if !reflect.DeepEqual(v.seen, want) {
		t.Fatalf("visited %q, want %q", v.seen, want)
	}
}

func TestEditInvalid(t *testing.T) {
	cases := []string{
		``, ` `, `{`, `}`, `[`, `]`, `{"a"}`, `{"a":}`, `{"a":1,}`, `[1,]`, `[,1]`, `{,}`,
		`{1:2}`, `{"a" 1}`, `{"a":1 "b":2}`, `[1 2]`, `"abc`, `"a\`, `"\x"`, `"\u12"`, `"\u12G4"`,
		"\"a\x01\"", `tru`, `nul`, `fals`, `truex`, `-`, `01`, `1.`, `1e`, `1e+`, `.5`, `+1`,
		`1 2`, `{}{}`, `[1]]`, `{"a":1}}`, `NaN`, `{"a":[}`, `{"a":{]}`, `[{"a":1]`, `{"a":-}`,
		`{"a\x":1}`, `{"a":1,"b"`, `{"a":1,`, `[1,`, `"\`, `{"a":1,"x":[1,}`,
	}
	for _, in := range cases {
		if json.Valid([]byte(in)) {
			t.Fatalf("test case %q is valid JSON", in)
		}
		for _, v := range []keyVisitor{{}, {"a": {Op: Remove}}, {"a": {Op: Rename, Raw: []byte(`"z"`)}}} {
			if _, _, err := Edit([]byte(in), 64, struct{}{}, v); !errors.Is(err, ErrSyntax) {
				t.Fatalf("Edit(%q): err = %v, want ErrSyntax", in, err)
			}
		}
	}
}

func TestEditDepth(t *testing.T) {
	f := func(in string, maxDepth int, wantErr error) {
		t.Helper()
		_, _, err := Edit([]byte(in), maxDepth, struct{}{}, keyVisitor{})
		if !errors.Is(err, wantErr) && !(wantErr == nil && err == nil) {
			t.Fatalf("Edit(%.40q, %d): err = %v, want %v", in, maxDepth, err, wantErr)
		}
	}
	f(`[[[]]]`, 3, nil)
	f(`[[[]]]`, 2, ErrTooDeep)
	f(`{"a":{"b":[1]}}`, 3, nil)
	f(`{"a":{"b":[1]}}`, 2, ErrTooDeep)
	f(`1`, 0, nil)
	f(`[]`, 0, ErrTooDeep)
	// 100,000 levels fail fast, at the cap, without recursion.
	for _, open := range []string{"[", `{"a":`} {
		deep := strings.Repeat(open, 100000)
		start := time.Now()
		f(deep, 256, ErrTooDeep)
		if d := time.Since(start); d > 50*time.Millisecond {
			t.Fatalf("rejecting 100000 levels of %q took %v", open, d)
		}
	}
}

// TestEditAgreesWithValid checks that Edit accepts exactly the documents encoding/json accepts.
func TestEditAgreesWithValid(t *testing.T) {
	cases := []string{
		`0`, `-0`, `-0.0e-0`, `1E+2`, `123.456e78`, `"\/\b\f\n\r\t\u0000"`, "\"\xff\"", `null`,
		`{"a":[],"b":{},"c":[{}],"d":[[]]}`, "\t\n\r {\"a\" \n:\r 1 \t}\n", `[1,"2",true,false,null]`,
	}
	for _, in := range cases {
		_, _, err := Edit([]byte(in), 64, struct{}{}, keyVisitor{})
		if (err == nil) != json.Valid([]byte(in)) {
			t.Fatalf("Edit(%q): err = %v, json.Valid = %v", in, err, json.Valid([]byte(in)))
		}
	}
}

func TestEditUnchangedReturnsInput(t *testing.T) {
	in := []byte(`{"a":[1,2,3]}`)
	out, changed, err := Edit(in, 8, struct{}{}, keyVisitor{"b": {Op: Remove}})
	if err != nil || changed {
		t.Fatalf("changed = %v, err = %v", changed, err)
	}
	if &out[0] != &in[0] {
		t.Fatal("an unchanged document was copied")
	}
}

func TestEditUnknownOpPanics(t *testing.T) {
	defer func() {
		if v := recover(); v == nil || !strings.HasPrefix(v.(string), "BUG:") {
			t.Fatalf("recover() = %v, want a BUG panic", v)
		}
	}()
	_, _, _ = Edit([]byte(`{"a":1}`), 8, struct{}{}, keyVisitor{"a": {Op: 99}})
}

// removeKey is the reference: it deletes key from every object of a decoded document.
func removeKey(v any, key string) any {
	switch x := v.(type) {
	case map[string]any:
		delete(x, key)
		for k, e := range x {
			x[k] = removeKey(e, key)
		}
	case []any:
		for i, e := range x {
			x[i] = removeKey(e, key)
		}
	}
	return v
}

func decode(t *testing.T, b []byte) any {
	t.Helper()
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		t.Fatalf("decode %q: %v", b, err)
	}
	return v
}

// FuzzEdit checks, for any input, that Edit accepts exactly what encoding/json accepts (within
// the depth cap), never panics, and that removing a key gives what deleting it from the decoded
// document gives.
func FuzzEdit(f *testing.F) {
	for _, s := range []string{
		`{"x":1,"a":{"x":[{"x":2,"b":3}]}}`, `[{"x":1},{"y":2}]`, `{"a":1,"x":2}`, `{"\u0078":1}`,
		`{"x":12345678901234567890}`, `[[[[{"x":{}}]]]]`, `"x"`, `{"a":"x","x":"a"}`, `{ "x" : 1 , "a" : 2 }`,
	} {
		f.Add([]byte(s), "x")
	}
	f.Fuzz(func(t *testing.T, in []byte, key string) {
		if !utf8.Valid(in) || !utf8.ValidString(key) {
			// encoding/json turns invalid UTF-8 in keys into U+FFFD; Edit compares bytes.
			return
		}
		out, changed, err := Edit(in, 64, struct{}{}, keyVisitor{key: {Op: Remove}})
		if errors.Is(err, ErrTooDeep) {
			return
		}
		if (err == nil) != json.Valid(in) {
			t.Fatalf("Edit(%q): err = %v, json.Valid = %v", in, err, json.Valid(in))
		}
		if err != nil {
			return
		}
		if !json.Valid(out) {
			t.Fatalf("Edit(%q) = %q: not valid JSON", in, out)
		}
		if !changed && !bytes.Equal(in, out) {
			t.Fatalf("Edit(%q) = %q, unchanged but different", in, out)
		}
		want := removeKey(decode(t, in), key)
		if got := decode(t, out); !reflect.DeepEqual(got, want) {
			t.Fatalf("Edit(%q) removing %q = %q, want the document of %v", in, key, out, want)
		}
	})
}

func TestIsJSONContentType(t *testing.T) {
	for ct, want := range map[string]bool{
		"application/json":                          true,
		"application/json; charset=utf-8":           true,
		"Application/JSON;charset=UTF-8":            true,
		" application/json ":                        true,
		"application/problem+json":                  true,
		"application/vnd.api+json; ext=bulk":        true,
		"application/ld+json":                       true,
		"application/+json":                         false,
		"application/x/y+json":                      false,
		"application/jsonx":                         false,
		"application/json-patch":                    false,
		"text/json":                                 false,
		"text/plain":                                false,
		"application/x-www-form-urlencoded":         false,
		"":                                          false,
		"multipart/form-data; boundary=+json":       false,
		"application/vnd.example+json+xml":          false,
		"application/octet-stream; profile=x+json":  false,
		"application/geo+json-seq":                  false,
		"application/merge-patch+json;charset=utf8": true,
	} {
		if got := IsJSONContentType(ct); got != want {
			t.Errorf("IsJSONContentType(%q) = %v, want %v", ct, got, want)
		}
	}
}
