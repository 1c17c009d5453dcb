// Package auditlog is the auditLog policy: it writes one JSON record per HTTP exchange, with
// the route, request, response status, user, duration and, when asked, the response body, to
// stdout or to a size-rotated file, with every credential redacted.
//
// In the request phase the policy only records the time in state (audit.start); in the response
// phase it writes the record. A request that a request policy denies never reaches the response
// phase, so it has no record: denials are counted by the kernel and the agent metrics.
//
// Records go through a bounded queue to one background writer, so a request never waits for
// the disk; when the queue is full the record is dropped and counted. Once a write has failed
// (a full disk), the policy refuses the exchanges it sees with 503 until a write succeeds again
// (on_sink_error: deny, the default), or lets them through unrecorded (continue); both are
// counted. The writer is shared by
// every factory made from the same sink settings (through policy.Config.Shared), so a config
// reload neither reopens the file nor runs two writers on it; the last factory's Close flushes
// and closes it.
package auditlog

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/headers"
	"github.com/policy-engine/policy-engine/policies/bodytransform/jsonedit"
)

// Name is the policy's name in chains.
const Name = "auditLog"

// StateStart is the state key under which the request phase records its start time, in Unix
// nanoseconds.
const StateStart = "audit.start"

// Defaults of the agent config and the metadata.
const (
	DefaultMaxSizeMB       = 100
	DefaultMaxBackups      = 5
	DefaultQueueSize       = 4096
	DefaultMaxBodyLogBytes = 4096
	maxQueueSize           = 1 << 20
	maxBodyLogBytesLimit   = 1 << 20
)

const schema = `{"$schema":"https://json-schema.org/draft/2020-12/schema","type":"object","additionalProperties":false,"properties":{` +
	`"log_headers":{"type":"boolean","default":true,"description":"include request and response headers, credentials redacted"},` +
	`"log_response_body":{"type":"boolean","default":false,"description":"include the response body, credentials redacted, when the kernel sent one: the route's response chain must hold a policy that reads the body"},` +
	`"max_body_log_bytes":{"type":"integer","minimum":1,"maximum":1048576,"default":4096,"description":"longer bodies are cut, after redaction"}}}`

// Config is agent_core.policies.config.auditLog.
type Config struct {
	// Sink is "stdout" (the default) or "file".
	Sink string `json:"sink"`
	// Path is the file of the file sink.
	Path       string `json:"path"`
	MaxSizeMB  int    `json:"max_size_mb"`
	MaxBackups *int   `json:"max_backups"`
	QueueSize  int    `json:"queue_size"`
	// RedactHeaders and RedactKeys add to DefaultRedactHeaders and DefaultRedactKeys.
	RedactHeaders []string `json:"redact_headers"`
	RedactKeys    []string `json:"redact_keys"`
	// Headers chooses which headers a record holds: all, credentials redacted (mode redact,
	// the default), or only the named ones (mode allow), credentials still redacted.
	Headers *HeadersConfig `json:"headers"`
	// OnSinkError is what happens to an exchange while the sink fails: "deny" (the default)
	// answers 503, "continue" lets it through without a record.
	OnSinkError string `json:"on_sink_error"`
}

// HeadersConfig is Config.Headers.
type HeadersConfig struct {
	Mode  string   `json:"mode"`
	Names []string `json:"names"`
}

// Values of HeadersConfig.Mode.
const (
	HeadersRedact = "redact"
	HeadersAllow  = "allow"
)

// Values of Config.OnSinkError.
const (
	SinkErrorDeny     = "deny"
	SinkErrorContinue = "continue"
)

// Settings are a chain entry's metadata.
type Settings struct {
	LogHeaders      *bool `json:"log_headers"`
	LogResponseBody bool  `json:"log_response_body"`
	MaxBodyLogBytes int   `json:"max_body_log_bytes"`
}

