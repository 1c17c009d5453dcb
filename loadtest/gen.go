package loadtest

import (
	"context"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
)

// Latencies are recorded in microseconds, from 1 µs to 60 s, with 3 significant digits.
func newHistogram() *hdrhistogram.Histogram { return hdrhistogram.New(1, 60_000_000, 3) }

// Result is what one load phase measured on the client side.
type Result struct {
	Requests int64 // requests that completed without error
	Errors   int64
	// Dropped counts open-loop requests never sent because MaxInFlight requests were
	// already outstanding; each is also an error.
	Dropped int64
	Elapsed time.Duration
	// Latency holds the latency of every successful request in microseconds.
	Latency *hdrhistogram.Histogram
	// ErrorSamples counts errors by message (the first few distinct ones).
	ErrorSamples map[string]int64
}

// Rate returns the successful requests per second.
func (r *Result) Rate() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Requests) / r.Elapsed.Seconds()
}

// Quantile returns a latency quantile (0..100) in microseconds.
func (r *Result) Quantile(q float64) int64 { return r.Latency.ValueAtQuantile(q) }

// TopErrors returns the error messages seen, most frequent first.
func (r *Result) TopErrors() []string {
	out := make([]string, 0, len(r.ErrorSamples))
	for k := range r.ErrorSamples {
		out = append(out, k)
	}
	sort.Slice(out, func(i, j int) bool {
		if r.ErrorSamples[out[i]] != r.ErrorSamples[out[j]] {
			return r.ErrorSamples[out[i]] > r.ErrorSamples[out[j]]
		}
		return out[i] < out[j]
	})
	return out
}

const maxErrorSamples = 8

// recorder collects results from many goroutines.
type recorder struct {
	mu     sync.Mutex
	hist   *hdrhistogram.Histogram
	ok     int64
	errors int64
	msgs   map[string]int64
}

func newRecorder() *recorder { return &recorder{hist: newHistogram(), msgs: map[string]int64{}} }

func (r *recorder) record(lat time.Duration, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		r.errors++
		msg := err.Error()
		if _, ok := r.msgs[msg]; ok || len(r.msgs) < maxErrorSamples {
			r.msgs[msg]++
		}
		return
	}
	r.ok++
	_ = r.hist.RecordValue(max(lat.Microseconds(), 1))
}

func (r *recorder) result(elapsed time.Duration, dropped int64) *Result {
	r.mu.Lock()
	defer r.mu.Unlock()
	return &Result{Requests: r.ok, Errors: r.errors + dropped, Dropped: dropped, Elapsed: elapsed, Latency: r.hist, ErrorSamples: r.msgs}
}

// OpenLoop sends requests at a fixed rate for d, each on its own stream, whatever the server's
// speed: a request's latency runs from the time it was meant to be sent, so a server that
// stalls shows its stall in the latency of every request scheduled during it (no coordinated
// omission). At most maxInFlight requests are outstanding; a request due beyond that is
// dropped and counted as an error.
func OpenLoop(ctx context.Context, c *Conns, tr *Traffic, rate float64, d time.Duration, maxInFlight int) *Result {
	ex := newExchanger(tr)
	rec := newRecorder()
	interval := time.Duration(float64(time.Second) / rate)
	n := int(d / interval)
	var (
		wg       sync.WaitGroup
		inFlight atomic.Int64
		dropped  int64
	)
	start := time.Now()
	for i := 0; i < n && ctx.Err() == nil; i++ {
		intended := start.Add(time.Duration(i) * interval)
		if wait := time.Until(intended); wait > 0 {
			time.Sleep(wait)
		}
		if inFlight.Load() >= int64(maxInFlight) {
			dropped++
			continue
		}
		inFlight.Add(1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer inFlight.Add(-1)
			err := ex.exchange(ctx, c.pick())
			rec.record(time.Since(intended), err)
		}()
	}
	wg.Wait()
	return rec.result(time.Since(start), dropped)
}

// ClosedLoop runs concurrency workers for d, each sending its next request as soon as the
// previous one is answered: the server's maximum throughput at that concurrency.
func ClosedLoop(ctx context.Context, c *Conns, tr *Traffic, concurrency int, d time.Duration) *Result {
	ex := newExchanger(tr)
	rec := newRecorder()
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var wg sync.WaitGroup
	start := time.Now()
	for range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				t := time.Now()
				err := ex.exchange(context.WithoutCancel(ctx), c.pick())
				rec.record(time.Since(t), err)
			}
		}()
	}
	wg.Wait()
	return rec.result(time.Since(start), 0)
}

// Held is a set of streams left open after their request phase, as Envoy leaves them while
// the upstream has not answered.
type Held struct {
	Opened int
	Errors int
	// FirstError is the first error met opening a stream, if any.
	FirstError error
	cancels    []context.CancelFunc
}

// Release resets every held stream.
func (h *Held) Release() {
	for _, c := range h.cancels {
		c()
	}
	h.cancels = nil
}

// Hold opens n streams, concurrency at a time, completes the request phase of each and keeps
// them open until Release.
func Hold(ctx context.Context, c *Conns, tr *Traffic, n, concurrency int) *Held {
	ex := newExchanger(tr)
	h := &Held{}
	var mu sync.Mutex
	sem := make(chan struct{}, concurrency)
	var wg sync.WaitGroup
	for i := 0; i < n && ctx.Err() == nil; i++ {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			sctx, cancel := context.WithCancel(ctx)
			_, _, err := ex.open(sctx, c.pick())
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				cancel()
				h.Errors++
				if h.FirstError == nil {
					h.FirstError = err
				}
				return
			}
			h.Opened++
			h.cancels = append(h.cancels, cancel)
		}()
	}
	wg.Wait()
	return h
}
