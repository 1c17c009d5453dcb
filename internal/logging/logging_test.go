package logging

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

func TestParseLevel(t *testing.T) {
	for in, want := range map[string]zerolog.Level{"": zerolog.InfoLevel, "info": zerolog.InfoLevel, "DEBUG": zerolog.DebugLevel, "warn": zerolog.WarnLevel, "warning": zerolog.WarnLevel, "error": zerolog.ErrorLevel} {
		if got, err := ParseLevel(in); err != nil || got != want {
			t.Errorf("ParseLevel(%q) = %v, %v", in, got, err)
		}
	}
	if _, err := ParseLevel("verbose"); err == nil || !strings.Contains(err.Error(), `unknown log level "verbose"`) {
		t.Fatal(err)
	}
}

func TestFieldsAndLevels(t *testing.T) {
	var buf bytes.Buffer
	l := New(&buf, "kernel", zerolog.InfoLevel)
	if l.Debug() != nil || l.Enabled(zerolog.DebugLevel) {
		t.Fatal("debug must be off at info")
	}
	l.Debug().Msg("hidden") // a nil event is a no-op
	l.Info().Str("request_id", "r1").Msg("hello")
	l.Warn().Msg("w")
	l.Error().Msg("e")
	l.SetLevel(zerolog.ErrorLevel)
	if l.Level() != zerolog.ErrorLevel || l.Info() != nil {
		t.Fatal("SetLevel did not take")
	}
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("lines: %q", lines)
	}
	var rec map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &rec); err != nil {
		t.Fatal(err)
	}
	if rec["level"] != "info" || rec["component"] != "kernel" || rec["message"] != "hello" || rec["request_id"] != "r1" {
		t.Fatalf("%v", rec)
	}
	if _, err := time.Parse(time.RFC3339Nano, rec["timestamp"].(string)); err != nil {
		t.Fatalf("timestamp %v: %v", rec["timestamp"], err)
	}
}

// TestAudit writes audit events at every configured level: each keeps its own level, carries
// the audit marker in its metadata next to its fields, and is never filtered out.
func TestAudit(t *testing.T) {
	for _, configured := range []zerolog.Level{zerolog.DebugLevel, zerolog.InfoLevel, zerolog.WarnLevel, zerolog.ErrorLevel} {
		var buf bytes.Buffer
		l := New(&buf, "agent", configured)
		l.Audit(zerolog.InfoLevel).Str("config_version", "v2-abc").Msg("config reloaded")
		l.Audit(zerolog.WarnLevel).Msg("restart only")
		lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
		if len(lines) != 2 {
			t.Fatalf("at %v: %d lines: %q", configured, len(lines), lines)
		}
		for i, want := range []string{"info", "warn"} {
			var rec struct {
				Level    string         `json:"level"`
				Message  string         `json:"message"`
				Metadata map[string]any `json:"metadata"`
			}
			if err := json.Unmarshal([]byte(lines[i]), &rec); err != nil {
				t.Fatal(err)
			}
			if rec.Level != want || rec.Metadata[AuditField] != true {
				t.Errorf("at %v: line %d is %s", configured, i, lines[i])
			}
		}
		if !strings.Contains(lines[0], `"metadata":{"audit":true,"config_version":"v2-abc"}`) {
			t.Errorf("fields: %s", lines[0])
		}
	}
	var nilLogger *Logger
	if nilLogger.Audit(zerolog.ErrorLevel) != nil {
		t.Fatal("a nil logger must discard audit events too")
	}
}

func TestThrottle(t *testing.T) {
	th := NewThrottle(50 * time.Millisecond)
	if !th.Allow() {
		t.Fatal("first event must pass")
	}
	if th.Allow() {
		t.Fatal("second event within the interval must not")
	}
	time.Sleep(60 * time.Millisecond)
	if !th.Allow() {
		t.Fatal("an event after the interval must pass")
	}
}

func TestNilLoggerDiscards(t *testing.T) {
	var l *Logger
	if l.Error() != nil || l.Enabled(zerolog.ErrorLevel) {
		t.Fatal("a nil logger must discard")
	}
	l.Error().Str("k", "v").Msg("nothing")
}

func decodeLine(t *testing.T, b *bytes.Buffer) map[string]any {
	t.Helper()
	line := strings.TrimSpace(b.String())
	if strings.Count(line, "\n") != 0 {
		t.Fatalf("want one line, got %q", line)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(line), &m); err != nil {
		t.Fatalf("log line %q is not JSON: %v", line, err)
	}
	b.Reset()
	return m
}