func init() {
	policy.Register(policy.Module{
		Name:        Name,
		Version:     "1.0.0",
		Description: "Writes one JSON audit record per request, credentials redacted.",
		Phases:      policy.Both,
		// Not true: a module's body needs are static, and asking for the body would make Envoy
		// buffer every response of every audited route. The body is logged when another
		// policy of the chain has the kernel send it.
		ResponseBody:   false,
		MetadataSchema: schema,
		New:            New,

		NotCacheable: "it records every exchange",
	})
}

// sinkKey identifies a writer; factories with equal keys share one.
type sinkKey struct {
	sink, path string // path is absolute
	maxSize    int64
	maxBackups int
	queueSize  int
}

// sharedSink is a writer with the number of factories that use it.
type sharedSink struct {
	s    *sink
	refs int
}

// sharedMu guards the reference counts of shared sinks.
var sharedMu sync.Mutex

// Factory is the policy's factory: the sink and the redaction rules. Close releases the sink.
type Factory struct {
	sink      *sink
	redactor  *redactor
	denyOnErr bool
	closeOnce sync.Once
	release   func() error
	closeErr  error
}

// New makes the factory from the policy's agent config section. It opens nothing: the sink
// starts with the first record.
func New(c policy.Config) (policy.Factory, error) {
	cfg := Config{Sink: "stdout", MaxSizeMB: DefaultMaxSizeMB, QueueSize: DefaultQueueSize, OnSinkError: SinkErrorDeny}
	if err := c.Decode(&cfg); err != nil {
		return nil, err
	}
	key, err := cfg.validate()
	if err != nil {
		return nil, err
	}
	f := &Factory{redactor: newRedactor(cfg.RedactHeaders, cfg.RedactKeys), denyOnErr: cfg.OnSinkError == SinkErrorDeny}
	if h := cfg.Headers; h != nil && h.Mode == HeadersAllow {
		f.redactor.allow = map[string]struct{}{}
		for _, n := range h.Names {
			f.redactor.allow[strings.ToLower(n)] = struct{}{}
		}
	}
	mk := func() *sink {
		if key.sink == "file" {
			return newSink(newRotatingFile(key.path, key.maxSize, key.maxBackups), key.queueSize, c.Log)
		}
		return newSink(stdoutWriter{bufio.NewWriterSize(stdout, 64<<10), stdout}, key.queueSize, c.Log)
	}
	if c.Shared == nil {
		f.sink = mk()
		f.release = f.sink.Close
		return f, nil
	}
	sharedMu.Lock()
	defer sharedMu.Unlock()
	v, _ := c.Shared.Load(key)
	ss, _ := v.(*sharedSink)
	if ss == nil {
		ss = &sharedSink{s: mk()}
		c.Shared.Store(key, ss)
	}
	ss.refs++
	f.sink = ss.s
	f.release = func() error {
		sharedMu.Lock()
		ss.refs--
		last := ss.refs == 0
		if last {
			c.Shared.CompareAndDelete(key, ss)
		}
		sharedMu.Unlock()
		if last {
			return ss.s.Close()
		}
		return nil
	}
	return f, nil
}

