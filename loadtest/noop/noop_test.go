package noop

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

func TestReplyMatchesEachMessageType(t *testing.T) {
	f := func(req *extprocv3.ProcessingRequest, check func(*extprocv3.ProcessingResponse) bool) {
		t.Helper()
		resp, err := Reply(req)
		if err != nil {
			t.Fatalf("Reply(%T): %v", req.GetRequest(), err)
		}
		if !check(resp) {
			t.Fatalf("Reply(%T) = %v: wrong or non-empty reply", req.GetRequest(), resp)
		}
	}
	f(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestHeaders{}}, func(r *extprocv3.ProcessingResponse) bool {
		return r.GetRequestHeaders() != nil && r.GetRequestHeaders().GetResponse() == nil && r.GetModeOverride() == nil
	})
	f(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{}}, func(r *extprocv3.ProcessingResponse) bool {
		return r.GetResponseHeaders() != nil && r.GetResponseHeaders().GetResponse() == nil
	})
	f(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{}}, func(r *extprocv3.ProcessingResponse) bool {
		return r.GetRequestBody() != nil && r.GetRequestBody().GetResponse() == nil
	})
	f(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{}}, func(r *extprocv3.ProcessingResponse) bool {
		return r.GetResponseBody() != nil && r.GetResponseBody().GetResponse() == nil
	})
	f(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestTrailers{}}, func(r *extprocv3.ProcessingResponse) bool {
		return r.GetRequestTrailers() != nil
	})
	f(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseTrailers{}}, func(r *extprocv3.ProcessingResponse) bool {
		return r.GetResponseTrailers() != nil
	})
	if _, err := Reply(&extprocv3.ProcessingRequest{}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("Reply(empty): err = %v, want InvalidArgument", err)
	}
}

func TestMainServesUntilCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	var stderr bytes.Buffer
	done := make(chan error, 1)
	go func() { done <- Main(ctx, []string{"-listen", "127.0.0.1:0"}, &stderr) }()
	time.Sleep(200 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Main did not return after cancellation")
	}
	if !strings.Contains(stderr.String(), "extproc-noop serving on 127.0.0.1:") {
		t.Errorf("stderr = %q", stderr.String())
	}
}

func TestMainErrors(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"extra"}, "unexpected arguments"},
		{[]string{"-listen", "256.0.0.1:1"}, "listen on"},
		{[]string{"-no-such-flag"}, "not defined"},
	} {
		err := Main(context.Background(), c.args, &bytes.Buffer{})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Main(%q): err = %v, want %q", c.args, err, c.want)
		}
	}
}

func TestProcessStream(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := NewGRPCServer(100)
	go func() { _ = srv.Serve(ln) }()
	defer srv.Stop()
	conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := extprocv3.NewExternalProcessorClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	st, err := client.Process(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, req := range []*extprocv3.ProcessingRequest{
		{Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{}}},
		{Request: &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: &extprocv3.HttpHeaders{}}},
	} {
		if err := st.Send(req); err != nil {
			t.Fatal(err)
		}
		if _, err := st.Recv(); err != nil {
			t.Fatal(err)
		}
	}
	if err := st.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("after CloseSend: %v, want io.EOF", err)
	}

	st, err = client.Process(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&extprocv3.ProcessingRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("empty message: %v, want InvalidArgument", err)
	}
}
