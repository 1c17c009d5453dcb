package bodytransform

import (
	"bytes"
	"compress/flate"
	"compress/gzip"
	"compress/zlib"
	"context"
	"encoding/json"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// fuzzContentTypes and fuzzEncodings are what FuzzExecute picks from. The encodings either
// encode the body for real or label its raw bytes with a coding.
var (
	fuzzContentTypes = []string{"application/json", "", "TEXT/JSON; charset=utf-8", "application/vnd.x+json", "text/plain"}
	fuzzEncodings    = []struct {
		name   string
		encode func(testing.TB, []byte) []byte
	}{
		{"", nil},
		{"gzip", gzipBytes},
		{"deflate", zlibBytes},
		{"deflate", flateBytes},
		{"gzip, gzip", func(t testing.TB, b []byte) []byte { return gzipBytes(t, gzipBytes(t, b)) }},
		{"gzip", nil},
		{"deflate", nil},
		{"br", nil},
		{"identity", nil},
	}
)

// clientBody decodes a body as a lenient client would: as much as its decoder yields, errors
// ignored. ok is false for a coding that cannot be decoded here.
func clientBody(enc string, b []byte) (out []byte, ok bool) {
	codings := strings.Split(enc, ",")
	for i := len(codings) - 1; i >= 0; i-- {
		var r io.Reader
		switch strings.ToLower(strings.TrimSpace(codings[i])) {
		case "", "identity":
			continue
		case "gzip", "x-gzip":
			zr, err := gzip.NewReader(bytes.NewReader(b))
			if err != nil {
				return nil, true
			}
			r = zr
		case "deflate":
			zr, err := zlib.NewReader(bytes.NewReader(b))
			if err != nil {
				r = flate.NewReader(bytes.NewReader(b))
			} else {
				r = zr
			}
		default:
			return b, false
		}
		b, _ = io.ReadAll(r)
	}
	return b, true
}

// stripPrefix removes what a client strips before parsing: a UTF-8 BOM, then an
// anti-hijacking guard.
func stripPrefix(b []byte) []byte {
	b = bytes.TrimPrefix(b, []byte("\xef\xbb\xbf"))
	for _, g := range []string{")]}',", ")]}'", "while(1);", "for(;;);"} {
		if bytes.HasPrefix(b, []byte(g)) {
			return b[len(g):]
		}
	}
	return b
}

// FuzzExecute runs the policy on arbitrary bodies under several content types and codings,
// and checks what a client would read: a body it can parse as JSON never holds the removed
// field (unless its content type says it is not JSON), a body it cannot decode was refused, and
// an edited body is the original with the field removed, its prefix kept.
func FuzzExecute(f *testing.F) {
	for _, s := range []string{
		`{"secret":1,"a":2}`,
		"\xef\xbb\xbf{\"secret\":1}",
		")]}'\n[{\"secret\":1},{\"b\":[]}]",
		")]}',\n{\"secret\":{\"secret\":1}}",
		"while(1);{\"secret\":1}",
		` {"a":"secret","secret":"a"} `,
		`[[[[[[[[[[[[[[[[[[{"secret":1}]]]]]]]]]]]]]]]]]]`,
		"\xff\xfe{\x00}\x00",
		"plain text",
		`{"secret":1,}`,
	} {
		for ct := range fuzzContentTypes {
			for enc := range fuzzEncodings {
				f.Add([]byte(s), uint8(ct), uint8(enc))
			}
		}
	}
	p := mustBuild(f, map[string]string{"remove_fields": `["secret"]`, "max_body_bytes": "4096", "max_depth": "16"})
	f.Fuzz(func(t *testing.T, body []byte, ctSel, encSel uint8) {
		ct := fuzzContentTypes[int(ctSel)%len(fuzzContentTypes)]
		enc := fuzzEncodings[int(encSel)%len(fuzzEncodings)]
		sent := body
		if enc.encode != nil {
			sent = enc.encode(t, body)
		}
		if len(sent) == 0 {
			return
		}
		c := encodedContext(ct, enc.name, sent)
		r, err := p.Execute(context.Background(), c)
		if err != nil {
			var re *RefusedError
			if !errors.As(err, &re) || len(r.Instructions) != 0 {
				t.Fatalf("Execute = %v, %v: an error that is not a refusal, or with instructions", r, err)
			}
			return
		}
		// What the client receives.
		got, gotEnc := sent, enc.name
		edited := false
		for _, in := range r.Instructions {
			switch in.GetType() {
			case agentv1.InstructionType_SET_BODY:
				got, edited = in.GetBody().GetBody(), true
			case agentv1.InstructionType_REMOVE_HEADER:
				if in.GetHeader().GetKey() == "content-encoding" {
					gotEnc = ""
				}
			default:
				t.Fatalf("unexpected instruction %v", in)
			}
		}
		if ct == "text/plain" {
			if len(r.Instructions) != 0 {
				t.Fatalf("text/plain got instructions %v", r.Instructions)
			}
			return // not JSON by its content type: passed by design
		}
		view, ok := clientBody(gotEnc, got)
		if !ok {
			t.Fatalf("content-encoding %q passed without being checked", gotEnc)
		}
		doc := stripPrefix(view)
		if edited {
			orig, _ := clientBody(enc.name, sent)
			n := len(orig) - len(stripPrefix(orig))
			if !bytes.Equal(view[:min(n, len(view))], orig[:n]) {
				t.Fatalf("prefix %q became %q", orig[:n], view[:min(n, len(view))])
			}
			if !json.Valid(doc) {
				t.Fatalf("edited body %q is not JSON", got)
			}
			if json.Valid(stripPrefix(orig)) && utf8Equal(orig) {
				want := decodeAny(t, stripPrefix(orig))
				removePath(want, []string{"secret"})
				if have := decodeAny(t, doc); !reflect.DeepEqual(have, want) {
					t.Fatalf("edited %q into %q, want the document of %v", orig, doc, want)
				}
			}
		}
		if !json.Valid(doc) {
			return // a client cannot parse it
		}
		have := decodeAny(t, doc)
		clean := decodeAny(t, doc)
		removePath(clean, []string{"secret"})
		if !reflect.DeepEqual(have, clean) {
			t.Fatalf("the client reads the field: %q (content-type %q, encoding %q, instructions %v)", view, ct, gotEnc, r.Instructions)
		}
	})
}

// utf8Equal reports whether b is valid UTF-8: encoding/json replaces invalid bytes in keys, so
// documents compare only then.
func utf8Equal(b []byte) bool { return bytes.Equal(b, bytes.ToValidUTF8(b, nil)) }

func decodeAny(t *testing.T, b []byte) any {
	t.Helper()
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		t.Fatalf("decode %q: %v", b, err)
	}
	return v
}