func (cfg *Config) validate() (sinkKey, error) {
	var errs []error
	key := sinkKey{sink: cfg.Sink, maxSize: int64(cfg.MaxSizeMB) << 20, queueSize: cfg.QueueSize, maxBackups: DefaultMaxBackups}
	if cfg.MaxBackups != nil {
		key.maxBackups = *cfg.MaxBackups
	}
	switch cfg.Sink {
	case "stdout":
		if cfg.Path != "" {
			errs = append(errs, fmt.Errorf("path: only the file sink has a path, got %q with sink stdout", cfg.Path))
		}
	case "file":
		if cfg.Path == "" {
			errs = append(errs, errors.New("path: required with sink file"))
		} else if abs, err := filepath.Abs(cfg.Path); err != nil {
			errs = append(errs, fmt.Errorf("path %q: %w", cfg.Path, err))
		} else if st, err := os.Stat(filepath.Dir(abs)); err != nil || !st.IsDir() {
			errs = append(errs, fmt.Errorf("path %q: directory %q does not exist", cfg.Path, filepath.Dir(abs)))
		} else {
			key.path = abs
		}
	default:
		errs = append(errs, fmt.Errorf("sink: want stdout or file, got %q", cfg.Sink))
	}
	if cfg.MaxSizeMB < 1 {
		errs = append(errs, fmt.Errorf("max_size_mb: must be at least 1, got %d", cfg.MaxSizeMB))
	}
	if key.maxBackups < 0 {
		errs = append(errs, fmt.Errorf("max_backups: must not be negative, got %d", key.maxBackups))
	}
	if cfg.QueueSize < 1 || cfg.QueueSize > maxQueueSize {
		errs = append(errs, fmt.Errorf("queue_size: must be between 1 and %d, got %d", maxQueueSize, cfg.QueueSize))
	}
	for i, h := range cfg.RedactHeaders {
		if err := headers.ValidName(strings.ToLower(h)); err != nil || strings.HasPrefix(h, ":") {
			errs = append(errs, fmt.Errorf("redact_headers[%d]: invalid header name %q", i, h))
		}
	}
	for i, k := range cfg.RedactKeys {
		if k == "" {
			errs = append(errs, fmt.Errorf("redact_keys[%d]: empty key", i))
		}
	}
	if h := cfg.Headers; h != nil {
		switch h.Mode {
		case HeadersRedact, "":
			if len(h.Names) > 0 {
				errs = append(errs, errors.New("headers.names: only mode allow takes names"))
			}
		case HeadersAllow:
			if len(h.Names) == 0 {
				errs = append(errs, errors.New("headers.names: mode allow needs at least one header name"))
			}
		default:
			errs = append(errs, fmt.Errorf("headers.mode: want redact or allow, got %q", h.Mode))
		}
		for i, n := range h.Names {
			if err := headers.ValidName(strings.ToLower(n)); err != nil {
				errs = append(errs, fmt.Errorf("headers.names[%d]: invalid header name %q", i, n))
			}
		}
	}
	if cfg.OnSinkError != SinkErrorDeny && cfg.OnSinkError != SinkErrorContinue {
		errs = append(errs, fmt.Errorf("on_sink_error: want deny or continue, got %q", cfg.OnSinkError))
	}
	return key, errors.Join(errs...)
}

// Close flushes the queued records and closes the sink when no other factory shares it. It
// is safe to call more than once.
func (f *Factory) Close() error {
	f.closeOnce.Do(func() { f.closeErr = f.release() })
	return f.closeErr
}

// HealthCheck reports the sink's latest write error, such as a full disk, until a write
// succeeds again.
func (f *Factory) HealthCheck(context.Context) error {
	if err := f.sink.err(); err != nil {
		return fmt.Errorf("audit log sink: %w", err)
	}
	return nil
}

// Build compiles a chain entry's metadata.
func (f *Factory) Build(md map[string]string) (policy.Policy, error) {
	s := Settings{MaxBodyLogBytes: DefaultMaxBodyLogBytes}
	if err := policy.DecodeMetadata(md, &s); err != nil {
		return nil, err
	}
	if s.MaxBodyLogBytes < 1 || s.MaxBodyLogBytes > maxBodyLogBytesLimit {
		return nil, fmt.Errorf("max_body_log_bytes: must be between 1 and %d, got %d", maxBodyLogBytesLimit, s.MaxBodyLogBytes)
	}
	return &AuditLog{
		sink:      f.sink,
		redactor:  f.redactor,
		headers:   s.LogHeaders == nil || *s.LogHeaders,
		body:      s.LogResponseBody,
		maxBody:   s.MaxBodyLogBytes,
		denyOnErr: f.denyOnErr,
	}, nil
}

// AuditLog is a compiled chain entry.
type AuditLog struct {
	sink      *sink
	redactor  *redactor
	headers   bool
	body      bool
	maxBody   int
	denyOnErr bool
}

