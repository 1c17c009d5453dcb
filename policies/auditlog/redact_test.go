package auditlog

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/url"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/policy-engine/policy-engine/agent/policy"
	"github.com/policy-engine/policy-engine/policies/bodytransform/jsonedit"
)

func TestRedactJSON(t *testing.T) {
	r := newRedactor(nil, []string{"PIN", "x-session"})
	f := func(in, want string) {
		t.Helper()
		out, err := r.JSON([]byte(in))
		if err != nil {
			t.Fatalf("JSON(%s): %v", in, err)
		}
		if string(out) != want {
			t.Fatalf("JSON(%s)\n got %s\nwant %s", in, out, want)
		}
	}
	// Every default key, any case, '-' or '_'.
	for _, k := range DefaultRedactKeys {
		for _, variant := range []string{k, strings.ToUpper(k), strings.ReplaceAll(k, "_", "-")} {
			f(`{"`+variant+`":"v","keep":"v"}`, `{"`+variant+`":"[REDACTED]","keep":"v"}`)
		}
	}
	// Values of any type, at any depth, in arrays; a redacted value is not visited.
	f(`{"a":[{"token":{"x":[1,2]}},{"b":{"secret":12345678901234567890}}],"password":null,"ok":true}`,
		`{"a":[{"token":"[REDACTED]"},{"b":{"secret":"[REDACTED]"}}],"password":"[REDACTED]","ok":true}`)
	f(`[{"Access_Token":"t"},{"API-KEY":["k"]}]`, `[{"Access_Token":"[REDACTED]"},{"API-KEY":"[REDACTED]"}]`)
	// Configured keys, normalized the same way.
	f(`{"pin":1,"X_Session":"s","session":"keep"}`, `{"pin":"[REDACTED]","X_Session":"[REDACTED]","session":"keep"}`)
	// Escaped keys are matched decoded; values that only mention a key are kept.
	f(`{"pass\u0077ord":"p","note":"password"}`, `{"pass\u0077ord":"[REDACTED]","note":"password"}`)
	// Near misses are kept.
	f(`{"tokens":1,"my_token":2,"passwordHint":3,"sec ret":4}`, `{"tokens":1,"my_token":2,"passwordHint":3,"sec ret":4}`)
	// A key with non-ASCII letters is lowercased by Unicode rules.
	r2 := newRedactor(nil, []string{"Mot_De_Passé"})
	if out, _ := r2.JSON([]byte(`{"MOT-DE-PASSÉ":"x"}`)); string(out) != `{"MOT-DE-PASSÉ":"[REDACTED]"}` {
		t.Fatalf("unicode key: %s", out)
	}
	if out, _ := r2.JSON([]byte(`{"` + strings.Repeat("é", 100) + `":"x"}`)); !bytes.Contains(out, []byte(`"x"`)) {
		t.Fatalf("long key redacted: %s", out)
	}
	// Documents that cannot be redacted are errors.
	if _, err := r.JSON([]byte(`{"password":"p"`)); !errors.Is(err, jsonedit.ErrSyntax) {
		t.Fatalf("invalid JSON: %v", err)
	}
	if _, err := r.JSON([]byte(strings.Repeat(`{"a":`, 100000))); !errors.Is(err, jsonedit.ErrTooDeep) {
		t.Fatalf("deep JSON: %v", err)
	}
}

func TestRedactHeaders(t *testing.T) {
	r := newRedactor([]string{"X-Session-Id"}, nil)
	in := map[string]string{
		"authorization": "a", "proxy-authorization": "b", "cookie": "c", "set-cookie": "d", "x-api-key": "e",
		"x-session-id": "f", "access-token": "g", "Authorization": "h", "content-type": "application/json",
		"x-request-id": "r",
	}
	got := r.Headers(in, nil)
	for k, v := range got {
		keep := k == "content-type" || k == "x-request-id"
		if keep && v != in[k] || !keep && v != Redacted {
			t.Errorf("header %s = %q", k, v)
		}
	}
	if len(got) != len(in) || in["cookie"] != "c" {
		t.Fatal("Headers changed its input or lost headers")
	}
	if r.Headers(nil, nil) != nil {
		t.Fatal("Headers(nil) != nil")
	}
}

