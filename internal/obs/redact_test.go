package obs

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestRedactTree(t *testing.T) {
	f := func(in, want string) {
		t.Helper()
		var tree any
		if err := json.Unmarshal([]byte(in), &tree); err != nil {
			t.Fatal(err)
		}
		got, _ := json.Marshal(RedactTree(false, tree))
		if string(got) != want {
			t.Fatalf("RedactTree(%s)\n got %s\nwant %s", in, got, want)
		}
	}
	f(`{"keys":[{"key_sha256":"abc","user_id":"u"}],"header_name":"X-API-Key"}`,
		`{"header_name":"X-API-Key","keys":[{"key_sha256":"[REDACTED]","user_id":"[REDACTED]"}]}`)
	f(`{"hmac_secret":"s3cr3t","issuer":"https://auth.example.com","leeway":30}`,
		`{"hmac_secret":"[REDACTED]","issuer":"https://auth.example.com","leeway":30}`)
	f(`{"public_key_pem":"${file:/etc/k.pem}","redis":{"password":"p","PASSWORD_ENV":"REDIS_PW","db":2,"address":"redis://u:pw@h:6379"}}`,
		`{"public_key_pem":"${file:/etc/k.pem}","redis":{"PASSWORD_ENV":"[REDACTED]","address":"redis://u:REDACTED@h:6379","db":2,"password":"[REDACTED]"}}`)
	f(`{"tracing":{"headers":{"x-honeycomb-team":"abc","authorization":"${env:OTLP_AUTH}"},"enabled":true}}`,
		`{"tracing":{"enabled":true,"headers":{"authorization":"${env:OTLP_AUTH}","x-honeycomb-team":"[REDACTED]"}}}`)
	f(`{"api_key":1234,"required":true,"token":null}`, `{"api_key":"[REDACTED]","required":true,"token":null}`)
}

func TestRedactMapNestedJSON(t *testing.T) {
	got, _ := json.Marshal(RedactMap(false, map[string]string{
		"keys":       `[{"key":"plain-key"}]`,
		"issuer":     "https://auth.example.com",
		"hmac":       "${env:H}",
		"claims":     `{"sub":"X-User"}`,
		"bad_json":   `{"password":`,
		"auth_token": "",
	}))
	want := `{"auth_token":"","bad_json":"{\"password\":","claims":{"sub":"X-User"},"hmac":"${env:H}","issuer":"https://auth.example.com","keys":[{"key":"[REDACTED]"}]}`
	if string(got) != want {
		t.Fatalf("got  %s\nwant %s", got, want)
	}
}

// FuzzRedactJSON checks that redacting any document never panics and that no string under a
// secret name survives, but a secret reference.
func FuzzRedactJSON(f *testing.F) {
	for _, s := range []string{`{"password":"x"}`, `{"a":[{"token":"y"}]}`, `{"k":"${env:A}"}`, `[1,"x",{"key":{"nested":"z"}}]`, `"str"`, `{"url":"redis://a:b@c"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, doc []byte) {
		out, err := json.Marshal(RedactJSON(doc))
		if err != nil {
			t.Fatalf("redacted tree does not encode: %v", err)
		}
		var check func(secret bool, v any)
		check = func(secret bool, v any) {
			switch x := v.(type) {
			case map[string]any:
				for k, c := range x {
					check(secret || SecretKey(k), c)
				}
			case []any:
				for _, c := range x {
					check(secret, c)
				}
			case string:
				if secret && x != "" && x != Redacted && !strings.HasPrefix(x, "${") {
					t.Fatalf("secret value %q survived in %s", x, out)
				}
			case float64:
				if secret {
					t.Fatalf("secret number survived in %s", out)
				}
			}
		}
		var tree any
		if json.Unmarshal(out, &tree) == nil {
			check(false, tree)
		}
	})
}
