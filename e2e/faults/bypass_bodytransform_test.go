package faults

import (
	"bytes"
	"compress/flate"
	"compress/gzip"
	"compress/zlib"
	"context"
	"io"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/internal/envoytest"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// bodyTransformKernelYAML removes password fields on /bt, with a small max_body_bytes so that
// a body over the limit is cheap to make. /bt-continue is the same transform with on_failure:
// continue, the operator's explicit choice to let a body that cannot be checked through.
const bodyTransformKernelYAML = `policy_kernel:
  server: {message_timeout_ms: 1000}
  agents:
    - name: default-agent
      socket_path: "{{SOCK}}"
      timeout_ms: 800
      health_check_interval_ms: 2000
  route_policies:
    - route_name: /bt-continue
      response_policy_chain:
        - policy: responseBodyTransform
          on_failure: continue
          metadata: {remove_fields: ["password", "user.password"], max_body_bytes: 4096}
    - route_name: /bt
      response_policy_chain:
        - policy: responseBodyTransform
          metadata: {remove_fields: ["password", "user.password"], max_body_bytes: 4096}
`

// secret is the value of every password field the upstream sends: it must never reach the
// client, in any encoding.
const secret = "hunter2-SECRET"

const pwBody = `{"user":{"name":"ada","password":"` + secret + `"},"password":"` + secret + `","n":1}`
const pwEdited = `{"user":{"name":"ada"},"n":1}`

func gzipped(t *testing.T, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	w.Write(b)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func zlibbed(t *testing.T, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := zlib.NewWriter(&buf)
	w.Write(b)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func rawDeflated(t *testing.T, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w, _ := flate.NewWriter(&buf, flate.DefaultCompression)
	w.Write(b)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// clientView is what a browser would read from a response: the body decoded by its
// content-encoding. ok is false when the encoding cannot be decoded here (br, zstd...): such a
// body must never reach the client with a secret inside, so the tests expect a refusal.
func clientView(res *envoytest.Result) (body []byte, ok bool) {
	body = res.Body
	enc := testenv.Header(res.Headers, "content-encoding")
	codings := strings.Split(enc, ",")
	for i := len(codings) - 1; i >= 0; i-- {
		var r io.Reader
		var err error
		switch strings.ToLower(strings.TrimSpace(codings[i])) {
		case "", "identity":
			continue
		case "gzip", "x-gzip":
			r, err = gzip.NewReader(bytes.NewReader(body))
		case "deflate":
			r, err = zlib.NewReader(bytes.NewReader(body))
			if err != nil {
				r, err = flate.NewReader(bytes.NewReader(body)), nil
			}
		default:
			return body, false
		}
		if err != nil {
			return body, false
		}
		if body, err = io.ReadAll(r); err != nil {
			return body, false
		}
	}
	return body, true
}

// TestBypassBodyTransform sends responses that a field-removing transform used to pass
// unchanged (compressed, too deep, too large, JSON under another content type or none, behind a
// BOM or an XSSI prefix): the client must get either the edited body or a refusal, never the
// field.
func TestBypassBodyTransform(t *testing.T) {
	e := testenv.StartEnv(t, testenv.Options{AgentYAML: agentYAML, KernelYAML: bodyTransformKernelYAML})
	c := e.Dial(t, envoyConfig)

	const bom = "\xef\xbb\xbf"
	deep := `{"password":"` + secret + `","a":` + strings.Repeat("[", 300) + strings.Repeat("]", 300) + `}`
	large := `{"password":"` + secret + `","pad":"` + strings.Repeat("x", 5000) + `"}`
	bomb := `{"password":"` + secret + `","pad":"` + strings.Repeat("0", 8<<20) + `"}`

	type resp struct {
		ct, ce string
		body   []byte
	}
	// want is the body the client must see, or "" for a refusal (500 policy_error).
	f := func(name, route string, r resp, want string) {
		t.Helper()
		hs := [][2]string{{"content-length", strconv.Itoa(len(r.body))}}
		if r.ct != "" {
			hs = append(hs, [2]string{"content-type", r.ct})
		}
		if r.ce != "" {
			hs = append(hs, [2]string{"content-encoding", r.ce})
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		res, err := c.Do(ctx, request(route), func(*envoytest.Forwarded) *envoytest.Response {
			return &envoytest.Response{Status: 200, Headers: hs, Body: r.body}
		})
		if err != nil {
			t.Errorf("%s: %v", name, err)
			return
		}
		view, decodable := clientView(res)
		if bytes.Contains(view, []byte(secret)) || (!decodable && !res.LocalReply) {
			t.Errorf("%s: the client got the field: %d %s, content-encoding %q, body %.200q",
				name, res.Status, res.Details, testenv.Header(res.Headers, "content-encoding"), view)
			return
		}
		if want == "" {
			if !res.LocalReply || res.Status != 500 || errorCode(res.Body) != "policy_error" {
				t.Errorf("%s: %d %s %.200q, want a refusal (500 policy_error)", name, res.Status, res.Details, res.Body)
			}
			return
		}
		if res.LocalReply || res.Status != 200 || string(view) != want {
			t.Errorf("%s: %d %s %.200q, want 200 %q", name, res.Status, res.Details, view, want)
			return
		}
		if cl := testenv.Header(res.Headers, "content-length"); cl != "" && cl != strconv.Itoa(len(res.Body)) {
			t.Errorf("%s: content-length %s for a body of %d bytes", name, cl, len(res.Body))
		}
	}
	const appJSON = "application/json"
	// Baseline: the plain case was always edited.
	f("identity", "/bt", resp{ct: appJSON, body: []byte(pwBody)}, pwEdited)
	// Encodings the standard library decodes are edited and sent as identity.
	f("gzip", "/bt", resp{ct: appJSON, ce: "gzip", body: gzipped(t, []byte(pwBody))}, pwEdited)
	f("x-gzip", "/bt", resp{ct: appJSON, ce: "X-Gzip", body: gzipped(t, []byte(pwBody))}, pwEdited)
	f("deflate (zlib)", "/bt", resp{ct: appJSON, ce: "deflate", body: zlibbed(t, []byte(pwBody))}, pwEdited)
	f("deflate (raw)", "/bt", resp{ct: appJSON, ce: "deflate", body: rawDeflated(t, []byte(pwBody))}, pwEdited)
	f("gzip twice", "/bt", resp{ct: appJSON, ce: "gzip, gzip", body: gzipped(t, gzipped(t, []byte(pwBody)))}, pwEdited)
	f("identity, gzip", "/bt", resp{ct: appJSON, ce: "identity, gzip", body: gzipped(t, []byte(pwBody))}, pwEdited)
	// Encodings it cannot decode are refused.
	f("br", "/bt", resp{ct: appJSON, ce: "br", body: []byte(pwBody)}, "")
	f("zstd", "/bt", resp{ct: appJSON, ce: "zstd", body: []byte(pwBody)}, "")
	f("unknown coding", "/bt", resp{ct: appJSON, ce: "x-custom", body: []byte(pwBody)}, "")
	f("gzip, br", "/bt", resp{ct: appJSON, ce: "gzip, br", body: []byte(pwBody)}, "")
	f("gzip that is not gzip", "/bt", resp{ct: appJSON, ce: "gzip", body: []byte(pwBody)}, "")
	f("gzip cut short", "/bt", resp{ct: appJSON, ce: "gzip", body: gzipped(t, []byte(pwBody))[:30]}, "")
	// A decompression bomb is refused, not expanded past max_body_bytes.
	f("gzip bomb", "/bt", resp{ct: appJSON, ce: "gzip", body: gzipped(t, []byte(bomb))}, "")
	// Bodies it cannot edit are refused.
	f("300 levels deep", "/bt", resp{ct: appJSON, body: []byte(deep)}, "")
	f("over max_body_bytes", "/bt", resp{ct: appJSON, body: []byte(large)}, "")
	f("invalid JSON", "/bt", resp{ct: appJSON, body: []byte(`{"password":"` + secret + `",}`)}, "")
	f("HTML labelled JSON", "/bt", resp{ct: appJSON, body: []byte(`<p>password: ` + secret + `</p>`)}, "")
	// Other JSON content types.
	f("text/json", "/bt", resp{ct: "text/json", body: []byte(pwBody)}, pwEdited)
	f("TEXT/JSON with a charset", "/bt", resp{ct: "TEXT/JSON; charset=UTF-8", body: []byte(pwBody)}, pwEdited)
	f("vnd +json", "/bt", resp{ct: "application/vnd.x+json", body: []byte(pwBody)}, pwEdited)
	f("vnd +json with version", "/bt", resp{ct: "application/vnd.api+json; version=2", body: []byte(pwBody)}, pwEdited)
	// No content type: a body that parses as JSON is edited.
	f("no content type", "/bt", resp{body: []byte(pwBody)}, pwEdited)
	f("no content type, gzip", "/bt", resp{ce: "gzip", body: gzipped(t, []byte(pwBody))}, pwEdited)
	f("no content type, too deep", "/bt", resp{body: []byte(deep)}, "")
	f("no content type, invalid", "/bt", resp{body: []byte(`{"password":"` + secret + `"`)}, "")
	f("no content type, br", "/bt", resp{ce: "br", body: []byte(pwBody)}, "")
	// Prefixes are kept as they were.
	f("BOM", "/bt", resp{ct: appJSON, body: []byte(bom + pwBody)}, bom+pwEdited)
	f("XSSI prefix", "/bt", resp{ct: appJSON, body: []byte(")]}'\n" + pwBody)}, ")]}'\n"+pwEdited)
	f("XSSI prefix with comma", "/bt", resp{ct: appJSON, body: []byte(")]}',\n" + pwBody)}, ")]}',\n"+pwEdited)
	f("BOM and XSSI prefix, no content type, gzip", "/bt", resp{ce: "gzip", body: gzipped(t, []byte(bom+")]}'\n"+pwBody))}, bom+")]}'\n"+pwEdited)
	f("XSSI prefix, too deep", "/bt", resp{ct: appJSON, body: []byte(")]}'\n" + deep)}, "")

	// A body that is not JSON by its content type passes unchanged: it has no field to remove.
	res, err := c.Do(context.Background(), request("/bt"), func(*envoytest.Forwarded) *envoytest.Response {
		return &envoytest.Response{Status: 200, Headers: [][2]string{{"content-type", "text/plain"}}, Body: []byte("plain text")}
	})
	if err != nil || res.LocalReply || string(res.Body) != "plain text" {
		t.Errorf("text/plain: %v %+v", err, res)
	}

	// on_failure: continue is the operator's choice to let what cannot be checked through.
	res, err = c.Do(context.Background(), request("/bt-continue"), func(*envoytest.Forwarded) *envoytest.Response {
		return &envoytest.Response{Status: 200, Headers: [][2]string{{"content-type", "application/json"}, {"content-encoding", "br"}}, Body: []byte(pwBody)}
	})
	if err != nil || res.LocalReply || string(res.Body) != pwBody {
		t.Errorf("on_failure continue: %v %+v", err, res)
	}
	// Every refusal is counted by reason, and logged without the body.
	for reason, atLeast := range map[string]float64{"unsupported_encoding": 5, "bad_encoding": 2, "too_large": 2, "too_deep": 3, "invalid_json": 3} {
		if got := agentMetric(t, e, `policy_agent_body_transform_refused_total{reason="`+reason+`"}`); got < atLeast {
			t.Errorf("refused{reason=%q} = %v, want at least %v", reason, got, atLeast)
		}
	}
	logs := e.Agent.Logs.String() + e.Kernel.Logs.String()
	if strings.Contains(logs, secret) {
		t.Errorf("a log holds the field's value:\n%s", logs)
	}
	if !strings.Contains(logs, "response body refused (unsupported_encoding)") {
		t.Errorf("no refusal logged:\n%s", logs)
	}
	alive(t, e)
}
