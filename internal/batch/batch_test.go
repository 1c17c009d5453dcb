package batch

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// recorder is a write function that decodes every batch it is given, as the other side would.
type recorder struct {
	mu      sync.Mutex
	batches [][]uint64 // call ids of each batch, in order
	sizes   []int
	// block, when set, is waited on by each write before it returns.
	block chan struct{}
	// started is told of each write as it begins.
	started chan struct{}
	fail    error
}

func (r *recorder) write(b *Batch) error {
	if r.started != nil {
		r.started <- struct{}{}
	}
	if r.block != nil {
		<-r.block
	}
	buf := make([]byte, b.SizeVT())
	n, err := b.MarshalToSizedBufferVT(buf)
	if err != nil {
		return err
	}
	var m agentv1.PolicyRequestBatch
	if err := m.UnmarshalVT(buf[:n]); err != nil {
		return fmt.Errorf("decode batch: %w", err)
	}
	ids := make([]uint64, 0, len(m.GetRequests()))
	for _, req := range m.GetRequests() {
		ids = append(ids, req.GetCallId())
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.batches = append(r.batches, ids)
	r.sizes = append(r.sizes, n)
	return r.fail
}

func (r *recorder) all() []uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []uint64
	for _, b := range r.batches {
		out = append(out, b...)
	}
	return out
}

func frame(t *testing.T, id uint64, pad int) Frame {
	t.Helper()
	f, err := Encode(id, &agentv1.PolicyRequest{CallId: id, RequestId: strings.Repeat("r", pad)})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func TestEncodeIsOneFieldOfTheBatch(t *testing.T) {
	var b Batch
	req := &agentv1.PolicyRequest{CallId: 7, RouteName: "r", Context: &agentv1.RequestContext{Headers: map[string]string{"a": "b"}}}
	for _, pad := range []int{0, 200, 5000} { // one- and two-byte lengths, a buffer that grows
		f, err := Encode(uint64(pad)+1, &agentv1.PolicyRequest{CallId: uint64(pad) + 1, RequestId: strings.Repeat("x", pad)})
		if err != nil {
			t.Fatal(err)
		}
		b.Frames = append(b.Frames, f)
		b.size += f.Len()
	}
	f, err := Encode(7, req)
	if err != nil {
		t.Fatal(err)
	}
	b.Frames = append(b.Frames, f)
	b.size += f.Len()
	buf := make([]byte, b.SizeVT())
	if n, err := b.MarshalToSizedBufferVT(buf); err != nil || n != len(buf) {
		t.Fatalf("marshal: %d, %v", n, err)
	}
	var m agentv1.PolicyRequestBatch
	if err := m.UnmarshalVT(buf); err != nil {
		t.Fatal(err)
	}
	got := m.GetRequests()
	if len(got) != 4 || got[0].GetCallId() != 1 || len(got[2].GetRequestId()) != 5000 || !proto.Equal(got[3], req) {
		t.Fatalf("decoded %v", got)
	}
	if _, err := b.MarshalToSizedBufferVT(make([]byte, b.SizeVT()-1)); err == nil {
		t.Error("marshal into a short buffer: want an error")
	}
	for _, f := range b.Frames {
		f.Release()
	}
}

func TestSenderSendsEachFrameOnceInOrder(t *testing.T) {
	r := &recorder{}
	s := NewSender(r.write, func(f []Frame, err error) { t.Errorf("failed(%d frames, %v)", len(f), err) }, 4096)
	const goroutines, each = 8, 200
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := range each {
				if err := s.Enqueue(frame(t, uint64(g*each+i+1), 10)); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	s.Wait()
	got := r.all()
	if len(got) != goroutines*each {
		t.Fatalf("sent %d frames, want %d", len(got), goroutines*each)
	}
	// Each goroutine's frames go out in the order it queued them, each once.
	last := map[int]uint64{}
	seen := map[uint64]bool{}
	for _, id := range got {
		g := int((id - 1) / each)
		if seen[id] || id <= last[g] {
			t.Fatalf("frame %d sent twice or out of order", id)
		}
		seen[id], last[g] = true, id
	}
}

func TestSenderBatchesWhatQueuesDuringASend(t *testing.T) {
	r := &recorder{block: make(chan struct{}), started: make(chan struct{}, 10)}
	s := NewSender(r.write, func([]Frame, error) {}, 1<<20)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = s.Enqueue(frame(t, 1, 0)) // becomes the flusher and blocks in write
	}()
	<-r.started
	for id := uint64(2); id <= 11; id++ {
		if err := s.Enqueue(frame(t, id, 0)); err != nil { // queued: someone is flushing
			t.Fatal(err)
		}
	}
	close(r.block)
	<-done
	s.Wait()
	want := [][]uint64{{1}, {2, 3, 4, 5, 6, 7, 8, 9, 10, 11}}
	if !slices.EqualFunc(r.batches, want, slices.Equal) {
		t.Fatalf("batches %v, want %v", r.batches, want)
	}
}

func TestSenderBoundsBatchBytes(t *testing.T) {
	r := &recorder{block: make(chan struct{}), started: make(chan struct{}, 10)}
	f1 := frame(t, 1, 0)
	small := frame(t, 2, 100).Len()
	s := NewSender(r.write, func([]Frame, error) {}, 2*small)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = s.Enqueue(f1)
	}()
	<-r.started
	for id := uint64(2); id <= 6; id++ {
		_ = s.Enqueue(frame(t, id, 100))
	}
	_ = s.Enqueue(frame(t, 7, 4*small)) // larger than a batch: goes alone
	_ = s.Enqueue(frame(t, 8, 100))
	go func() {
		for range r.started {
		}
	}()
	close(r.block)
	<-done
	s.Wait()
	close(r.started)
	want := [][]uint64{{1}, {2, 3}, {4, 5}, {6}, {7}, {8}}
	if !slices.EqualFunc(r.batches, want, slices.Equal) {
		t.Fatalf("batches %v, want %v", r.batches, want)
	}
	for i, size := range r.sizes {
		if len(r.batches[i]) > 1 && size > 2*small {
			t.Errorf("batch %v is %d bytes, over the bound of %d", r.batches[i], size, 2*small)
		}
	}
}

