package testenv

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/policy-engine/policy-engine/internal/logging"
)

// LogLine is one line of a process's JSON log, as far as tests look into it.
type LogLine struct {
	Level    string         `json:"level"`
	Message  string         `json:"message"`
	Metadata map[string]any `json:"metadata"`
	// Text is the line as written.
	Text string `json:"-"`
}

// Audit reports whether the line is an audit line, written whatever the log level.
func (l LogLine) Audit() bool { return l.Metadata[logging.AuditField] == true }

// LogLines parses a JSON log, one object a line; a line that is not one fails the test.
func LogLines(t testing.TB, logs string) []LogLine {
	t.Helper()
	var out []LogLine
	for _, text := range strings.Split(strings.TrimSpace(logs), "\n") {
		if text == "" {
			continue
		}
		l := LogLine{Text: text}
		if err := json.Unmarshal([]byte(text), &l); err != nil {
			t.Fatalf("log line %q is not a JSON object: %v", text, err)
		}
		out = append(out, l)
	}
	return out
}

// CheckAuditLog checks the log of a process at log level error: every line below error is an
// audit line, and for each message of want the last line with it is an audit line at the level
// want gives. It returns those last lines, by message.
func CheckAuditLog(t testing.TB, logs string, want map[string]string) map[string]LogLine {
	t.Helper()
	last := map[string]LogLine{}
	for _, l := range LogLines(t, logs) {
		if l.Level != "error" && !l.Audit() {
			t.Errorf("a line below error that is not an audit line: %s", l.Text)
		}
		last[l.Message] = l
	}
	for msg, level := range want {
		if l, ok := last[msg]; !ok || l.Level != level || !l.Audit() {
			t.Errorf("%q: %q (found %v), want an audit line at %s", msg, l.Text, ok, level)
		}
	}
	return last
}
