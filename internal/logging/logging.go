// Package logging makes the structured JSON loggers of both processes (specification §7.2): one
// object per line with timestamp (ISO 8601), level, component, message, request_id where there
// is one, and every other field of the event inside a metadata object:
//
//	{"level":"warn","component":"kernel","request_id":"r1","metadata":{"route":"/api","error":"..."},"timestamp":"...","message":"policy failed"}
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
func (l *Logger) Event(level zerolog.Level) *Event {
	if !l.Enabled(level) {
		return nil
	}
	return &Event{top: l.base.WithLevel(level), md: zerolog.Dict()}
}

// AuditField is the metadata field, set to true, of the events that Audit makes.
const AuditField = "audit"

// Audit returns an event at level that is written whatever the logger's level: the lines that
// record what config is in force (loaded at start, reloaded, a reload skipped or failed), which
// the specification asks to keep whatever an operator sets log_level to. The event keeps its
// real level, one of the four the logs use, and carries "audit": true in its metadata so that
// these lines can be told and picked out from the others.
func (l *Logger) Audit(level zerolog.Level) *Event {
	if l == nil {
		return nil
	}
	e := &Event{top: l.base.WithLevel(level), md: zerolog.Dict()}
	e.meta().Bool(AuditField, true)
	return e
}

// Debug, Info, Warn and Error return events at their level; nil events discard everything.
func (l *Logger) Debug() *Event { return l.Event(zerolog.DebugLevel) }

// Info returns an info event.
func (l *Logger) Info() *Event { return l.Event(zerolog.InfoLevel) }

// Warn returns a warn event.
func (l *Logger) Warn() *Event { return l.Event(zerolog.WarnLevel) }

// Error returns an error event.
func (l *Logger) Error() *Event { return l.Event(zerolog.ErrorLevel) }

// RequestIDField is the one field an event writes at the top level besides the fixed ones.
const RequestIDField = "request_id"

// Event is a log line being built. request_id goes to the top level; every other field goes
// into the metadata object. Every method of a nil *Event does nothing, so an event of a level
// that is off costs nothing but the level check.
type Event struct {
	top   *zerolog.Event
	md    *zerolog.Event
	hasMD bool
}

func (e *Event) meta() *zerolog.Event {
	e.hasMD = true
	return e.md
}

// Str adds a string field; a non-empty request_id goes to the top level.
func (e *Event) Str(key, val string) *Event {
	if e == nil {
		return e
	}
	if key == RequestIDField {
		if val != "" {
			e.top.Str(key, val)
		}
		return e
	}
	e.meta().Str(key, val)
	return e
}

// Strs adds a list of strings.
func (e *Event) Strs(key string, vals []string) *Event {
	if e != nil {
		e.meta().Strs(key, vals)
	}
	return e
}

// Int adds an integer.
func (e *Event) Int(key string, v int) *Event {
	if e != nil {
		e.meta().Int(key, v)
	}
	return e
}

// Int64 adds an integer.
func (e *Event) Int64(key string, v int64) *Event {
	if e != nil {
		e.meta().Int64(key, v)
	}
	return e
}

// Uint64 adds an unsigned integer.
func (e *Event) Uint64(key string, v uint64) *Event {
	if e != nil {
		e.meta().Uint64(key, v)
	}
	return e
}

// Float64 adds a number.
func (e *Event) Float64(key string, v float64) *Event {
	if e != nil {
		e.meta().Float64(key, v)
	}
	return e
}

// Bool adds a boolean.
func (e *Event) Bool(key string, v bool) *Event {
	if e != nil {
		e.meta().Bool(key, v)
	}
	return e
}

// Dur adds a duration, in milliseconds.
func (e *Event) Dur(key string, d time.Duration) *Event {
	if e != nil {
		e.meta().Float64(key+"_ms", float64(d)/float64(time.Millisecond))
	}
	return e
}

// Err adds an error under "error"; a nil error adds nothing.
func (e *Event) Err(err error) *Event {
	if e != nil && err != nil {
		e.meta().Str("error", err.Error())
	}
	return e
}

// Errors adds err under key as a list of strings, one for each error that errors.Join
// combined: every problem of a config file on its own line of the list.
func (e *Event) Errors(key string, err error) *Event {
	if e == nil || err == nil {
		return e
	}
	list := Flatten(err)
	s := make([]string, len(list))
	for i, x := range list {
		s[i] = x.Error()
	}
	e.meta().Strs(key, s)
	return e
}

// Flatten returns the errors that errors.Join combined into err, depth first, or err alone.
func Flatten(err error) []error {
	if err == nil {
		return nil
	}
	j, ok := err.(interface{ Unwrap() []error })
	if !ok {
		return []error{err}
	}
	var out []error
	for _, x := range j.Unwrap() {
		out = append(out, Flatten(x)...)
	}
	return out
}

// Any adds a value encoded as JSON.
func (e *Event) Any(key string, v any) *Event {
	if e != nil {
		e.meta().Interface(key, v)
	}
	return e
}

// Msg writes the event with message msg.
func (e *Event) Msg(msg string) {
	if e == nil {
		return
	}
	if e.hasMD {
		e.top.Dict("metadata", e.md)
	}
	e.top.Msg(msg)
}

// Msgf writes the event with a formatted message.
func (e *Event) Msgf(format string, args ...any) {
	if e != nil {
		e.Msg(fmt.Sprintf(format, args...))
	}
}

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

// FatalField is the metadata field, set to true, of the line Fatal writes.
const FatalField = "fatal"

// Fatal writes the error that ends a process (an invalid config at start-up, a listener that
// fails) as one JSON line at level error, like every other line of the process, with every
// error that errors.Join combined as one entry of "errors" and "fatal": true, so that a log
// pipeline that reads JSON lines sees why the process stopped.
func Fatal(w io.Writer, component, program string, err error) {
	l := New(w, component, zerolog.ErrorLevel)
	e := l.Error().Errors("errors", err)
	e.meta().Bool(FatalField, true)
	e.Msg(program + " exits on an error")
}

// Problems writes err for a person, as --validate reports: one problem a line, each line
// starting with prog, so that every line of a report of several problems says who wrote it.
func Problems(w io.Writer, prog string, err error) {
	for _, line := range strings.Split(strings.TrimRight(err.Error(), "\n"), "\n") {
		fmt.Fprintf(w, "%s: %s\n", prog, line)
	}
}
