package kernel

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/rawio"
)

// The ext_proc port's limits: a cap on connections open at once (limitListener) and an end
// to streams that receive nothing for too long (idleStreams). Whoever reaches the port could
// otherwise open connections and park streams, each a goroutine and some 15 KiB, until the
// kernel runs out of memory or file descriptors.

// handshakeTimeout bounds a new connection's TLS handshake and HTTP/2 preface.
const handshakeTimeout = 5 * time.Second

// limitListener refuses connections past max: they are accepted and closed at once, before
// any TLS handshake or HTTP/2 preface, and counted.
type limitListener struct {
	net.Listener
	max     int64
	active  atomic.Int64
	metrics *kernelMetrics
	log     *logging.Logger
	logT    *logging.Throttle
}

func newLimitListener(ln net.Listener, max int, m *kernelMetrics, log *logging.Logger) *limitListener {
	l := &limitListener{Listener: ln, max: int64(max), metrics: m, log: log, logT: logging.NewThrottle(10 * time.Second)}
	m.registerConnections(l)
	return l
}

// Accept returns the next connection within the limit; connections past it are closed.
func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.active.Add(1) <= l.max {
			return &limitConn{Conn: rawio.Wrap(c), l: l}, nil
		}
		l.active.Add(-1)
		l.metrics.connRefused.Inc()
		if l.logT.Allow() {
			l.log.Warn().Str("remote", c.RemoteAddr().String()).Int64("max_connections", l.max).
				Msg("ext_proc connection refused: server.max_connections reached (logged at most once every 10 s)")
		}
		_ = c.Close()
	}
}

// limitConn gives its place back when it is closed, once.
type limitConn struct {
	net.Conn
	l      *limitListener
	closed atomic.Bool
}

func (c *limitConn) Close() error {
	if c.closed.CompareAndSwap(false, true) {
		c.l.active.Add(-1)
	}
	return c.Conn.Close()
}

// idleStreams ends ext_proc streams that have neither received nor sent a message for longer
// than timeout. Each stream records its last activity from a coarse clock (one atomic load
// and one store per message, no timer); a sweeper walks the open streams a few times per
// timeout. A stream it ends gets the status DEADLINE_EXCEEDED, never OK: Envoy takes an OK
// end as "continue unmodified", which would let a response phase through unjudged.
//
// The sweeper ends a stream by writing that status on the stream's transport stream, as gRPC
// does when a handler returns: the transport then cancels the stream's own context, which
// ends a Recv that waits (and a Send that waits for flow control). The limit so needs no
// context of its own per stream: deriving a cancellable one from gRPC's, as it did before,
// cost about 500 bytes per open stream (the context, its registration with gRPC's, two
// channels) and eight allocations per stream. Per stream now: the tracker and gRPC's
// StreamServerInfo for the interceptor (two allocations, about 90 bytes;
// BenchmarkIdleLimitStream) and a lock of one of the shards to join and leave its list.
type idleStreams struct {
	timeout int64 // ns
	tick    time.Duration
	clock   atomic.Int64 // ns, advanced by the sweeper
	shards  [16]idleShard
	next    atomic.Uint32
	metrics *kernelMetrics
	log     *logging.Logger
	logT    *logging.Throttle
	// ending is the sweeper's list of streams to end once the shard locks are released.
	ending []*idleStream
}

type idleShard struct {
	mu   sync.Mutex
	head *idleStream
	_    [40]byte // keep shards on their own cache lines
}

// statusWriter is the method of gRPC's transport stream (what grpc.ServerTransportStream
// holds) that ends a stream with a status. TestIdleLimitOverGRPC holds the gRPC version in
// go.mod to it.
type statusWriter interface {
	WriteStatus(*status.Status) error
}

// idleStatus is the status of a stream the limit ends. DeadlineExceeded, not Canceled: the
// latter would read as Envoy's own cancellation.
var idleStatus = status.New(codes.DeadlineExceeded, "ext_proc stream idle for longer than server.stream_idle_timeout_ms")

// idleStream is a stream's tracker. It wraps the stream, so that every message marks activity.
type idleStream struct {
	grpc.ServerStream
	owner      *idleStreams
	end        statusWriter
	shard      *idleShard
	prev, next *idleStream
	last       atomic.Int64
	ended      atomic.Bool
}

