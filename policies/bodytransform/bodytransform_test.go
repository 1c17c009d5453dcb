package bodytransform

import (
	"bytes"
	"compress/flate"
	"compress/gzip"
	"compress/zlib"
	"context"
	"encoding/json"
	"errors"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/VictoriaMetrics/metrics"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/policies/bodytransform/jsonedit"
)

func mustBuild(t testing.TB, md map[string]string) *Transform {
	t.Helper()
	p, err := Build(md)
	if err != nil {
		t.Fatalf("Build(%v): %v", md, err)
	}
	return p.(*Transform)
}

func TestApply(t *testing.T) {
	f := func(md map[string]string, in, want string) {
		t.Helper()
		out, changed, err := mustBuild(t, md).Apply([]byte(in))
		if err != nil {
			t.Fatalf("Apply(%s): %v", in, err)
		}
		if string(out) != want {
			t.Fatalf("Apply(%s) with %v\n got %s\nwant %s", in, md, out, want)
		}
		if changed != (in != want) {
			t.Fatalf("Apply(%s): changed = %v", in, changed)
		}
	}
	rm := func(paths ...string) map[string]string {
		b, _ := json.Marshal(paths)
		return map[string]string{"remove_fields": string(b)}
	}
	// Top level, nested, several at once, absent.
	f(rm("internal_id"), `{"id":1,"internal_id":2,"name":"a"}`, `{"id":1,"name":"a"}`)
	f(rm("user.internal_id"), `{"internal_id":0,"user":{"internal_id":1,"name":"a"}}`, `{"internal_id":0,"user":{"name":"a"}}`)
	f(rm("a.b.c", "a.d"), `{"a":{"b":{"c":1,"e":2},"d":3,"f":4}}`, `{"a":{"b":{"e":2},"f":4}}`)
	f(rm("missing", "a.missing"), `{"a":{"b":1}}`, `{"a":{"b":1}}`)
	f(rm("a.b"), `{"a":"not an object"}`, `{"a":"not an object"}`)
	// Arrays are transparent, at any level, including the top.
	f(rm("items.internal_id"), `{"items":[{"id":1,"internal_id":9},{"id":2,"internal_id":8},3,null,[{"internal_id":7}]]}`,
		`{"items":[{"id":1},{"id":2},3,null,[{}]]}`)
	f(rm("internal_id"), `[{"internal_id":1,"a":1},{"a":2,"internal_id":2}]`, `[{"a":1},{"a":2}]`)
	f(rm("a.b.c"), `{"a":[{"b":[{"c":1,"d":1},{"c":2}]},{"b":{"c":3}}]}`, `{"a":[{"b":[{"d":1},{}]},{"b":{}}]}`)
	// A segment of digits selects one element, and still names an object key "0".
	f(rm("items.1.secret"), `{"items":[{"secret":0},{"secret":1},{"secret":2}]}`, `{"items":[{"secret":0},{},{"secret":2}]}`)
	f(rm("items.0"), `{"items":{"0":"zero","1":"one"}}`, `{"items":{"1":"one"}}`)
	f(rm("m.10.x"), `{"m":[0,1,2,3,4,5,6,7,8,9,{"x":1,"y":2}]}`, `{"m":[0,1,2,3,4,5,6,7,8,9,{"y":2}]}`)
	// Both forms at once: the transparent path and the indexed one.
	f(rm("items.a", "items.0.b"), `{"items":[{"a":1,"b":1,"c":1},{"a":2,"b":2}]}`, `{"items":[{"c":1},{"b":2}]}`)
	// Removing a whole subtree.
	f(rm("items"), `{"items":[{"a":[1,2,{"b":3}]}],"n":1}`, `{"n":1}`)
	// Renames: in place, nested, in arrays, with a removal inside the renamed value.
	f(map[string]string{"rename_fields": `{"userName":"user_name"}`}, `{"id":1,"userName":"a","z":2}`, `{"id":1,"user_name":"a","z":2}`)
	f(map[string]string{"rename_fields": `{"data.items.n":"name"}`}, `{"data":{"items":[{"n":"a"},{"n":"b"}]}}`, `{"data":{"items":[{"name":"a"},{"name":"b"}]}}`)
	f(map[string]string{"rename_fields": `{"u":"user"}`, "remove_fields": `["u.pw"]`}, `{"u":{"pw":"x","id":1}}`, `{"user":{"id":1}}`)
	f(map[string]string{"rename_fields": `{"a":"quote\"d <tag>"}`}, `{"a":1}`, `{"quote\"d \u003ctag\u003e":1}`)
	// Numbers keep their exact text, and everything else its bytes and order.
	f(rm("x"), `{"big":12345678901234567890,"x":1,"small":-0.000000000000000000000000000001,"exp":1E400,"s":"\u00e9\ud83d\ude00","z":[true,false,null]}`,
		`{"big":12345678901234567890,"small":-0.000000000000000000000000000001,"exp":1E400,"s":"\u00e9\ud83d\ude00","z":[true,false,null]}`)
	f(rm("x"), "{\n  \"b\": 1,\n  \"x\": 2,\n  \"a\": 3\n}", "{\n  \"b\": 1,\n  \"a\": 3\n}")
	// A key with escapes is matched by its decoded text.
	f(rm("internal_id"), `{"internal\u005fid":1,"a":2}`, `{"a":2}`)
}