func TestSenderHandsOverAfterMaxRounds(t *testing.T) {
	r := &recorder{block: make(chan struct{}), started: make(chan struct{}, 100)}
	s := NewSender(r.write, func([]Frame, error) {}, 1) // one frame a batch
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = s.Enqueue(frame(t, 1, 0))
	}()
	<-r.started
	const n = 3 * MaxRounds
	for id := uint64(2); id <= n; id++ {
		_ = s.Enqueue(frame(t, id, 0))
	}
	close(r.block)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the first caller kept sending for the others")
	}
	s.Wait()
	if got := r.all(); len(got) != n {
		t.Fatalf("sent %v, want %d frames", got, n)
	}
}

func TestSenderWriteFailure(t *testing.T) {
	boom := errors.New("boom")
	r := &recorder{block: make(chan struct{}), started: make(chan struct{}, 10), fail: boom}
	var (
		mu   sync.Mutex
		lost []uint64
		errs []error
	)
	s := NewSender(r.write, func(fs []Frame, err error) {
		mu.Lock()
		defer mu.Unlock()
		for _, f := range fs {
			lost = append(lost, f.ID)
		}
		errs = append(errs, err)
	}, 1<<20)
	done := make(chan error, 1)
	go func() { done <- s.Enqueue(frame(t, 1, 0)) }()
	<-r.started
	_ = s.Enqueue(frame(t, 2, 0))
	_ = s.Enqueue(frame(t, 3, 0))
	r.block <- struct{}{} // the first write fails: frame 1 is lost, 2 and 3 were never sent
	if err := <-done; err != nil {
		t.Fatalf("queued frame: %v", err)
	}
	s.Wait()
	mu.Lock()
	if !slices.Equal(lost, []uint64{1, 2, 3}) || len(errs) != 1 || !errors.Is(errs[0], boom) {
		t.Errorf("failed got %v with %v, want frames 1, 2, 3 with %v", lost, errs, boom)
	}
	mu.Unlock()
	if err := s.Enqueue(frame(t, 4, 0)); !errors.Is(err, boom) {
		t.Errorf("enqueue after a failed write: %v, want %v", err, boom)
	}
}

func TestSenderClose(t *testing.T) {
	r := &recorder{block: make(chan struct{}), started: make(chan struct{}, 10)}
	var lost []uint64
	s := NewSender(r.write, func(fs []Frame, err error) {
		for _, f := range fs {
			lost = append(lost, f.ID)
		}
	}, 1<<20)
	go func() { _ = s.Enqueue(frame(t, 1, 0)) }()
	<-r.started
	_ = s.Enqueue(frame(t, 2, 0))
	closed := make(chan struct{})
	stop := errors.New("closed")
	go func() {
		defer close(closed)
		s.Close(stop)
	}()
	select {
	case <-closed:
		t.Fatal("Close returned while a write was in progress")
	case <-time.After(50 * time.Millisecond):
	}
	if err := s.Enqueue(frame(t, 3, 0)); !errors.Is(err, stop) {
		t.Errorf("enqueue after Close: %v, want %v", err, stop)
	}
	close(r.block)
	<-closed
	// The write in progress ended; frame 2, queued behind it, was handed back unsent.
	if sent := r.all(); !slices.Equal(sent, []uint64{1}) || !slices.Equal(lost, []uint64{2}) {
		t.Errorf("sent %v, lost %v; want sent [1], lost [2]", sent, lost)
	}
	s.Close(stop) // a second Close changes nothing
}

func TestReleaseKeepsLargeBuffersOutOfThePool(t *testing.T) {
	f := frame(t, 1, 2*maxPooled)
	f.Release() // let go, not pooled
	g := frame(t, 2, 0)
	if cap(*g.buf) > maxPooled {
		t.Errorf("a %d-byte buffer came back from the pool", cap(*g.buf))
	}
	g.Release()
	Frame{}.Release() // a zero frame has nothing to release
}

func BenchmarkSender(b *testing.B) {
	s := NewSender(func(b *Batch) error {
		buf := make([]byte, b.SizeVT())
		_, err := b.MarshalToSizedBufferVT(buf)
		return err
	}, func([]Frame, error) {}, 64<<10)
	req := &agentv1.PolicyRequest{CallId: 1, RouteName: "bench", Context: &agentv1.RequestContext{Headers: map[string]string{"a": "b", "c": "d"}}}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			f, err := Encode(1, req)
			if err != nil {
				b.Fatal(err)
			}
			if err := s.Enqueue(f); err != nil {
				b.Fatal(err)
			}
		}
	})
	s.Wait()
}
