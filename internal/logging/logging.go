// Package logging makes the structured JSON loggers of both processes: one object per line
// with timestamp (ISO 8601), level, component, message and, where there is one, request_id.
package logging

import (
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
)

func init() {
	zerolog.TimestampFieldName = "timestamp"
	zerolog.TimeFieldFormat = time.RFC3339Nano
	zerolog.MessageFieldName = "message"
	zerolog.LevelFieldName = "level"
}

// ParseLevel parses debug, info, warn or error; empty means info.
func ParseLevel(s string) (zerolog.Level, error) {
	switch strings.ToLower(s) {
	case "", "info":
		return zerolog.InfoLevel, nil
	case "debug":
		return zerolog.DebugLevel, nil
	case "warn", "warning":
		return zerolog.WarnLevel, nil
	case "error":
		return zerolog.ErrorLevel, nil
	}
	return zerolog.InfoLevel, fmt.Errorf("unknown log level %q (want debug, info, warn or error)", s)
}

// Logger is a component's logger whose level can change at run time (on a config reload).
type Logger struct {
	base  zerolog.Logger
	level atomic.Int32
}

// New returns a logger that writes JSON lines to w.
func New(w io.Writer, component string, level zerolog.Level) *Logger {
	l := &Logger{base: zerolog.New(w).With().Timestamp().Str("component", component).Logger()}
	l.SetLevel(level)
	return l
}

// SetLevel changes the level.
func (l *Logger) SetLevel(level zerolog.Level) { l.level.Store(int32(level)) }

// Level returns the current level.
func (l *Logger) Level() zerolog.Level {
	if l == nil {
		return zerolog.Disabled
	}
	return zerolog.Level(l.level.Load())
}

// Enabled reports whether events at level are written; check it once before building a
// costly event on the hot path.
func (l *Logger) Enabled(level zerolog.Level) bool { return l != nil && level >= l.Level() }

// Event returns an event at level, or nil (a no-op event) when the level is off.
func (l *Logger) Event(level zerolog.Level) *zerolog.Event {
	if !l.Enabled(level) {
		return nil
	}
	return l.base.WithLevel(level)
}

// Debug, Info, Warn and Error return events at their level; nil events discard everything.
func (l *Logger) Debug() *zerolog.Event { return l.Event(zerolog.DebugLevel) }

// Info returns an info event.
func (l *Logger) Info() *zerolog.Event { return l.Event(zerolog.InfoLevel) }

// Warn returns a warn event.
func (l *Logger) Warn() *zerolog.Event { return l.Event(zerolog.WarnLevel) }

// Error returns an error event.
func (l *Logger) Error() *zerolog.Event { return l.Event(zerolog.ErrorLevel) }

// Throttle lets through at most one event per key and interval, so that a failure repeated on
// every request logs once in a while rather than once a request.
type Throttle struct {
	interval time.Duration
	last     atomic.Int64
}

// NewThrottle returns a throttle that allows one event per interval.
func NewThrottle(interval time.Duration) *Throttle { return &Throttle{interval: interval} }

// Allow reports whether an event may be logged now.
func (t *Throttle) Allow() bool {
	now := time.Now().UnixNano()
	last := t.last.Load()
	if now-last < int64(t.interval) {
		return false
	}
	return t.last.CompareAndSwap(last, now)
}
