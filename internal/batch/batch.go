// Package batch combines the messages that goroutines send on one gRPC stream into batches.
//
// The kernel and the agent exchange many small messages (one per policy chain call) over a few
// long-lived streams. gRPC pays per message: a frame, a trip through its writer goroutine, a
// system call, a wake-up of the reader on the other side. A Sender lets whichever goroutine
// has something to send become the flusher when no one else is: the flusher yields once, so
// that the goroutines that are ready to run can queue their messages too, and then sends all
// that is queued as one message. Under light load a batch is one message and costs a yield;
// under heavy load it holds about as many messages as there were goroutines ready to run.
//
// A batch is a protobuf message whose field 1 repeats the queued messages, so that either side
// decodes it with generated code (PolicyRequestBatch, PolicyResponseBatch). Messages are
// queued already encoded (Frame), so that a caller may reuse what it encoded from as soon as
// Enqueue returns.
package batch

import (
	"errors"
	"runtime"
	"sync"

	"google.golang.org/protobuf/encoding/protowire"
)

// Marshaler is a message with generated size and marshalling code (vtprotobuf).
type Marshaler interface {
	SizeVT() int
	MarshalToSizedBufferVT(dAtA []byte) (int, error)
}

// Frame is one queued message, encoded as field 1 of the batch message. ID identifies it to
// the Sender's owner when a send fails.
type Frame struct {
	ID  uint64
	buf *[]byte
}

// Len is the frame's size on the wire.
func (f Frame) Len() int { return len(*f.buf) }

var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 1024); return &b }}

// maxPooled bounds the buffers kept for reuse: one that held a large body is let go.
const maxPooled = 64 << 10

// Encode encodes m as one frame of a batch.
func Encode(id uint64, m Marshaler) (Frame, error) {
	size := m.SizeVT()
	bp := bufPool.Get().(*[]byte)
	b := protowire.AppendTag((*bp)[:0], 1, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(size))
	head := len(b)
	if cap(b) < head+size {
		nb := make([]byte, head, head+size)
		copy(nb, b)
		b = nb
	}
	b = b[:head+size]
	if _, err := m.MarshalToSizedBufferVT(b[head:]); err != nil {
		*bp = b[:0]
		bufPool.Put(bp)
		return Frame{}, err
	}
	*bp = b
	return Frame{ID: id, buf: bp}, nil
}

// Release returns the frame's buffer for reuse; the frame must not be used after.
func (f Frame) Release() {
	if f.buf == nil || cap(*f.buf) > maxPooled {
		return
	}
	*f.buf = (*f.buf)[:0]
	bufPool.Put(f.buf)
}

// Batch is the message a Sender sends: the concatenation of its frames. It has the methods
// the gRPC codec uses for generated messages.
type Batch struct {
	Frames []Frame
	size   int
}

// SizeVT is the batch's size on the wire.
func (b *Batch) SizeVT() int { return b.size }

// MarshalToSizedBufferVT writes the batch into dAtA, which is SizeVT bytes long.
func (b *Batch) MarshalToSizedBufferVT(dAtA []byte) (int, error) {
	if len(dAtA) < b.size {
		return 0, errors.New("batch: buffer too small")
	}
	n := 0
	for _, f := range b.Frames {
		n += copy(dAtA[n:], *f.buf)
	}
	return n, nil
}

// Sender queues frames and sends them in batches on one stream.
type Sender struct {
	// write sends one batch; it is called by one goroutine at a time.
	write func(*Batch) error
	// failed is told of frames that were not sent because a write failed or the Sender was
	// closed; it is called without the Sender's lock held.
	failed func(frames []Frame, err error)
	// maxBytes bounds a batch; a larger single frame is sent alone.
	maxBytes int

	mu       sync.Mutex
	idle     *sync.Cond // signalled when flushing ends
	queue    []Frame
	flushing bool
	err      error // set once a write failed or the Sender was closed
	batch    Batch // reused by the flusher
}

// MaxRounds bounds the batches one flusher sends in a row before it hands the flushing over
// to a new goroutine, so that a caller does not keep sending for others under sustained load.
const MaxRounds = 4

// NewSender sends batches of at most maxBytes with write and reports frames that could not be
// sent to failed.
func NewSender(write func(*Batch) error, failed func([]Frame, error), maxBytes int) *Sender {
	s := &Sender{write: write, failed: failed, maxBytes: maxBytes}
	s.idle = sync.NewCond(&s.mu)
	return s
}

// Enqueue queues f to be sent. It returns an error, and f is not queued, when the Sender is
// already broken or closed; otherwise f is either sent or handed to failed. The calling
// goroutine sends the queue itself when no other goroutine is doing so.
func (s *Sender) Enqueue(f Frame) error {
	s.mu.Lock()
	if s.err != nil {
		err := s.err
		s.mu.Unlock()
		return err
	}
	s.queue = append(s.queue, f)
	if s.flushing {
		s.mu.Unlock()
		return nil
	}
	s.flushing = true
	s.mu.Unlock()
	// Let the goroutines that are ready to run queue their frames first.
	runtime.Gosched()
	s.flush()
	return nil
}

// flush sends the queue until it is empty. The caller has set flushing.
func (s *Sender) flush() {
	for round := 0; ; round++ {
		s.mu.Lock()
		if len(s.queue) == 0 || s.err != nil {
			// Closed: Close hands what is left to failed.
			s.flushing = false
			s.idle.Broadcast()
			s.mu.Unlock()
			return
		}
		if round == MaxRounds {
			s.mu.Unlock()
			go s.flush()
			return
		}
		n, size := 0, 0
		for n < len(s.queue) && (n == 0 || size+s.queue[n].Len() <= s.maxBytes) {
			size += s.queue[n].Len()
			n++
		}
		b := &s.batch
		b.Frames = append(b.Frames[:0], s.queue[:n]...)
		b.size = size
		rest := copy(s.queue, s.queue[n:])
		clear(s.queue[rest:])
		s.queue = s.queue[:rest]
		s.mu.Unlock()

		err := s.write(b)
		if err != nil {
			s.mu.Lock()
			if s.err == nil {
				s.err = err
			}
			lost := append(append([]Frame(nil), b.Frames...), s.queue...)
			clear(s.queue)
			s.queue = s.queue[:0]
			s.flushing = false
			s.idle.Broadcast()
			s.mu.Unlock()
			clear(b.Frames)
			s.failed(lost, err)
			for _, f := range lost {
				f.Release()
			}
			return
		}
		for _, f := range b.Frames {
			f.Release()
		}
		clear(b.Frames)
	}
}

// Close stops the Sender: later Enqueues fail with err, and frames still queued are handed to
// failed once the flush in progress, if any, is over. It returns when no goroutine is sending.
func (s *Sender) Close(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	for s.flushing {
		s.idle.Wait()
	}
	lost := s.queue
	s.queue = nil
	s.mu.Unlock()
	if len(lost) > 0 {
		s.failed(lost, s.err)
		for _, f := range lost {
			f.Release()
		}
	}
}

// Wait returns when every frame queued so far has been sent or handed to failed.
func (s *Sender) Wait() {
	s.mu.Lock()
	for s.flushing {
		s.idle.Wait()
	}
	s.mu.Unlock()
}