func TestEventFields(t *testing.T) {
	var buf bytes.Buffer
	l := New(&buf, "kernel", zerolog.DebugLevel)
	l.Warn().Str("request_id", "req-1").Str("route", "/api").Strs("dropped", []string{"host"}).
		Int("n", 3).Int64("n64", 4).Uint64("u", 5).Float64("f", 1.5).Bool("ok", true).
		Dur("took", 1500*time.Microsecond).Err(errors.New("boom")).Any("obj", map[string]int{"a": 1}).
		Msg("policy failed")
	m := decodeLine(t, &buf)
	for k, want := range map[string]any{"level": "warn", "component": "kernel", "request_id": "req-1", "message": "policy failed"} {
		if m[k] != want {
			t.Errorf("%s = %v, want %v", k, m[k], want)
		}
	}
	ts, ok := m["timestamp"].(string)
	if !ok {
		t.Fatalf("timestamp missing: %v", m)
	}
	if _, err := time.Parse(time.RFC3339Nano, ts); err != nil {
		t.Errorf("timestamp %q is not ISO 8601: %v", ts, err)
	}
	md, ok := m["metadata"].(map[string]any)
	if !ok {
		t.Fatalf("metadata missing: %v", m)
	}
	want := map[string]any{
		"route": "/api", "dropped": []any{"host"}, "n": 3.0, "n64": 4.0, "u": 5.0, "f": 1.5, "ok": true,
		"took_ms": 1.5, "error": "boom", "obj": map[string]any{"a": 1.0},
	}
	if fmt.Sprint(md) != fmt.Sprint(want) {
		t.Errorf("metadata = %v, want %v", md, want)
	}
	if _, top := m["route"]; top {
		t.Error("a context field is at the top level")
	}
}

func TestEventWithoutMetadata(t *testing.T) {
	var buf bytes.Buffer
	l := New(&buf, "agent", zerolog.InfoLevel)
	l.Info().Str("request_id", "").Err(nil).Msgf("serving %d policies", 3)
	m := decodeLine(t, &buf)
	if _, ok := m["metadata"]; ok {
		t.Errorf("metadata written without fields: %v", m)
	}
	if _, ok := m["request_id"]; ok {
		t.Errorf("empty request_id written: %v", m)
	}
	if m["message"] != "serving 3 policies" {
		t.Errorf("message = %v", m["message"])
	}
}

func TestLevels(t *testing.T) {
	var buf bytes.Buffer
	l := New(&buf, "kernel", zerolog.WarnLevel)
	if l.Info() != nil || l.Debug() != nil {
		t.Fatal("events below the level are not nil")
	}
	// A nil event discards every call.
	var e *Event
	e.Str("a", "b").Str("request_id", "x").Strs("s", nil).Int("i", 1).Int64("i", 1).Uint64("u", 1).Float64("f", 1).
		Bool("b", true).Dur("d", time.Second).Err(errors.New("x")).Errors("errors", errors.New("x")).Any("a", 1).Msg("dropped")
	e.Msgf("%d", 1)
	l.Info().Msg("dropped")
	if buf.Len() != 0 {
		t.Fatalf("disabled events wrote %q", buf.String())
	}
	l.SetLevel(zerolog.DebugLevel)
	if l.Level() != zerolog.DebugLevel || !l.Enabled(zerolog.DebugLevel) {
		t.Fatal("SetLevel did not take")
	}
	l.Debug().Msg("now written")
	if m := decodeLine(t, &buf); m["level"] != "debug" {
		t.Fatalf("level = %v", m["level"])
	}
	l.Error().Msg("error")
	if m := decodeLine(t, &buf); m["level"] != "error" {
		t.Fatalf("level = %v", m["level"])
	}
}

func TestErrorsFlattened(t *testing.T) {
	var buf bytes.Buffer
	l := New(&buf, "kernel", zerolog.InfoLevel)
	err := errors.Join(errors.New("f:1: a: bad"), errors.Join(errors.New("f:2: b: bad"), errors.New("f:3: c: bad")))
	l.Error().Errors("errors", err).Errors("none", nil).Msg("config reload failed")
	m := decodeLine(t, &buf)
	got := m["metadata"].(map[string]any)["errors"]
	if fmt.Sprint(got) != "[f:1: a: bad f:2: b: bad f:3: c: bad]" {
		t.Fatalf("errors = %v", got)
	}
	if Flatten(nil) != nil {
		t.Fatal("Flatten(nil) is not nil")
	}
	if one := errors.New("x"); len(Flatten(one)) != 1 || Flatten(one)[0] != one {
		t.Fatal("Flatten of a plain error")
	}
}

// TestFatal: the error that ends a process is one JSON line at error, with fatal: true and
// every joined error on its own entry.
func TestFatal(t *testing.T) {
	var buf bytes.Buffer
	Fatal(&buf, "kernel", "policy-kernel", errors.Join(errors.New(`a.yaml:1: x: got "y"`), errors.New("b")))
	var line struct {
		Level     string `json:"level"`
		Component string `json:"component"`
		Message   string `json:"message"`
		Metadata  struct {
			Errors []string `json:"errors"`
			Fatal  bool     `json:"fatal"`
		} `json:"metadata"`
	}
	if strings.Count(buf.String(), "\n") != 1 {
		t.Fatalf("want one line: %q", buf.String())
	}
	if err := json.Unmarshal(buf.Bytes(), &line); err != nil {
		t.Fatal(err)
	}
	if line.Level != "error" || line.Component != "kernel" || !line.Metadata.Fatal || len(line.Metadata.Errors) != 2 || line.Metadata.Errors[0] != `a.yaml:1: x: got "y"` || !strings.Contains(line.Message, "policy-kernel") {
		t.Fatalf("%+v", line)
	}
}

func TestProblems(t *testing.T) {
	var b strings.Builder
	Problems(&b, "policy-agent", errors.New("a.yaml:3: x: bad\na.yaml:5: y: worse\n"))
	if got, want := b.String(), "policy-agent: a.yaml:3: x: bad\npolicy-agent: a.yaml:5: y: worse\n"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}