func TestBuildErrors(t *testing.T) {
	f := func(md map[string]string, want string) {
		t.Helper()
		_, err := Build(md)
		if err == nil || err.Error() != want {
			t.Fatalf("Build(%v): err = %v, want %q", md, err, want)
		}
	}
	f(map[string]string{}, "remove_fields or rename_fields must name at least one field")
	f(map[string]string{"remove_fields": `[]`}, "remove_fields or rename_fields must name at least one field")
	f(map[string]string{"remove_fields": `["a..b"]`}, `remove_fields[0]: path "a..b": empty segment`)
	f(map[string]string{"remove_fields": `["a",""]`}, `remove_fields[1]: path "": empty segment`)
	f(map[string]string{"remove_fields": `[".a"]`}, `remove_fields[0]: path ".a": empty segment`)
	f(map[string]string{"rename_fields": `{"a.":"b"}`}, `rename_fields["a."]: path "a.": empty segment`)
	f(map[string]string{"rename_fields": `{"a":""}`}, `rename_fields["a"]: the new name is empty`)
	f(map[string]string{"remove_fields": `["a.b"]`, "rename_fields": `{"a.b":"c"}`}, `rename_fields["a.b"]: the field is also in remove_fields`)
	f(map[string]string{"remove_fields": `["a"]`, "max_body_bytes": "0"}, "max_body_bytes: must be positive, got 0")
	f(map[string]string{"remove_fields": `["a"]`, "max_depth": "0"}, "max_depth: must be between 1 and 10000, got 0")
	f(map[string]string{"remove_fields": `["a"]`, "max_depth": "10001"}, "max_depth: must be between 1 and 10000, got 10001")
	f(map[string]string{"remove_fields": `"a"`}, `metadata key "remove_fields": invalid JSON: json: cannot unmarshal string into Go value of type []string`)
	f(map[string]string{"remove_fields": `["a"]`, "fields": `x`}, `metadata key "fields": unknown key`)
	f(map[string]string{"remove_fields": `["` + strings.Repeat("a.", MaxDepthLimit) + `a"]`},
		`remove_fields[0]: path "a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a."...: more than 10000 segments`)
	// Every problem at once.
	_, err := Build(map[string]string{"remove_fields": `["a..b","c"]`, "rename_fields": `{"c":"d","e":""}`, "max_depth": "0"})
	if err == nil || strings.Count(err.Error(), "\n") != 3 {
		t.Fatalf("Build: err = %v, want four problems", err)
	}
}