func newIdleStreams(timeout time.Duration, m *kernelMetrics, log *logging.Logger) *idleStreams {
	tick := min(max(timeout/8, 10*time.Millisecond), time.Second)
	s := &idleStreams{timeout: int64(timeout), tick: tick, metrics: m, log: log, logT: logging.NewThrottle(10 * time.Second)}
	s.clock.Store(time.Now().UnixNano())
	return s
}

// serverOptions are the gRPC server options that put the limit in place.
func (s *idleStreams) serverOptions() []grpc.ServerOption {
	return []grpc.ServerOption{grpc.ChainStreamInterceptor(s.intercept)}
}

func (s *idleStreams) intercept(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	end, ok := grpc.ServerTransportStreamFromContext(ss.Context()).(statusWriter)
	if !ok {
		// A gRPC build whose streams cannot be ended from outside their handler: refuse
		// rather than hold streams without the limit.
		if s.logT.Allow() {
			s.log.Error().Msg("ext_proc stream refused: this build's gRPC cannot end idle streams; set server.stream_idle_timeout_ms: -1 to serve without the limit")
		}
		return status.Error(codes.Unavailable, "policy-kernel cannot enforce server.stream_idle_timeout_ms with this gRPC build")
	}
	is := &idleStream{ServerStream: ss, owner: s, end: end}
	is.last.Store(s.clock.Load())
	s.add(is)
	err := handler(srv, is)
	s.remove(is)
	if is.ended.Load() {
		return idleStatus.Err()
	}
	return err
}

// RecvMsg marks activity when a message arrives (and when the wait ends).
func (is *idleStream) RecvMsg(m any) error {
	err := is.ServerStream.RecvMsg(m)
	is.last.Store(is.owner.clock.Load())
	return err
}

// SendMsg marks activity when a reply goes out: the idle time of a stream waiting for its
// response phase counts from the last reply.
func (is *idleStream) SendMsg(m any) error {
	is.last.Store(is.owner.clock.Load())
	return is.ServerStream.SendMsg(m)
}

func (s *idleStreams) add(is *idleStream) {
	sh := &s.shards[s.next.Add(1)%uint32(len(s.shards))]
	is.shard = sh
	sh.mu.Lock()
	is.next = sh.head
	if sh.head != nil {
		sh.head.prev = is
	}
	sh.head = is
	sh.mu.Unlock()
}

func (s *idleStreams) remove(is *idleStream) {
	sh := is.shard
	sh.mu.Lock()
	if is.prev != nil {
		is.prev.next = is.next
	} else {
		sh.head = is.next
	}
	if is.next != nil {
		is.next.prev = is.prev
	}
	is.prev, is.next = nil, nil
	sh.mu.Unlock()
}

// run advances the clock and ends idle streams until ctx is done.
func (s *idleStreams) run(ctx context.Context) {
	t := time.NewTicker(s.tick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			s.sweep(now.UnixNano())
		}
	}
}

func (s *idleStreams) sweep(now int64) {
	s.clock.Store(now)
	ending := s.ending[:0]
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for is := sh.head; is != nil; is = is.next {
			if now-is.last.Load() > s.timeout && is.ended.CompareAndSwap(false, true) {
				ending = append(ending, is)
			}
		}
		sh.mu.Unlock()
	}
	// Outside the shard locks, which new streams take: writing the status takes the
	// transport's. A stream whose handler has returned meanwhile is already done, and
	// writing its status again does nothing.
	for i, is := range ending {
		_ = is.end.WriteStatus(idleStatus)
		ending[i] = nil
	}
	s.ending = ending[:0]
	if len(ending) == 0 {
		return
	}
	s.metrics.streamsIdleClosed.Add(len(ending))
	if s.logT.Allow() {
		s.log.Warn().Int("streams", len(ending)).Int64("stream_idle_timeout_ms", s.timeout/int64(time.Millisecond)).
			Msg("ended ext_proc streams idle for longer than server.stream_idle_timeout_ms (logged at most once every 10 s)")
	}
}