// sinkUnavailable answers an exchange that cannot be recorded under on_sink_error: deny; its
// instructions are shared read-only.
var sinkUnavailable = policy.Deny(503, "audit_log_unavailable", "the audit log cannot be written", nil)

// Record is one line of the audit log.
type Record struct {
	Time      string `json:"time"`
	RequestID string `json:"request_id,omitempty"`
	Route     string `json:"route"`
	Method    string `json:"method"`
	// Path is the request path with the values of sensitive query parameters redacted.
	Path      string `json:"path"`
	Authority string `json:"authority,omitempty"`
	ClientIP  string `json:"client_ip,omitempty"`
	Status    int    `json:"status"`
	// Decision is "allowed", "denied" or "error": how the chain that wrote the record ended.
	Decision string `json:"decision"`
	// DecidedBy is the policy that denied the request or failed.
	DecidedBy  string   `json:"decided_by,omitempty"`
	Phase      string   `json:"phase"`
	UserID     string   `json:"user_id,omitempty"`
	AuthMethod string   `json:"auth_method,omitempty"`
	DurationMS *float64 `json:"duration_ms,omitempty"`
	// Shadow lists what the chain's entries in shadow mode would have refused; nothing they
	// decide is enforced, so Decision does not include them.
	Shadow []ShadowRecord `json:"shadow,omitempty"`

	RequestHeaders  map[string]string `json:"request_headers,omitempty"`
	ResponseHeaders map[string]string `json:"response_headers,omitempty"`

	ResponseBody          *string `json:"response_body,omitempty"`
	ResponseBodyBytes     int     `json:"response_body_bytes,omitempty"`
	ResponseBodyTruncated bool    `json:"response_body_truncated,omitempty"`
	// ResponseBodyOmitted says why a body asked for is not in the record.
	ResponseBodyOmitted string `json:"response_body_omitted,omitempty"`
}

// ShadowRecord is what one chain entry in shadow mode would have done: decision "deny" with
// the status it would have answered, or "error" (a failure).
type ShadowRecord struct {
	Policy   string `json:"policy"`
	Decision string `json:"decision"`
	Status   int    `json:"status,omitempty"`
	Reason   string `json:"reason,omitempty"`
}

// Execute records the start time in the request phase. The record itself is written when the
// chain ends (ObserveChain), so that it holds the chain's outcome. While the sink fails, it
// refuses the exchange (on_sink_error: deny) or counts it once (continue), in either phase: one
// atomic load per call when the sink is healthy.
func (p *AuditLog) Execute(_ context.Context, c *policy.Context) (policy.Result, error) {
	if p.sink.failing.Load() {
		if p.denyOnErr {
			sinkFailingDeny.Inc()
			return sinkUnavailable, nil
		}
		if c.Phase != agentv1.PolicyPhase_RESPONSE || c.State[StateStart] == "" {
			sinkFailingContinue.Inc() // once per exchange: the request phase counted it
		}
	}
	if c.Phase == agentv1.PolicyPhase_RESPONSE || c.State[StateStart] != "" {
		return policy.Result{}, nil
	}
	return policy.Allow(policy.SetState(StateStart, strconv.FormatInt(time.Now().UnixNano(), 10))), nil
}

// ObserveChain writes one record per exchange: when the request chain denies or fails (there
// will be no response phase), or when the response chain ends. A request chain that allows
// while one of its shadow entries would have refused writes a record too (decision "allowed"
// with the shadow list), since the response chain does not learn of it.
func (p *AuditLog) ObserveChain(c *policy.Context, o policy.Outcome) {
	if c.Phase != agentv1.PolicyPhase_RESPONSE && o.Status == agentv1.StatusCode_OK && len(o.Shadow) == 0 {
		return
	}
	r := p.record(c, time.Now())
	switch o.Status {
	case agentv1.StatusCode_OK:
		r.Decision = "allowed"
	case agentv1.StatusCode_POLICY_DENIED:
		r.Decision = "denied"
	default:
		r.Decision = "error"
	}
	r.DecidedBy = o.DecidedBy
	for _, sd := range o.Shadow {
		r.Shadow = append(r.Shadow, ShadowRecord{Policy: sd.Policy, Decision: sd.Decision, Status: sd.HTTPStatus, Reason: sd.Message})
	}
	if o.HTTPStatus != 0 {
		r.Status = o.HTTPStatus
	}
	b, err := json.Marshal(r)
	if err != nil {
		return // a Record has no field that can fail to encode
	}
	p.sink.enqueue(append(b, '\n'))
}

