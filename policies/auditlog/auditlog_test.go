package auditlog

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// captureStdout sends the stdout sink's output to a buffer for the rest of the test.
func captureStdout(t *testing.T) *testenv.SyncBuffer {
	t.Helper()
	old := stdout
	buf := &testenv.SyncBuffer{}
	stdout = buf
	t.Cleanup(func() { stdout = old })
	return buf
}

func newFactory(t *testing.T, raw string) *Factory {
	t.Helper()
	f, err := New(policy.Config{Raw: json.RawMessage(raw)})
	if err != nil {
		t.Fatalf("New(%s): %v", raw, err)
	}
	t.Cleanup(func() { f.(*Factory).Close() })
	return f.(*Factory)
}

func mustBuild(t *testing.T, f *Factory, md map[string]string) *AuditLog {
	t.Helper()
	p, err := f.Build(md)
	if err != nil {
		t.Fatalf("Build(%v): %v", md, err)
	}
	return p.(*AuditLog)
}

// parseRecords decodes every line of the audit output strictly.
func parseRecords(t *testing.T, out string) []Record {
	t.Helper()
	var recs []Record
	for _, line := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
		if line == "" {
			continue
		}
		d := json.NewDecoder(strings.NewReader(line))
		d.DisallowUnknownFields()
		var r Record
		if err := d.Decode(&r); err != nil {
			t.Fatalf("record %q: %v", line, err)
		}
		recs = append(recs, r)
	}
	return recs
}

// Secrets that must never reach the audit output.
var secrets = []string{
	"Bearer-eyJhbGciOi-SECRET1", "sk-live-SECRET2", "session=SECRET3", "SECRET4-pw", "SECRET5-refresh",
	"SECRET6-q", "SECRET7-setcookie", "SECRET8-custom", "SECRET9-nested", "SECRET10-proxy",
}

func TestRecordBothPhases(t *testing.T) {
	out := captureStdout(t)
	f := newFactory(t, `{"redact_headers":["X-Custom-Secret"],"redact_keys":["pin"]}`)
	p := mustBuild(t, f, map[string]string{"log_response_body": "true"})

	reqHeaders := map[string]string{
		"authorization":       secrets[0],
		"x-api-key":           secrets[1],
		"cookie":              secrets[2],
		"proxy-authorization": secrets[9],
		"x-custom-secret":     secrets[7],
		"user-agent":          "curl/8",
	}
	c := &policy.Context{
		Phase:     agentv1.PolicyPhase_REQUEST,
		RequestID: "req-42",
		RouteName: "users",
		Method:    "POST",
		Path:      "/api/v1/users?page=2&access_token=" + secrets[5] + "&x=1",
		Authority: "api.example.com",
		ClientIP:  "192.0.2.7",
		Headers:   reqHeaders,
	}
	r, err := p.Execute(context.Background(), c)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Instructions) != 1 || r.Instructions[0].GetState().GetKey() != StateStart {
		t.Fatalf("request phase instructions = %v, want SET_STATE %s", r.Instructions, StateStart)
	}
	start, err := strconv.ParseInt(r.Instructions[0].GetState().GetValue(), 10, 64)
	if err != nil || time.Since(time.Unix(0, start)) > time.Minute {
		t.Fatalf("audit.start = %q", r.Instructions[0].GetState().GetValue())
	}
	// A second request-phase run keeps the first start time.
	c.State = map[string]string{StateStart: "1"}
	if r, _ := p.Execute(context.Background(), c); len(r.Instructions) != 0 {
		t.Fatalf("second request phase: %v", r.Instructions)
	}

	// The response phase, with the state the kernel carried over, 1.5 s later.
	c.Phase = agentv1.PolicyPhase_RESPONSE
	c.State = map[string]string{
		StateStart:    strconv.FormatInt(time.Now().Add(-1500*time.Millisecond).UnixNano(), 10),
		"user_id":     "user-7",
		"auth_method": "api_key",
	}
	body := `{"id":1,"Password":"` + secrets[3] + `","profile":{"refresh_token":"` + secrets[4] + `","pin":1234,"tags":[{"secret":{"v":"` + secrets[8] + `"}}]},"n":12345678901234567890}`
	c.Response = &policy.ResponseContext{
		Status:  201,
		Headers: map[string]string{"content-type": "application/json", "set-cookie": secrets[6]},
		Body:    []byte(body),
	}
	if r, err := runResponse(p, c); err != nil || len(r.Instructions) != 0 || r.Status != agentv1.StatusCode_OK {
		t.Fatalf("response phase: %v, %v", r, err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}

	text := out.String()
	for _, s := range secrets {
		if strings.Contains(text, s) {
			t.Errorf("secret %q in the audit output:\n%s", s, text)
		}
	}
	recs := parseRecords(t, text)
	if len(recs) != 1 {
		t.Fatalf("%d records, want 1:\n%s", len(recs), text)
	}
	rec := recs[0]
	if _, err := time.Parse(time.RFC3339Nano, rec.Time); err != nil {
		t.Errorf("time %q: %v", rec.Time, err)
	}
	want := Record{
		Time: rec.Time, RequestID: "req-42", Route: "users", Method: "POST",
		Path:      "/api/v1/users?page=2&access_token=[REDACTED]&x=1",
		Authority: "api.example.com", ClientIP: "192.0.2.7", Status: 201, Decision: "allowed", Phase: "response",
		UserID: "user-7", AuthMethod: "api_key", DurationMS: rec.DurationMS,
	}
	got := rec
	got.RequestHeaders, got.ResponseHeaders, got.ResponseBody, got.ResponseBodyBytes = nil, nil, nil, 0
	if !equalJSON(t, got, want) {
		t.Errorf("record = %+v\nwant %+v", got, want)
	}
	if rec.DurationMS == nil || *rec.DurationMS < 1500 || *rec.DurationMS > 60000 {
		t.Errorf("duration_ms = %v, want about 1500", rec.DurationMS)
	}
	wantReq := map[string]string{
		"authorization": Redacted, "x-api-key": Redacted, "cookie": Redacted, "proxy-authorization": Redacted,
		"x-custom-secret": Redacted, "user-agent": "curl/8",
	}
	if !equalJSON(t, rec.RequestHeaders, wantReq) {
		t.Errorf("request_headers = %v", rec.RequestHeaders)
	}
	if !equalJSON(t, rec.ResponseHeaders, map[string]string{"content-type": "application/json", "set-cookie": Redacted}) {
		t.Errorf("response_headers = %v", rec.ResponseHeaders)
	}
	wantBody := `{"id":1,"Password":"[REDACTED]","profile":{"refresh_token":"[REDACTED]","pin":"[REDACTED]","tags":[{"secret":"[REDACTED]"}]},"n":12345678901234567890}`
	if rec.ResponseBody == nil || *rec.ResponseBody != wantBody || rec.ResponseBodyBytes != len(body) || rec.ResponseBodyTruncated {
		t.Errorf("response_body = %v (%d bytes, truncated %v), want %s", rec.ResponseBody, rec.ResponseBodyBytes, rec.ResponseBodyTruncated, wantBody)
	}
	// The policy did not change the request's headers.
	if reqHeaders["authorization"] != secrets[0] {
		t.Error("the policy changed the request headers")
	}
}

