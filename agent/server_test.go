package agent

import (
	"context"
	"errors"
	"io"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/policy-engine/policy-engine/agent/policy"
	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/logging"
	"github.com/policy-engine/policy-engine/internal/uds"
)

// streamTestPolicy answers after the wait its metadata names ("wait": a Go duration).
const streamTestPolicy = "streamTestWait"

func init() {
	policy.Register(policy.Module{
		Name:   streamTestPolicy,
		Phases: policy.Both,
		New: func(policy.Config) (policy.Factory, error) {
			return policy.FactoryFunc(func(md map[string]string) (policy.Policy, error) {
				var s struct {
					Wait time.Duration `json:"wait"`
				}
				if err := policy.DecodeMetadata(md, &s); err != nil {
					return nil, err
				}
				return waitPolicy(s.Wait), nil
			}), nil
		},
	})
}

type waitPolicy time.Duration

func (w waitPolicy) Execute(ctx context.Context, _ *policy.Context) (policy.Result, error) {
	select {
	case <-time.After(time.Duration(w)):
	case <-ctx.Done():
	}
	return policy.Allow(policy.SetHeader("x-waited", time.Duration(w).String())), nil
}

// startStreamService serves the agent's gRPC service on a Unix socket and returns it with a
// client stream.
func startStreamService(t *testing.T) (*service, *callStream) {
	t.Helper()
	cfg, err := ParseConfig("test.yaml", []byte("agent_core:\n  name: t\n  socket_path: unused.sock\n"))
	if err != nil {
		t.Fatal(err)
	}
	exec := NewExecutor(logging.New(io.Discard, "agent", zerolog.ErrorLevel))
	if err := exec.Load(cfg.AgentCore, "v1"); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "a.sock")
	ln, err := uds.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	svc := newService(exec, 100)
	t.Cleanup(svc.stop)
	srv := grpc.NewServer()
	agentv1.RegisterPolicyAgentServer(srv, svc)
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	st, err := agentv1.NewPolicyAgentClient(conn).ExecuteStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return svc, &callStream{st: st}
}

// callStream sends requests on ExecuteStream in batches of one and hands out the replies one
// at a time, however the agent batched them.
type callStream struct {
	st      agentv1.PolicyAgent_ExecuteStreamClient
	pending []*agentv1.PolicyResponse
}

func (c *callStream) Send(reqs ...*agentv1.PolicyRequest) error {
	return c.st.Send(&agentv1.PolicyRequestBatch{Requests: reqs})
}

func (c *callStream) Recv() (*agentv1.PolicyResponse, error) {
	for len(c.pending) == 0 {
		b, err := c.st.Recv()
		if err != nil {
			return nil, err
		}
		c.pending = b.GetResponses()
	}
	r := c.pending[0]
	c.pending = c.pending[1:]
	return r, nil
}

func (c *callStream) CloseSend() error { return c.st.CloseSend() }

func waitRequest(id uint64, wait string) *agentv1.PolicyRequest {
	return &agentv1.PolicyRequest{
		CallId:   id,
		Policies: []*agentv1.Policy{{Name: streamTestPolicy, Metadata: map[string]string{"wait": wait}}},
		Context:  &agentv1.RequestContext{Headers: map[string]string{}},
	}
}

func TestExecuteStreamAnswersByCallID(t *testing.T) {
	_, st := startStreamService(t)
	// The slow request goes first, in one batch with the others; replies come back as they
	// are ready.
	if err := st.Send(waitRequest(1, "300ms"), waitRequest(2, "0s"), waitRequest(3, "0s")); err != nil {
		t.Fatal(err)
	}
	var order []uint64
	for range 3 {
		resp, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if resp.GetStatus().GetCode() != agentv1.StatusCode_OK || len(resp.GetInstructions()) != 1 {
			t.Fatalf("reply %v", resp)
		}
		order = append(order, resp.GetCallId())
	}
	if order[2] != 1 {
		t.Errorf("reply order %v: the slow call 1 should come last", order)
	}
}

func TestExecuteStreamDrainAnswersWhatItReadThenEnds(t *testing.T) {
	svc, st := startStreamService(t)
	if err := st.Send(waitRequest(1, "300ms")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // call 1 is running
	svc.beginDrain()
	svc.beginDrain() // a second drain changes nothing
	resp, err := st.Recv()
	if err != nil {
		t.Fatalf("the call read before the drain was not answered: %v", err)
	}
	if resp.GetCallId() != 1 {
		t.Fatalf("reply for call %d, want 1", resp.GetCallId())
	}
	// Then the stream ends cleanly: status OK, seen as io.EOF.
	if _, err := st.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("after the drain: err = %v, want io.EOF (a clean end)", err)
	}
}

func TestExecuteStreamClientEnd(t *testing.T) {
	_, st := startStreamService(t)
	if err := st.Send(waitRequest(1, "0s")); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err != nil {
		t.Fatal(err)
	}
	if err := st.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("after CloseSend: err = %v, want io.EOF", err)
	}
}

func TestExecuteStreamCancelStopsTheCall(t *testing.T) {
	_, st := startStreamService(t)
	start := time.Now()
	if err := st.Send(waitRequest(7, "10s")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	// A cancel for a call that does not exist changes nothing; the one for call 7 stops it.
	for _, id := range []uint64{99, 7} {
		if err := st.Send(&agentv1.PolicyRequest{CallId: id, Cancel: true}); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetCallId() != 7 || time.Since(start) > 5*time.Second {
		t.Fatalf("reply %v after %s: want call 7 stopped early", resp, time.Since(start))
	}
	// The stream still serves.
	if err := st.Send(waitRequest(8, "0s")); err != nil {
		t.Fatal(err)
	}
	if resp, err := st.Recv(); err != nil || resp.GetCallId() != 8 {
		t.Fatalf("after the cancel: %v, %v", resp, err)
	}
}