func (p *AuditLog) record(c *policy.Context, now time.Time) *Record {
	r := &Record{
		Time:       now.UTC().Format(time.RFC3339Nano),
		RequestID:  c.RequestID,
		Route:      c.RouteName,
		Method:     c.Method,
		Path:       p.redactor.Path(c.Path, c.Credentials),
		Authority:  c.Authority,
		ClientIP:   c.ClientIP,
		Phase:      strings.ToLower(c.Phase.String()),
		UserID:     c.State["user_id"],
		AuthMethod: c.State["auth_method"],
	}
	if ns, err := strconv.ParseInt(c.State[StateStart], 10, 64); err == nil {
		if d := now.Sub(time.Unix(0, ns)); d >= 0 {
			ms := float64(d.Microseconds()) / 1000
			r.DurationMS = &ms
		}
	}
	if p.headers {
		r.RequestHeaders = p.redactor.Headers(c.Headers, c.Credentials)
	}
	if resp := c.Response; resp != nil {
		r.Status = resp.Status
		if p.headers {
			r.ResponseHeaders = p.redactor.Headers(resp.Headers, c.Credentials)
		}
		if p.body {
			p.addBody(r, resp, c.Credentials)
		}
	}
	return r
}

// addBody puts the response body into the record, redacted then cut to maxBody. Only bodies
// that can be redacted are logged: JSON and form bodies.
func (p *AuditLog) addBody(r *Record, resp *policy.ResponseContext, creds *policy.CredentialSet) {
	r.ResponseBodyBytes = len(resp.Body)
	if len(resp.Body) == 0 {
		if n, err := strconv.Atoi(resp.Headers["content-length"]); err == nil && n > 0 {
			r.ResponseBodyOmitted = "not_buffered"
		}
		return
	}
	if enc := strings.TrimSpace(resp.Headers["content-encoding"]); enc != "" && !strings.EqualFold(enc, "identity") {
		r.ResponseBodyOmitted = "encoded"
		return
	}
	var body string
	ct := resp.Headers["content-type"]
	mt, _, _ := strings.Cut(ct, ";")
	switch {
	case jsonedit.IsJSONContentType(ct):
		red, err := p.redactor.JSON(resp.Body)
		if err != nil {
			r.ResponseBodyOmitted = "invalid_json"
			if errors.Is(err, jsonedit.ErrTooDeep) {
				r.ResponseBodyOmitted = "too_deep"
			}
			return
		}
		body = string(red)
	case strings.EqualFold(strings.TrimSpace(mt), "application/x-www-form-urlencoded"):
		body = p.redactor.Query(string(resp.Body), creds)
	default:
		r.ResponseBodyOmitted = "content_type"
		return
	}
	if len(body) > p.maxBody {
		body = cutUTF8(body, p.maxBody)
		r.ResponseBodyTruncated = true
	}
	r.ResponseBody = &body
}

// cutUTF8 cuts s to at most n bytes without splitting a UTF-8 sequence.
func cutUTF8(s string, n int) string {
	for n > 0 && n < len(s) && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

var (
	_ policy.Factory       = (*Factory)(nil)
	_ policy.HealthChecker = (*Factory)(nil)
	_ policy.Policy        = (*AuditLog)(nil)
	_ policy.ChainObserver = (*AuditLog)(nil)
)
