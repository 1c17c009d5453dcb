package auditlog

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"

	"github.com/policy-engine/policy-engine/internal/logging"
)

var (
	recordsWritten = metrics.GetOrCreateCounter(`policy_agent_audit_log_records_total`)
	droppedFull    = metrics.GetOrCreateCounter(`policy_agent_audit_log_dropped_total{reason="queue_full"}`)
	droppedClosed  = metrics.GetOrCreateCounter(`policy_agent_audit_log_dropped_total{reason="closed"}`)
	writeErrors    = metrics.GetOrCreateCounter(`policy_agent_audit_log_write_errors_total`)

	sinkFailingDeny     = metrics.GetOrCreateCounter(`policy_agent_audit_log_sink_failing_requests_total{action="deny"}`)
	sinkFailingContinue = metrics.GetOrCreateCounter(`policy_agent_audit_log_sink_failing_requests_total{action="continue"}`)
)

// stdout is where the stdout sink writes; tests replace it.
var stdout io.Writer = os.Stdout

// logInterval is the least time between two log lines about the same sink problem.
const logInterval = 10 * time.Second

// defaultCloseTimeout bounds how long Close waits for the queue to drain into a writer that
// does not take writes (a stdout pipe nobody reads), so that a config reload cannot hang on it.
const defaultCloseTimeout = 5 * time.Second

// flushWriter is where a sink's records end up.
type flushWriter interface {
	io.Writer
	Flush() error
	Close() error
}

// stdoutWriter buffers writes to stdout (out); closing it flushes but leaves stdout open.
type stdoutWriter struct {
	*bufio.Writer
	out io.Writer
}

func (w stdoutWriter) Write(p []byte) (int, error) { return writeWhole(w.Writer, p) }

// Flush writes the buffer out; after a failure the buffer is dropped (its records are lost and
// counted), so that a later flush can succeed: bufio.Writer keeps its first error for good.
func (w stdoutWriter) Flush() error {
	err := w.Writer.Flush()
	if err != nil {
		w.Writer.Reset(w.out)
	}
	return err
}

func (w stdoutWriter) Close() error { return w.Flush() }

// writeWhole buffers one record so that the buffer is only ever written out at record
// boundaries: if the record does not fit in what is left, the buffer is flushed first (and a
// record larger than the buffer is written directly). Each write to the output then holds whole
// lines, so two writers on one output (the old and the new sink across a reload) cannot cut
// each other's records.
func writeWhole(bw *bufio.Writer, p []byte) (int, error) {
	if len(p) > bw.Available() && bw.Buffered() > 0 {
		if err := bw.Flush(); err != nil {
			return 0, err
		}
	}
	return bw.Write(p)
}

// sink writes records from a bounded queue on one background goroutine, so that a request
// never waits for the disk: a record that finds the queue full is dropped and counted. The
// goroutine starts with the first record, so a factory that never logs (such as one made only
// to validate a config) opens nothing.
type sink struct {
	w     flushWriter
	queue chan []byte

	// log reports write failures and drops, each at most once per logInterval.
	log         *logging.Logger
	errT, dropT *logging.Throttle

	// mu orders enqueues against Close: once closed is set under the write lock, no record
	// enters the queue, so the writer's final drain sees every record.
	mu     sync.RWMutex
	closed bool

	closeTimeout time.Duration

	start   sync.Once
	started atomic.Bool
	stop    chan struct{}
	done    chan struct{}

	errMu    sync.Mutex
	lastErr  error
	closeErr error
	// failing is lastErr != nil, read by every exchange without a lock.
	failing atomic.Bool
}

func newSink(w flushWriter, queueSize int, log *logging.Logger) *sink {
	return &sink{
		w:            w,
		queue:        make(chan []byte, queueSize),
		log:          log,
		errT:         logging.NewThrottle(logInterval),
		dropT:        logging.NewThrottle(logInterval),
		closeTimeout: defaultCloseTimeout,
		stop:         make(chan struct{}),
		done:         make(chan struct{}),
	}
}

// enqueue hands a record, one JSON line, to the writer without blocking.
func (s *sink) enqueue(rec []byte) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		droppedClosed.Inc()
		return
	}
	s.start.Do(func() {
		s.started.Store(true)
		go s.run()
	})
	select {
	case s.queue <- rec:
	default:
		droppedFull.Inc()
		if s.dropT.Allow() {
			s.log.Warn().Str("policy", Name).Int("queue_size", cap(s.queue)).Msg("audit log queue full; records dropped")
		}
	}
}

func (s *sink) run() {
	defer close(s.done)
	for {
		select {
		case rec := <-s.queue:
			err := s.write(rec)
			err = errors.Join(err, s.drain(), s.flush(s.w.Flush()))
			s.setErr(err)
		case <-s.stop:
			err := errors.Join(s.drain(), s.flush(s.w.Close()))
			if err != nil {
				s.setErr(err)
			}
			s.closeErr = err
			return
		}
	}
}

// drain writes what the queue holds now, without waiting for more. It returns the first error.
func (s *sink) drain() error {
	var first error
	for {
		select {
		case rec := <-s.queue:
			if err := s.write(rec); err != nil && first == nil {
				first = err
			}
		default:
			return first
		}
	}
}

// write writes one record; a failed record is counted and lost.
func (s *sink) write(rec []byte) error {
	if _, err := s.w.Write(rec); err != nil {
		writeErrors.Inc()
		return err
	}
	recordsWritten.Inc()
	return nil
}

// flush counts a failed flush or close, whose buffered records are lost.
func (s *sink) flush(err error) error {
	if err != nil {
		writeErrors.Inc()
	}
	return err
}

// setErr keeps the outcome of the latest batch for HealthCheck, until a later batch succeeds,
// and logs a failure.
func (s *sink) setErr(err error) {
	if err != nil && s.errT.Allow() {
		s.log.Error().Str("policy", Name).Str("error", err.Error()).Msg("audit log write failed; records lost")
	}
	s.errMu.Lock()
	s.lastErr = err
	s.failing.Store(err != nil)
	s.errMu.Unlock()
}

// err returns the error of the latest write, nil when it succeeded.
func (s *sink) err() error {
	s.errMu.Lock()
	defer s.errMu.Unlock()
	return s.lastErr
}

// Close stops taking records, writes those queued and closes the writer. It waits at most
// closeTimeout for a writer that does not take writes; the writer goroutine then exits when
// the writer returns.
func (s *sink) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	if !s.started.Load() {
		return nil
	}
	close(s.stop)
	select {
	case <-s.done:
		return s.closeErr
	case <-time.After(s.closeTimeout):
		return fmt.Errorf("close audit log: the sink took no writes for %v; %d queued records not written", s.closeTimeout, len(s.queue))
	}
}