func TestRedactPath(t *testing.T) {
	r := newRedactor(nil, []string{"sig"})
	for in, want := range map[string]string{
		"/a":                                  "/a",
		"/a?":                                 "/a?",
		"/a?x=1":                              "/a?x=1",
		"/a?token=t":                          "/a?token=[REDACTED]",
		"/a?x=1&access_token=t&y=2":           "/a?x=1&access_token=[REDACTED]&y=2",
		"/a?access%5Ftoken=t&ACCESS-TOKEN=t2": "/a?access%5Ftoken=[REDACTED]&ACCESS-TOKEN=[REDACTED]",
		"/a?password&x=&&sig=abc":             "/a?password=[REDACTED]&x=&&sig=[REDACTED]",
		"/a?%zz=1&token=a=b":                  "/a?%zz=1&token=[REDACTED]",
		"/a?x=1?token=2":                      "/a?x=1?token=2",
	} {
		if got := r.Path(in, nil); got != want {
			t.Errorf("Path(%q) = %q, want %q", in, got, want)
		}
	}
}

// redactTree is the reference of FuzzRedactJSON: it replaces the value of every sensitive key
// of a decoded document, without visiting the replaced value.
func redactTree(r *redactor, v any) any {
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			if r.sensitiveKey([]byte(k)) {
				x[k] = Redacted
			} else {
				x[k] = redactTree(r, e)
			}
		}
	case []any:
		for i, e := range x {
			x[i] = redactTree(r, e)
		}
	}
	return v
}

func decodeNumber(t *testing.T, b []byte) any {
	t.Helper()
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		t.Fatalf("decode %q: %v", b, err)
	}
	return v
}

// FuzzRedactJSON redacts arbitrary bodies: a body is redacted exactly when encoding/json can
// parse it (within the depth cap), the result is JSON, equals the reference redaction of the
// decoded document, and holds no value of a sensitive key.
func FuzzRedactJSON(f *testing.F) {
	for _, s := range []string{
		`{"password":"hunter2","user":{"token":"abc","tags":[{"Secret":1}]},"n":12345678901234567890}`,
		`[{"access_token":"a"},{"refresh-token":{"x":"y"}}]`,
		`{"pass\u0077ord":"p"}`,
		`{"password":"p","password":"q"}`,
		`{"api_key":[1,{"password":2}],"ok":"token"}`,
		`{"a":`,
		`"password"`,
	} {
		f.Add([]byte(s))
	}
	r := newRedactor(nil, nil)
	f.Fuzz(func(t *testing.T, body []byte) {
		out, err := r.JSON(body)
		if errors.Is(err, jsonedit.ErrTooDeep) {
			return
		}
		if (err == nil) != json.Valid(body) {
			t.Fatalf("JSON(%q): err = %v, json.Valid = %v", body, err, json.Valid(body))
		}
		if err != nil {
			return
		}
		if !json.Valid(out) {
			t.Fatalf("JSON(%q) = %q: not valid JSON", body, out)
		}
		if !utf8.Valid(body) {
			return // encoding/json turns invalid UTF-8 in keys into U+FFFD; the redactor sees bytes
		}
		want := redactTree(r, decodeNumber(t, body))
		if got := decodeNumber(t, out); !reflect.DeepEqual(got, want) {
			t.Fatalf("JSON(%q) = %q, want the document of %v", body, out, want)
		}
	})
}

// FuzzRedactPath redacts arbitrary request paths: the query keeps its parameters in order, and
// every sensitive parameter has the value [REDACTED].
func FuzzRedactPath(f *testing.F) {
	for _, s := range []string{"/a?token=t&x=1", "/a", "/a?access%5Ftoken=t", "/a?&&=&password", "/?%zz&token=%"} {
		f.Add(s)
	}
	r := newRedactor(nil, nil)
	f.Fuzz(func(t *testing.T, p string) {
		got := r.Path(p, nil)
		path, q, ok := strings.Cut(p, "?")
		gotPath, gotQ, gotOK := strings.Cut(got, "?")
		if ok != gotOK || path != gotPath {
			t.Fatalf("Path(%q) = %q: the path changed", p, got)
		}
		if !ok {
			return
		}
		in, out := strings.Split(q, "&"), strings.Split(gotQ, "&")
		if len(in) != len(out) {
			t.Fatalf("Path(%q) = %q: %d parameters, want %d", p, got, len(out), len(in))
		}
		for i := range in {
			name, _, _ := strings.Cut(in[i], "=")
			key, err := url.QueryUnescape(name)
			if err != nil {
				key = name
			}
			if r.sensitiveParam([]byte(key), nil) {
				if out[i] != name+"="+Redacted {
					t.Fatalf("Path(%q) = %q: parameter %q not redacted", p, got, in[i])
				}
			} else if out[i] != in[i] {
				t.Fatalf("Path(%q) = %q: parameter %q changed", p, got, in[i])
			}
		}
	})
}

