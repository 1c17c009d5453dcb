package logging

import (
	"bytes"
	"encoding/json"
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
