// Package noop is the baseline of every performance figure: an ext_proc server that answers
// each message with the empty reply of its type and does nothing else. The kernel's cost is
// reported as a ratio to it, measured in the same run on the same traffic, so that the cost of
// gRPC, HTTP/2 and the load generator itself cancels out.
package noop

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Server answers every ext_proc message with the empty reply of its type.
type Server struct {
	extprocv3.UnimplementedExternalProcessorServer
}

// Process serves one stream until the client ends it.
func (Server) Process(ps extprocv3.ExternalProcessor_ProcessServer) error {
	for {
		req, err := ps.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) || status.Code(err) == codes.Canceled {
				return nil
			}
			return err
		}
		resp, err := Reply(req)
		if err != nil {
			return err
		}
		if err := ps.Send(resp); err != nil {
			return nil
		}
	}
}

// Reply returns the empty reply to a message: it lets the request through unchanged.
func Reply(req *extprocv3.ProcessingRequest) (*extprocv3.ProcessingResponse, error) {
	switch req.GetRequest().(type) {
	case *extprocv3.ProcessingRequest_RequestHeaders:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{}}}, nil
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{ResponseHeaders: &extprocv3.HeadersResponse{}}}, nil
	case *extprocv3.ProcessingRequest_RequestBody:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{}}}, nil
	case *extprocv3.ProcessingRequest_ResponseBody:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{ResponseBody: &extprocv3.BodyResponse{}}}, nil
	case *extprocv3.ProcessingRequest_RequestTrailers:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestTrailers{RequestTrailers: &extprocv3.TrailersResponse{}}}, nil
	case *extprocv3.ProcessingRequest_ResponseTrailers:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseTrailers{ResponseTrailers: &extprocv3.TrailersResponse{}}}, nil
	default:
		return nil, status.Errorf(codes.InvalidArgument, "processing request holds no known message (%T)", req.GetRequest())
	}
}

// NewGRPCServer returns a gRPC server with the no-op service registered, with the same stream
// limit as the kernel's load-test config so that neither side is throttled differently.
func NewGRPCServer(maxStreams uint32) *grpc.Server {
	srv := grpc.NewServer(grpc.MaxConcurrentStreams(maxStreams))
	extprocv3.RegisterExternalProcessorServer(srv, Server{})
	return srv
}

// Main serves the no-op ext_proc server until ctx is cancelled.
func Main(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("extproc-noop", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:9101", "ext_proc listen address host:port")
	maxStreams := fs.Uint("max-concurrent-streams", 1024, "HTTP/2 streams allowed per connection")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen on %q: %w", *listen, err)
	}
	srv := NewGRPCServer(uint32(*maxStreams))
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	fmt.Fprintf(stderr, "extproc-noop serving on %s\n", ln.Addr())
	select {
	case err := <-done:
		return fmt.Errorf("grpc server: %w", err)
	case <-ctx.Done():
		srv.Stop()
		return nil
	}
}