func equalJSON(t *testing.T, a, b any) bool {
	t.Helper()
	x, err := json.Marshal(a)
	if err != nil {
		t.Fatal(err)
	}
	y, err := json.Marshal(b)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Equal(x, y)
}

// TestRecordOptional covers records without a request phase, headers or body.
func TestRecordOptional(t *testing.T) {
	out := captureStdout(t)
	f := newFactory(t, `{}`)
	p := mustBuild(t, f, map[string]string{"log_headers": "false"})
	c := &policy.Context{
		Phase:     agentv1.PolicyPhase_RESPONSE,
		RouteName: "r",
		Method:    "GET",
		Path:      "/x",
		Headers:   map[string]string{"authorization": "Basic SECRET"},
		State:     map[string]string{StateStart: "not a number"},
		Response:  &policy.ResponseContext{Status: 204, Headers: map[string]string{"content-type": "application/json"}, Body: []byte(`{"a":1}`)},
	}
	if _, err := runResponse(p, c); err != nil {
		t.Fatal(err)
	}
	// A start time in the future gives no duration either.
	c.State[StateStart] = strconv.FormatInt(time.Now().Add(time.Hour).UnixNano(), 10)
	if _, err := runResponse(p, c); err != nil {
		t.Fatal(err)
	}
	// A response phase without a response: the record has no status.
	c.Response = nil
	if _, err := runResponse(p, c); err != nil {
		t.Fatal(err)
	}
	f.Close()
	recs := parseRecords(t, out.String())
	if len(recs) != 3 {
		t.Fatalf("%d records, want 3", len(recs))
	}
	for i, r := range recs {
		if r.DurationMS != nil || r.RequestHeaders != nil || r.ResponseHeaders != nil || r.ResponseBody != nil || r.ResponseBodyOmitted != "" {
			t.Errorf("record %d = %+v, want no duration, headers or body", i, r)
		}
	}
	if recs[0].Status != 204 || recs[2].Status != 0 {
		t.Errorf("statuses = %d, %d", recs[0].Status, recs[2].Status)
	}
	if strings.Contains(out.String(), "SECRET") {
		t.Error("unlogged header leaked")
	}
}