// FuzzDecodeBody decodes arbitrary bytes under an arbitrary content-encoding: never more than
// the limit, never a panic, and a body it accepts decodes to what the standard library's
// readers give.
func FuzzDecodeBody(f *testing.F) {
	body := []byte(`{"a":1,"b":[1,2,3]}`)
	for _, s := range []struct {
		enc  string
		data []byte
	}{
		{"gzip", gzipBytes(f, body)},
		{"gzip", append(gzipBytes(f, body), gzipBytes(f, body)...)},
		{"deflate", zlibBytes(f, body)},
		{"deflate", flateBytes(f, body)},
		{"gzip, deflate", zlibBytes(f, gzipBytes(f, body))},
		{"identity", body},
		{"br", body},
		{"gzip", gzipBytes(f, bytes.Repeat([]byte("0"), 5000))},
		{"deflate", []byte{0x78, 0x9c}},
		{"gzip", []byte{0x1f, 0x8b}},
	} {
		f.Add(s.enc, s.data)
	}
	const limit = 1024
	f.Fuzz(func(t *testing.T, enc string, data []byte) {
		var buf []byte
		out, decoded, err := decodeBody(enc, data, limit, &buf)
		if decoded && len(out) > limit {
			t.Fatalf("decoded %d bytes, more than the limit %d", len(out), limit)
		}
		if err != nil {
			if !errors.Is(err, errDecodedTooLarge) && out != nil {
				t.Fatalf("error %v with output %q", err, out)
			}
			return
		}
		if !decoded {
			if !bytes.Equal(out, data) {
				t.Fatalf("not decoded, but the body changed")
			}
			for _, c := range strings.Split(enc, ",") {
				if c = strings.TrimSpace(c); c != "" && !strings.EqualFold(c, "identity") {
					t.Fatalf("coding %q ignored", c)
				}
			}
			return
		}
		if strings.EqualFold(strings.TrimSpace(enc), "gzip") {
			zr, err := gzip.NewReader(bytes.NewReader(data))
			if err != nil {
				t.Fatalf("accepted a body gzip.NewReader refuses: %v", err)
			}
			want, err := io.ReadAll(zr)
			if err != nil || !bytes.Equal(want, out) {
				t.Fatalf("decoded %q, the standard library %q, %v", out, want, err)
			}
		}
		if strings.EqualFold(strings.TrimSpace(enc), "deflate") {
			zr, err := zlib.NewReader(bytes.NewReader(data))
			if err != nil {
				zr = flate.NewReader(bytes.NewReader(data))
			}
			want, err := io.ReadAll(zr)
			if err != nil || !bytes.Equal(want, out) {
				t.Fatalf("decoded %q, the standard library %q, %v", out, want, err)
			}
		}
	})
}