// TestRedactCredentialNames: headers and query parameters whose names hold a credential word,
// the default credential headers and short parameter names, and the names the config's
// policies read credentials from are redacted; JSON body keys only match whole.
func TestRedactCredentialNames(t *testing.T) {
	r := newRedactor(nil, nil)
	creds := (*policy.CredentialSet)(nil).With(policy.Credentials{Headers: []string{"X-Partner"}, Params: []string{"partner"}})
	f := func(name string, header, param bool) {
		t.Helper()
		if got := r.sensitiveHeader(name, creds); got != header {
			t.Errorf("header %q: sensitive %v, want %v", name, got, header)
		}
		if got := r.sensitiveParam([]byte(name), creds); got != param {
			t.Errorf("parameter %q: sensitive %v, want %v", name, got, param)
		}
	}
	for _, h := range DefaultRedactHeaders {
		f(h, true, h != "cookie" && h != "set-cookie" && h != "proxy-authorization") // as parameters, names without a credential word are data
	}
	f("x-csrf-token", true, true)
	f("X-Session-Token", true, true)
	f("x-amz-security-token", true, true)
	f("x-session-id", true, true)
	f("x-client-secret", true, true)
	f("my_password_hint", true, true)
	f("x-goog-api-key", true, true)
	f("x-apikey", true, true)
	f("x-amz-credential", true, true)
	f("x-amz-signature", true, true)
	f("x-partner", true, false)
	f("partner", false, true)
	f("key", false, true)
	f("code", false, true)
	f("sig", false, true)
	f("SIG", false, true)
	f("content-type", false, false)
	f("x-request-id", false, false)
	f("user-agent", false, false)
	f("monkey", false, false)
	f("page", false, false)
	f(strings.Repeat("x", 200)+"-token", true, true)
	f(strings.Repeat("x", 200), false, false)

	if got := r.Path("/a?key=1&code=2&sig=3&token=4&x-amz-security-token=5&partner=6&page=7&monkey=8", creds); got !=
		"/a?key=[REDACTED]&code=[REDACTED]&sig=[REDACTED]&token=[REDACTED]&x-amz-security-token=[REDACTED]&partner=[REDACTED]&page=7&monkey=8" {
		t.Errorf("Path = %s", got)
	}
	// JSON keys: whole matches only, so a body's counters and codes are kept.
	if out, _ := r.JSON([]byte(`{"total_tokens":1,"code":404,"key":"k","session_count":2,"token":"t"}`)); string(out) != `{"total_tokens":1,"code":404,"key":"k","session_count":2,"token":"[REDACTED]"}` {
		t.Errorf("JSON = %s", out)
	}
}

// TestRedactAllowList: in allow-list mode a record holds only the named headers, credentials
// among them still redacted.
func TestRedactAllowList(t *testing.T) {
	fac := newFactory(t, `{"headers":{"mode":"allow","names":["User-Agent","x-api-key","x-partner"]}}`)
	creds := (*policy.CredentialSet)(nil).With(policy.Credentials{Headers: []string{"x-partner"}})
	got := fac.redactor.Headers(map[string]string{"user-agent": "ua", "x-api-key": "k", "x-partner": "p", "x-other": "o", "cookie": "c"}, creds)
	if want := map[string]string{"user-agent": "ua", "x-api-key": Redacted, "x-partner": Redacted}; !reflect.DeepEqual(got, want) {
		t.Fatalf("allow-list headers = %v, want %v", got, want)
	}
	if got := fac.redactor.Headers(map[string]string{"x-other": "o"}, nil); got != nil {
		t.Fatalf("no allowed header: %v, want nil", got)
	}
	if got := newFactory(t, `{"headers":{"mode":"redact"}}`).redactor.Headers(map[string]string{"x-other": "o"}, nil); got["x-other"] != "o" {
		t.Fatalf("redact mode: %v", got)
	}
}