func TestResponseBody(t *testing.T) {
	out := captureStdout(t)
	f := newFactory(t, `{}`)
	p := mustBuild(t, f, map[string]string{"log_response_body": "true", "log_headers": "false", "max_body_log_bytes": "16"})
	type want struct {
		body      string
		has       bool
		truncated bool
		omitted   string
	}
	cases := []struct {
		headers map[string]string
		body    string
		want    want
	}{
		{map[string]string{"content-type": "application/json"}, `{"a":1}`, want{body: `{"a":1}`, has: true}},
		{map[string]string{"content-type": "application/vnd.x+json; charset=utf-8"}, `{"token":"abcdefghijklmnopqrstuvwxyz"}`, want{body: `{"token":"[REDAC`, has: true, truncated: true}},
		// Cut at 15 bytes, not 16, which would split "é" (2 bytes at offset 15).
		{map[string]string{"content-type": "application/json"}, `{"a":"012345678é"}`, want{body: `{"a":"012345678`, has: true, truncated: true}},
		{map[string]string{"content-type": "application/x-www-form-urlencoded"}, `user=a&password=SECRETFORM`, want{body: `user=a&password=`, has: true, truncated: true}},
		{map[string]string{"content-type": "application/x-www-form-urlencoded"}, `pw=1&token=x`, want{body: `pw=1&token=[REDA`, has: true, truncated: true}},
		{map[string]string{"content-type": "application/json"}, `{"password":`, want{omitted: "invalid_json"}},
		{map[string]string{"content-type": "application/json"}, strings.Repeat("[", 300) + strings.Repeat("]", 300), want{omitted: "too_deep"}},
		{map[string]string{"content-type": "text/plain"}, `token=SECRETTEXT`, want{omitted: "content_type"}},
		{map[string]string{}, `token=SECRETTEXT`, want{omitted: "content_type"}},
		{map[string]string{"content-type": "application/json", "content-encoding": "gzip"}, "\x1f\x8b...", want{omitted: "encoded"}},
		{map[string]string{"content-type": "application/json", "content-length": "120"}, ``, want{omitted: "not_buffered"}},
		{map[string]string{"content-type": "application/json", "content-length": "0"}, ``, want{}},
		{map[string]string{"content-type": "application/json"}, ``, want{}},
	}
	for _, tc := range cases {
		c := &policy.Context{Phase: agentv1.PolicyPhase_RESPONSE, Response: &policy.ResponseContext{Status: 200, Headers: tc.headers, Body: []byte(tc.body)}}
		if _, err := runResponse(p, c); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	text := out.String()
	if strings.Contains(text, "SECRET") {
		t.Fatalf("secret in output:\n%s", text)
	}
	recs := parseRecords(t, text)
	if len(recs) != len(cases) {
		t.Fatalf("%d records, want %d", len(recs), len(cases))
	}
	for i, tc := range cases {
		r := recs[i]
		got := want{has: r.ResponseBody != nil, truncated: r.ResponseBodyTruncated, omitted: r.ResponseBodyOmitted}
		if r.ResponseBody != nil {
			got.body = *r.ResponseBody
		}
		if got != tc.want {
			t.Errorf("case %d (%q): got %+v, want %+v", i, tc.body, got, tc.want)
		}
		if r.ResponseBodyBytes != len(tc.body) {
			t.Errorf("case %d: response_body_bytes = %d, want %d", i, r.ResponseBodyBytes, len(tc.body))
		}
	}
}

func TestConfigErrors(t *testing.T) {
	dir := t.TempDir()
	f := func(raw, want string) {
		t.Helper()
		_, err := New(policy.Config{Raw: json.RawMessage(raw)})
		if err == nil || err.Error() != want {
			t.Fatalf("New(%s): err = %v, want %q", raw, err, want)
		}
	}
	f(`{"sink":"syslog"}`, `sink: want stdout or file, got "syslog"`)
	f(`{"sink":"file"}`, `path: required with sink file`)
	f(`{"path":"audit.log"}`, `path: only the file sink has a path, got "audit.log" with sink stdout`)
	missing := filepath.Join(dir, "no", "audit.log")
	f(`{"sink":"file","path":"`+missing+`"}`, `path "`+missing+`": directory "`+filepath.Dir(missing)+`" does not exist`)
	f(`{"max_size_mb":0}`, `max_size_mb: must be at least 1, got 0`)
	f(`{"max_backups":-1}`, `max_backups: must not be negative, got -1`)
	f(`{"queue_size":0}`, `queue_size: must be between 1 and 1048576, got 0`)
	f(`{"queue_size":1048577}`, `queue_size: must be between 1 and 1048576, got 1048577`)
	f(`{"redact_headers":["ok","bad header"]}`, `redact_headers[1]: invalid header name "bad header"`)
	f(`{"redact_headers":[":path"]}`, `redact_headers[0]: invalid header name ":path"`)
	f(`{"redact_keys":[""]}`, `redact_keys[0]: empty key`)
	f(`{"on_sink_error":"ignore"}`, `on_sink_error: want deny or continue, got "ignore"`)
	f(`{"headers":{"mode":"deny"}}`, `headers.mode: want redact or allow, got "deny"`)
	f(`{"headers":{"mode":"allow"}}`, `headers.names: mode allow needs at least one header name`)
	f(`{"headers":{"names":["a"]}}`, `headers.names: only mode allow takes names`)
	f(`{"headers":{"mode":"allow","names":["ok","bad name"]}}`, `headers.names[1]: invalid header name "bad name"`)
	f(`{"sinks":"file"}`, `invalid JSON: json: unknown field "sinks"`)
	f(`{"sink":"file","max_size_mb":0,"queue_size":0}`, "path: required with sink file\nmax_size_mb: must be at least 1, got 0\nqueue_size: must be between 1 and 1048576, got 0")

	// No config at all is the stdout sink with defaults; it opens nothing until a record.
	fac, err := New(policy.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if fac.(*Factory).sink.started.Load() {
		t.Fatal("New started the sink")
	}
	if err := fac.(*Factory).Close(); err != nil {
		t.Fatal(err)
	}
	// A file sink that is never written creates no file.
	path := filepath.Join(dir, "audit.log")
	fac, err = New(policy.Config{Raw: json.RawMessage(`{"sink":"file","path":"` + path + `"}`)})
	if err != nil {
		t.Fatal(err)
	}
	fac.(*Factory).Close()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("stat %s: %v, want not exist", path, err)
	}
}

func TestBuildErrors(t *testing.T) {
	f := newFactory(t, `{}`)
	for md, want := range map[string]string{
		`{"max_body_log_bytes":"0"}`:       "max_body_log_bytes: must be between 1 and 1048576, got 0",
		`{"max_body_log_bytes":"1048577"}`: "max_body_log_bytes: must be between 1 and 1048576, got 1048577",
		`{"log_response_body":"yes"}`:      `metadata key "log_response_body": want true or false, got "yes"`,
		`{"sink":"file"}`:                  `metadata key "sink": unknown key`,
	} {
		var m map[string]string
		if err := json.Unmarshal([]byte(md), &m); err != nil {
			t.Fatal(err)
		}
		if _, err := f.Build(m); err == nil || err.Error() != want {
			t.Errorf("Build(%s): err = %v, want %q", md, err, want)
		}
	}
}

func TestModuleRegistered(t *testing.T) {
	m, ok := policy.Lookup(Name)
	if !ok {
		t.Fatal("not registered")
	}
	if m.Phases != policy.Both || m.ResponseBody || m.RequestBody {
		t.Fatalf("module = %+v", m)
	}
	var schema map[string]any
	if err := json.Unmarshal([]byte(m.MetadataSchema), &schema); err != nil {
		t.Fatalf("schema: %v", err)
	}
}

// TestDenialRecorded: a request the request chain denies or fails gets one record, written when
// the chain ends, naming the policy that decided; an allowed request phase writes nothing.
func TestDenialRecorded(t *testing.T) {
	out := captureStdout(t)
	f := newFactory(t, `{"sink":"stdout"}`)
	var obs policy.ChainObserver = mustBuild(t, f, nil)
	c := &policy.Context{Phase: agentv1.PolicyPhase_REQUEST, RequestID: "r-deny", RouteName: "users", Method: "GET", Path: "/x", Headers: map[string]string{"authorization": "Bearer SECRET-TOKEN"}}
	obs.ObserveChain(c, policy.Outcome{Status: agentv1.StatusCode_OK})
	obs.ObserveChain(c, policy.Outcome{Status: agentv1.StatusCode_POLICY_DENIED, DecidedBy: "jwtValidation", HTTPStatus: 401})
	c.RequestID = "r-err"
	obs.ObserveChain(c, policy.Outcome{Status: agentv1.StatusCode_POLICY_ERROR, DecidedBy: "rateLimit", HTTPStatus: 0})
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	text := out.String()
	if strings.Contains(text, "SECRET-TOKEN") {
		t.Fatalf("token in the audit log: %s", text)
	}
	recs := parseRecords(t, text)
	if len(recs) != 2 {
		t.Fatalf("%d records, want 2:\n%s", len(recs), text)
	}
	if r := recs[0]; r.RequestID != "r-deny" || r.Decision != "denied" || r.DecidedBy != "jwtValidation" || r.Status != 401 || r.Phase != "request" {
		t.Fatalf("denial record %+v", r)
	}
	if r := recs[1]; r.RequestID != "r-err" || r.Decision != "error" || r.DecidedBy != "rateLimit" || r.Status != 0 {
		t.Fatalf("error record %+v", r)
	}
}
