package auditlog

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/testenv"
)

// blockedPipe returns a pipe whose buffer is already full, so the next write to w blocks until
// the test reads from r. filler is how many bytes the test wrote to fill it.
func blockedPipe(t *testing.T) (r, w *os.File, filler int) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(); w.Close() })
	// Fill the pipe without blocking: writes fail with a deadline once it is full.
	chunk := bytes.Repeat([]byte("-"), 4096)
	for {
		w.SetWriteDeadline(time.Now().Add(20 * time.Millisecond))
		n, err := w.Write(chunk)
		filler += n
		if err != nil {
			break
		}
	}
	w.SetWriteDeadline(time.Time{})
	return r, w, filler
}

// TestQueueFullDrops shows that a sink whose output is stuck never blocks a request: records
// past the queue are dropped and counted, and those queued are written once the output moves.
func TestQueueFullDrops(t *testing.T) {
	r, w, filler := blockedPipe(t)
	old := stdout
	stdout = w
	t.Cleanup(func() { stdout = old })
	logs := &testenv.SyncBuffer{}
	level, _ := logging.ParseLevel("info")
	fac, err := New(policy.Config{Raw: json.RawMessage(`{"queue_size":8}`), Log: logging.New(logs, "agent", level)})
	if err != nil {
		t.Fatal(err)
	}
	f := fac.(*Factory)
	p := mustBuild(t, f, map[string]string{"log_headers": "false"})

	const n = 2000
	dropped := droppedFull.Get()
	start := time.Now()
	for i := 0; i < n; i++ {
		c := responseContextFor(fmt.Sprintf("req-%d", i))
		if _, err := runResponse(p, c); err != nil {
			t.Fatal(err)
		}
	}
	elapsed := time.Since(start)
	dropped = droppedFull.Get() - dropped
	if elapsed > 2*time.Second {
		t.Fatalf("%d records into a stuck sink took %v", n, elapsed)
	}
	// The writer holds at most one batch (what it took before blocking); the queue holds 8.
	if dropped < n-8-n/2 || dropped >= n {
		t.Fatalf("dropped %d of %d", dropped, n)
	}
	t.Logf("%d records into a stuck sink in %v; %d dropped", n, elapsed, dropped)
	// The drops are logged once, not once per record.
	if got := strings.Count(logs.String(), "audit log queue full; records dropped"); got != 1 {
		t.Fatalf("%d log lines about drops, want 1: %s", got, logs.String())
	}

	// Unstick the pipe; Close writes every record that was not dropped.
	read := make(chan []byte)
	go func() {
		b, _ := io.ReadAll(r)
		read <- b
	}()
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	out := <-read
	recs := parseRecords(t, string(out[filler:]))
	if uint64(len(recs)) != n-dropped {
		t.Fatalf("%d records written, want %d", len(recs), n-dropped)
	}
	// Records keep their order.
	last := -1
	for _, rec := range recs {
		var i int
		fmt.Sscanf(rec.RequestID, "req-%d", &i)
		if i <= last {
			t.Fatalf("record %s after req-%d", rec.RequestID, last)
		}
		last = i
	}
}

func responseContextFor(id string) *policy.Context {
	return &policy.Context{
		Phase:     agentv1.PolicyPhase_RESPONSE,
		RequestID: id,
		RouteName: "r",
		Response:  &policy.ResponseContext{Status: 200},
	}
}