func responseContext(contentType string, body []byte) *policy.Context {
	h := map[string]string{}
	if contentType != "" {
		h["content-type"] = contentType
	}
	return &policy.Context{Phase: agentv1.PolicyPhase_RESPONSE, Response: &policy.ResponseContext{Status: 200, Headers: h, Body: body}}
}

// encodedContext is a response with a content-encoding.
func encodedContext(contentType, encoding string, body []byte) *policy.Context {
	c := responseContext(contentType, body)
	c.Response.Headers["content-encoding"] = encoding
	return c
}

func gzipBytes(t testing.TB, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	w.Write(b)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func zlibBytes(t testing.TB, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := zlib.NewWriter(&buf)
	w.Write(b)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func flateBytes(t testing.TB, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w, _ := flate.NewWriter(&buf, flate.BestSpeed)
	w.Write(b)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// counted reports by how much a counter grew while run ran.
func counted(c *metrics.Counter, run func()) uint64 {
	before := c.Get()
	run()
	return c.Get() - before
}

func TestExecute(t *testing.T) {
	p := mustBuild(t, map[string]string{"remove_fields": `["internal_id"]`, "max_body_bytes": "128", "max_depth": "4"})
	// wantBody "" means no instruction; refusal names the reason of a refusal.
	f := func(c *policy.Context, wantBody, refusal string) {
		t.Helper()
		var (
			r   policy.Result
			err error
		)
		counter := notJSON
		if refusal != "" {
			counter = refused[refusal]
		}
		grew := counted(counter, func() { r, err = p.Execute(context.Background(), c) })
		if refusal != "" {
			var re *RefusedError
			if !errors.As(err, &re) || re.Reason != refusal || len(r.Instructions) != 0 {
				t.Fatalf("Execute = %v, %v; want a refusal for %s", r, err, refusal)
			}
			if grew != 1 {
				t.Fatalf("refused{reason=%q} grew by %d, want 1", refusal, grew)
			}
			return
		}
		if err != nil {
			t.Fatalf("Execute: %v", err)
		}
		if r.Status != agentv1.StatusCode_OK {
			t.Fatalf("status = %v", r.Status)
		}
		if wantBody == "" {
			if len(r.Instructions) != 0 {
				t.Fatalf("instructions = %v, want none", r.Instructions)
			}
			return
		}
		if grew != 0 {
			t.Fatalf("an edited body counted as not_json")
		}
		if len(r.Instructions) == 0 || r.Instructions[0].GetType() != agentv1.InstructionType_SET_BODY {
			t.Fatalf("instructions = %v, want SET_BODY first", r.Instructions)
		}
		if got := string(r.Instructions[0].GetBody().GetBody()); got != wantBody {
			t.Fatalf("body = %q, want %q", got, wantBody)
		}
		// A decoded body goes out as identity, without its coding and length.
		var removed []string
		for _, in := range r.Instructions[1:] {
			if in.GetType() != agentv1.InstructionType_REMOVE_HEADER {
				t.Fatalf("instruction %v after SET_BODY", in)
			}
			removed = append(removed, in.GetHeader().GetKey())
		}
		var wantRemoved []string
		for _, coding := range strings.Split(c.Response.Headers["content-encoding"], ",") {
			if coding = strings.TrimSpace(coding); coding != "" && coding != "identity" {
				wantRemoved = []string{"content-encoding", "content-length"}
			}
		}
		if !reflect.DeepEqual(removed, wantRemoved) {
			t.Fatalf("removed headers %q, want %q", removed, wantRemoved)
		}
	}
	body := []byte(`{"id":1,"internal_id":2}`)
	const edited = `{"id":1}`
	f(responseContext("application/json", body), edited, "")
	f(responseContext("application/json; charset=utf-8", body), edited, "")
	f(responseContext("application/problem+json", body), edited, "")
	f(responseContext("Application/JSON", body), edited, "")
	f(responseContext("text/json", body), edited, "")
	f(responseContext("TEXT/JSON;charset=utf-8", body), edited, "")
	f(responseContext("application/vnd.api+json; ext=x", body), edited, "")
	f(responseContext("application/x-ndjson", body), edited, "")
	f(responseContext("text/plain, application/json", body), edited, "")
	// Nothing to remove: no instruction at all.
	f(responseContext("application/json", []byte(`{"id":1}`)), "", "")
	f(responseContext("application/json", []byte(`"internal_id"`)), "", "")
	// No body, no response.
	f(responseContext("application/json", nil), "", "")
	f(&policy.Context{Phase: agentv1.PolicyPhase_RESPONSE}, "", "")
	// Another content type passes unchanged, and is counted.
	notJSONPasses := func(c *policy.Context) {
		t.Helper()
		if n := counted(notJSON, func() { f(c, "", "") }); n != 1 {
			t.Fatalf("not_json grew by %d, want 1", n)
		}
	}
	notJSONPasses(responseContext("text/plain", body))
	notJSONPasses(responseContext("text/html; charset=utf-8", []byte(`<p>{"internal_id":1}</p>`)))
	notJSONPasses(encodedContext("image/png", "br", body))
	notJSONPasses(responseContext("", []byte("plain text")))
	// Without a content type, what looks like JSON is edited.
	f(responseContext("", body), edited, "")
	f(responseContext("", []byte(" \n[{\"internal_id\":1}]")), " \n[{}]", "")
	f(responseContext("", []byte("42")), "", "")
	f(responseContext(" ", body), edited, "")
	// Prefixes are kept.
	f(responseContext("application/json", []byte("\xef\xbb\xbf"+string(body))), "\xef\xbb\xbf"+edited, "")
	f(responseContext("application/json", []byte(")]}'\n"+string(body))), ")]}'\n"+edited, "")
	f(responseContext("application/json", []byte(")]}',\n"+string(body))), ")]}',\n"+edited, "")
	f(responseContext("application/json", []byte("while(1);"+string(body))), "while(1);"+edited, "")
	f(responseContext("", []byte("\xef\xbb\xbf)]}'"+string(body))), "\xef\xbb\xbf)]}'"+edited, "")
	f(responseContext("", []byte(")]}'\n{\"id\":1}")), "", "")
	// Encodings the standard library decodes.
	f(encodedContext("application/json", "gzip", gzipBytes(t, body)), edited, "")
	f(encodedContext("application/json", "x-gzip", gzipBytes(t, body)), edited, "")
	f(encodedContext("application/json", "GZIP", append(gzipBytes(t, body[:10]), gzipBytes(t, body[10:])...)), edited, "")
	f(encodedContext("application/json", "deflate", zlibBytes(t, body)), edited, "")
	f(encodedContext("application/json", "deflate", flateBytes(t, body)), edited, "")
	f(encodedContext("application/json", "deflate, gzip", gzipBytes(t, zlibBytes(t, body))), edited, "")
	f(encodedContext("application/json", "identity,gzip", gzipBytes(t, body)), edited, "")
	f(encodedContext("", "gzip", gzipBytes(t, body)), edited, "")
	f(encodedContext("", "gzip", gzipBytes(t, []byte(")]}'"+string(body)))), ")]}'"+edited, "")
	f(encodedContext("application/json", "identity", body), edited, "")
	// Decoded with nothing to edit: the encoded body passes as it is.
	f(encodedContext("application/json", "gzip", gzipBytes(t, []byte(`{"id":1}`))), "", "")
	f(encodedContext("", "gzip", gzipBytes(t, []byte("plain text"))), "", "")
	// Refused: codings it cannot decode, corrupt data, or a body that could hold the field
	// and cannot be edited.
	f(encodedContext("application/json", "br", body), "", ReasonUnsupportedEncoding)
	f(encodedContext("application/json", "zstd", body), "", ReasonUnsupportedEncoding)
	f(encodedContext("application/json", "compress", body), "", ReasonUnsupportedEncoding)
	f(encodedContext("application/json", "gzip, br", gzipBytes(t, body)), "", ReasonUnsupportedEncoding)
	f(encodedContext("application/json", "gzip,gzip,gzip,gzip,gzip", body), "", ReasonUnsupportedEncoding)
	f(encodedContext("", "br", body), "", ReasonUnsupportedEncoding)
	f(encodedContext("application/json", "gzip", body), "", ReasonBadEncoding)
	f(encodedContext("application/json", "gzip", gzipBytes(t, body)[:20]), "", ReasonBadEncoding)
	f(encodedContext("application/json", "gzip", append(gzipBytes(t, body), 0)), "", ReasonBadEncoding)
	f(encodedContext("application/json", "deflate", append(zlibBytes(t, body), 'x')), "", ReasonBadEncoding)
	f(encodedContext("application/json", "deflate", append(flateBytes(t, body), 'x')), "", ReasonBadEncoding)
	zb := zlibBytes(t, body)
	zb[len(zb)-1] ^= 1
	f(encodedContext("application/json", "deflate", zb), "", ReasonBadEncoding)
	f(encodedContext("", "gzip", []byte("not gzip")), "", ReasonBadEncoding)
	f(responseContext("application/json", []byte(`{"internal_id":1,`)), "", ReasonInvalidJSON)
	f(responseContext("application/json", []byte(`<html>internal_id</html>`)), "", ReasonInvalidJSON)
	// No document at all: nothing to remove.
	f(responseContext("application/json", []byte(" \r\n")), "", "")
	f(responseContext("application/json", []byte("\xef\xbb\xbf")), "", "")
	f(encodedContext("application/json", "gzip", gzipBytes(t, nil)), "", "")
	f(responseContext("application/json", []byte("\xfe\xff\x00{")), "", ReasonInvalidJSON)
	f(responseContext("", []byte(`{"internal_id":1,`)), "", ReasonInvalidJSON)
	f(responseContext("", []byte(")]}' internal_id")), "", ReasonInvalidJSON)
	f(responseContext("", []byte("\xff\xfe{\x00")), "", ReasonInvalidJSON)
	f(responseContext("application/json", []byte(`{"a":[[[[{"internal_id":1}]]]]}`)), "", ReasonTooDeep)
	f(responseContext("", []byte(`{"a":[[[[{"internal_id":1}]]]]}`)), "", ReasonTooDeep)
	large := []byte(`{"pad":"` + strings.Repeat("x", 130) + `","internal_id":1}`)
	f(responseContext("application/json", large), "", ReasonTooLarge)
	f(responseContext("", large), "", ReasonTooLarge)
	f(encodedContext("application/json", "gzip", gzipBytes(t, large)), "", ReasonTooLarge)
	f(encodedContext("", "gzip", gzipBytes(t, large)), "", ReasonTooLarge)
	f(encodedContext("application/json", "gzip, gzip", gzipBytes(t, gzipBytes(t, large))), "", ReasonTooLarge)
	f(encodedContext("", "gzip, gzip", gzipBytes(t, gzipBytes(t, large))), "", ReasonTooLarge)
	// Over the limit but not JSON: it passes.
	f(responseContext("", []byte(strings.Repeat("x", 200))), "", "")
	f(encodedContext("", "gzip", gzipBytes(t, []byte(strings.Repeat("x", 200)))), "", "")
}

// TestDecompressionBomb sends 10 KB of gzip that expands to 10 MB: it is refused after
// max_body_bytes of output, without expanding the rest.
func TestDecompressionBomb(t *testing.T) {
	p := mustBuild(t, map[string]string{"remove_fields": `["a"]`, "max_body_bytes": "1048576"})
	bomb := gzipBytes(t, []byte(`{"a":"`+strings.Repeat("0", 10<<20)+`"}`))
	var allocs uint64
	for range 3 {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		_, err := p.Execute(context.Background(), encodedContext("application/json", "gzip", bomb))
		runtime.ReadMemStats(&after)
		var re *RefusedError
		if !errors.As(err, &re) || re.Reason != ReasonTooLarge {
			t.Fatalf("Execute: %v, want too_large", err)
		}
		allocs = after.TotalAlloc - before.TotalAlloc
	}
	if allocs > 3<<20 {
		t.Fatalf("a refused bomb allocated %d bytes, more than three times max_body_bytes", allocs)
	}
}

// TestDeepNestingIsCheap sends 100,000 levels of nesting: the body is refused, quickly,
// without recursion.
func TestDeepNestingIsCheap(t *testing.T) {
	p := mustBuild(t, map[string]string{"remove_fields": `["a"]`, "max_body_bytes": "10000000"})
	for _, open := range []string{"[", `{"a":`, `{"b":`} {
		body := []byte(strings.Repeat(open, 100000) + "1" + strings.Repeat(string(closer(open)), 100000))
		before := refused[ReasonTooDeep].Get()
		start := time.Now()
		r, err := p.Execute(context.Background(), responseContext("application/json", body))
		if !errors.Is(err, jsonedit.ErrTooDeep) || len(r.Instructions) != 0 {
			t.Fatalf("Execute: %v, %v", r, err)
		}
		if d := time.Since(start); d > 100*time.Millisecond {
			t.Fatalf("100000 levels of %q took %v", open, d)
		}
		if refused[ReasonTooDeep].Get() != before+1 {
			t.Fatalf("too_deep not counted for %q", open)
		}
	}
	// At the cap exactly, the body is transformed.
	deep := mustBuild(t, map[string]string{"remove_fields": mustJSON(t, []string{strings.Repeat("b.", 255) + "a"})})
	body := strings.Repeat(`{"b":`, 255) + `{"a":1}` + strings.Repeat("}", 255)
	out, changed, err := deep.Apply([]byte(body))
	if err != nil || !changed || string(out) != strings.Repeat(`{"b":`, 255)+`{}`+strings.Repeat("}", 255) {
		t.Fatalf("Apply at depth 256: changed = %v, err = %v", changed, err)
	}
}

func closer(open string) byte {
	if open == "[" {
		return ']'
	}
	return '}'
}

func TestModuleRegistered(t *testing.T) {
	m, ok := policy.Lookup(Name)
	if !ok {
		t.Fatal("not registered")
	}
	if m.Phases != policy.Response || !m.ResponseBody || m.RequestBody {
		t.Fatalf("module = %+v", m)
	}
	var schema map[string]any
	if err := json.Unmarshal([]byte(m.MetadataSchema), &schema); err != nil {
		t.Fatalf("schema: %v", err)
	}
	fac, err := m.New(policy.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fac.Build(map[string]string{"remove_fields": `["a"]`}); err != nil {
		t.Fatal(err)
	}
}

// removePath is the reference for FuzzRemoveFields: it removes a dotted path from a decoded
// document, recursively, with arrays transparent.
func removePath(v any, path []string) {
	switch x := v.(type) {
	case map[string]any:
		if len(path) == 1 {
			delete(x, path[0])
			return
		}
		if c, ok := x[path[0]]; ok {
			removePath(c, path[1:])
		}
	case []any:
		for _, e := range x {
			removePath(e, path)
		}
	}
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

// FuzzRemoveFields transforms arbitrary bodies with an arbitrary path (without index segments,
// which the reference does not model) and checks the result against removing the path from the
// decoded document. Invalid and too deep bodies must be refused.
func FuzzRemoveFields(f *testing.F) {
	for _, s := range [][2]string{
		{`{"id":1,"internal_id":2}`, "internal_id"},
		{`{"items":[{"internal_id":1,"a":2},{"b":[{"internal_id":3}]}]}`, "items.internal_id"},
		{`[{"a":{"b":1,"c":2}},{"a":[{"b":3}]}]`, "a.b"},
		{`{"n":12345678901234567890,"x":1.5e300}`, "x"},
		{`{"a":{"a":{"a":1}}}`, "a.a"},
		{`[[[[[[[[[[1]]]]]]]]]]`, "a"},
		{`{"a":1,}`, "a"},
	} {
		f.Add([]byte(s[0]), s[1])
	}
	f.Fuzz(func(t *testing.T, body []byte, path string) {
		segs := strings.Split(path, ".")
		for _, s := range segs {
			if isIndex(s) {
				return
			}
		}
		p, err := Build(map[string]string{"remove_fields": mustJSON(t, []string{path}), "max_depth": "32"})
		if err != nil {
			return // an invalid path: Build's errors are tested on their own
		}
		tr := p.(*Transform)
		n, _ := splitPrefix(body)
		r, err := tr.Execute(context.Background(), responseContext("application/json", body))
		out, changed, applyErr := tr.Apply(body[n:])
		if applyErr != nil {
			var re *RefusedError
			if !errors.As(err, &re) || len(r.Instructions) != 0 {
				t.Fatalf("body %q (err %v): Execute = %v, %v, want a refusal", body, applyErr, r, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("Execute: %v", err)
		}
		if n > 0 {
			return // prefixed bodies are checked by FuzzExecute
		}
		if !changed {
			if len(r.Instructions) != 0 {
				t.Fatalf("body %q (unchanged) got instructions %v", body, r.Instructions)
			}
		} else if len(r.Instructions) != 1 || !bytes.Equal(r.Instructions[0].GetBody().GetBody(), out) {
			t.Fatalf("body %q: instructions %v, want SET_BODY %q", body, r.Instructions, out)
		}
		if !json.Valid(out) {
			t.Fatalf("Apply(%q) = %q: not valid JSON", body, out)
		}
		if !utf8.Valid(body) || !utf8.ValidString(path) {
			return // encoding/json turns invalid UTF-8 in keys into U+FFFD; Apply compares bytes
		}
		want := decode(t, body)
		removePath(want, segs)
		if got := decode(t, out); !reflect.DeepEqual(got, want) {
			t.Fatalf("Apply(%q) removing %q = %q, want the document of %v", body, path, out, want)
		}
	})
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// benchBody is a list response of n items, each with an internal_id to remove.
func benchBody(n int) []byte {
	var b strings.Builder
	b.WriteString(`{"total":12345678901234567890,"items":[`)
	for i := 0; i < n; i++ {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(`{"id":` + strconv.Itoa(i) + `,"internal_id":"db-` + strconv.Itoa(i) + `","name":"item name","price":12.5,"tags":["a","b"],"owner":{"id":1,"email":"a@example.com"}}`)
	}
	b.WriteString(`]}`)
	return []byte(b.String())
}

// BenchmarkTransform removes a field from each of 100 items (about 12 KB) and from each of
// 8,000 (about 1 MB), as identity and as gzip (decoded, edited, sent as identity). Compare runs
// with benchstat:
//
//	go test -run '^$' -bench Transform -count 10 ./policies/bodytransform > new.txt
//	benchstat old.txt new.txt
func BenchmarkTransform(b *testing.B) {
	for _, n := range []int{100, 8000} {
		body := benchBody(n)
		p := mustBuild(b, map[string]string{"remove_fields": `["items.internal_id"]`, "max_body_bytes": "2000000"})
		for _, enc := range []string{"", "gzip"} {
			sent := body
			name := strconv.Itoa(len(body)/1000) + "KB"
			if enc != "" {
				sent = gzipBytes(b, body)
				name += "-" + enc
			}
			b.Run(name, func(b *testing.B) {
				b.ReportAllocs()
				b.SetBytes(int64(len(body)))
				b.RunParallel(func(pb *testing.PB) {
					c := encodedContext("application/json", enc, sent)
					for pb.Next() {
						r, err := p.Execute(context.Background(), c)
						if err != nil || len(r.Instructions) == 0 {
							b.Fatalf("Execute: %v, %v", r, err)
						}
					}
				})
			})
		}
	}
}
