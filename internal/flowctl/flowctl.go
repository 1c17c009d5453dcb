// Package flowctl sets HTTP/2 flow-control windows on gRPC connections, so that grpc-go does
// not estimate them.
//
// By default grpc-go starts each stream with a 64 KiB window and grows it by estimating the
// bandwidth-delay product: on receiving data it sends a PING and times the answer. The kernel
// and the agent exchange small messages one at a time, so nearly every message that finds the
// connection idle costs such a PING and its acknowledgement: two more writes, and two more
// wake-ups of each side's reader and writer goroutines, for every round trip. A window set
// explicitly turns the estimation off. The windows here are credit, not buffers: memory is used
// only for data received and not yet read, as with the estimated windows, which grow as large.
package flowctl

import "google.golang.org/grpc"

const (
	// StreamWindow is each stream's window: larger than the agent API's usual message
	// (grpc-go also widens a stream's window for one large message being read).
	StreamWindow = 1 << 20
	// ConnWindow is each connection's window, shared by its streams.
	ConnWindow = 8 << 20
)

// ServerOptions are a server's window settings.
func ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{grpc.InitialWindowSize(StreamWindow), grpc.InitialConnWindowSize(ConnWindow)}
}

// DialOptions are a client's window settings.
func DialOptions() []grpc.DialOption {
	return []grpc.DialOption{grpc.WithInitialWindowSize(StreamWindow), grpc.WithInitialConnWindowSize(ConnWindow)}
}