// TestCloseTimeout shows that Close gives up on an output that takes nothing.
func TestCloseTimeout(t *testing.T) {
	r, w, _ := blockedPipe(t)
	s := newSink(stdoutWriter{bufio.NewWriter(w), w}, 4, nil)
	s.closeTimeout = 100 * time.Millisecond
	s.enqueue([]byte("{}\n"))
	s.enqueue([]byte("{}\n"))
	start := time.Now()
	err := s.Close()
	if err == nil || !strings.Contains(err.Error(), "the sink took no writes for 100ms") {
		t.Fatalf("Close = %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("Close took %v", d)
	}
	// Unblock the writer so that its goroutine ends with the test.
	go io.Copy(io.Discard, r)
	<-s.done
}

// TestCloseFlushes shows that Close writes every queued record, and that records after Close
// are dropped and counted.
func TestCloseFlushes(t *testing.T) {
	out := captureStdout(t)
	f := newFactory(t, `{"queue_size":10000}`)
	p := mustBuild(t, f, nil)
	const n = 5000
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < n/4; i++ {
				runResponse(p, responseContextFor("x"))
			}
		}()
	}
	wg.Wait()
	written := recordsWritten.Get()
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if got := len(parseRecords(t, out.String())); got != n {
		t.Fatalf("%d records after Close, want %d", got, n)
	}
	if recordsWritten.Get() < written {
		t.Fatal("records_total went down")
	}
	closed := droppedClosed.Get()
	runResponse(p, responseContextFor("late"))
	if droppedClosed.Get() != closed+1 {
		t.Fatal("a record after Close was not counted as dropped")
	}
	if strings.Contains(out.String(), "late") {
		t.Fatal("a record after Close was written")
	}
	// Close is idempotent.
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestSharedSink shows that factories made from the same sink settings, as a config reload
// makes them, share one writer, which stays open until the last of them closes.
func TestSharedSink(t *testing.T) {
	out := captureStdout(t)
	shared := &sync.Map{}
	mk := func(raw string) *Factory {
		t.Helper()
		f, err := New(policy.Config{Raw: json.RawMessage(raw), Shared: shared})
		if err != nil {
			t.Fatal(err)
		}
		return f.(*Factory)
	}
	a := mk(`{"queue_size":16}`)
	b := mk(`{"queue_size":16,"redact_keys":["pin"]}`) // redaction is per factory; the sink is shared
	c := mk(`{"queue_size":32}`)
	if a.sink != b.sink || a.sink == c.sink {
		t.Fatal("sinks are not shared by their settings")
	}
	pa, pb := mustBuild(t, a, nil), mustBuild(t, b, nil)
	runResponse(pa, responseContextFor("a1"))
	// The old factory closes after the new one exists: the writer stays open.
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	runResponse(pb, responseContextFor("b1"))
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	runResponse(pb, responseContextFor("b2"))
	c.Close()
	var ids []string
	for _, r := range parseRecords(t, out.String()) {
		ids = append(ids, r.RequestID)
	}
	if strings.Join(ids, ",") != "a1,b1" {
		t.Fatalf("records = %v, want a1,b1", ids)
	}
	// The last Close removed the writer: a new factory gets a new one.
	d := mk(`{"queue_size":16}`)
	defer d.Close()
	if d.sink == a.sink {
		t.Fatal("a closed sink was reused")
	}
}

// BenchmarkAuditRecord measures the response phase of auditLog: a record with headers and a
// 1 KB JSON body, redacted, encoded and queued to a file sink. Compare runs with benchstat:
//
//	go test -run '^$' -bench AuditRecord -count 10 ./policies/auditlog > new.txt
//	benchstat old.txt new.txt
func BenchmarkAuditRecord(b *testing.B) {
	path := b.TempDir() + "/audit.log"
	fac, err := New(policy.Config{Raw: json.RawMessage(`{"sink":"file","path":"` + path + `","queue_size":65536}`)})
	if err != nil {
		b.Fatal(err)
	}
	f := fac.(*Factory)
	defer f.Close()
	pol, err := f.Build(map[string]string{"log_response_body": "true"})
	if err != nil {
		b.Fatal(err)
	}
	body := []byte(`{"id":1,"name":"Ada","access_token":"t","items":[` + strings.Repeat(`{"sku":"A-1","qty":1,"price":12.5},`, 28) + `{"sku":"B"}]}`)
	dropped := droppedFull.Get()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		c := &policy.Context{
			Phase: agentv1.PolicyPhase_RESPONSE, RequestID: "req-1", RouteName: "users", Method: "GET",
			Path:    "/api/v1/users?page=2",
			Headers: map[string]string{"authorization": "Bearer x", "user-agent": "bench", "accept": "application/json", "x-request-id": "req-1"},
			State:   map[string]string{StateStart: "1700000000000000000", "user_id": "u-1"},
			Response: &policy.ResponseContext{Status: 200, Body: body,
				Headers: map[string]string{"content-type": "application/json", "content-length": "1024", "date": "Sun, 29 Nov 2026 00:00:00 GMT"}},
		}
		for pb.Next() {
			if _, err := runResponse(pol, c); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.ReportMetric(float64(droppedFull.Get()-dropped)/float64(b.N), "dropped/op")
}

// writesRecorder keeps each write it gets.
type writesRecorder struct{ writes []string }

func (w *writesRecorder) Write(p []byte) (int, error) {
	w.writes = append(w.writes, string(p))
	return len(p), nil
}

// TestWritesHoldWholeRecords shows that the buffered writers only write whole lines to their
// output, whatever the record sizes, so two writers on one output cannot cut records.
func TestWritesHoldWholeRecords(t *testing.T) {
	out := &writesRecorder{}
	w := stdoutWriter{bufio.NewWriterSize(out, 64), out}
	var want strings.Builder
	for i, n := range []int{10, 30, 30, 5, 100, 20, 63, 64, 65, 1} {
		rec := fmt.Sprintf("%d:%s\n", i, strings.Repeat("x", n))
		want.WriteString(rec)
		if _, err := w.Write([]byte(rec)); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(out.writes, ""); got != want.String() {
		t.Fatalf("output = %q, want %q", got, want.String())
	}
	for _, wr := range out.writes {
		if !strings.HasSuffix(wr, "\n") {
			t.Fatalf("a write ends inside a record: %q (all: %q)", wr, out.writes)
		}
	}
	if len(out.writes) < 4 {
		t.Fatalf("only %d writes: the buffer did not fill", len(out.writes))
	}
}
