// Package envoytest is a client that plays Envoy v1.36's ext_proc HTTP filter
// (envoy.filters.http.ext_proc) against an External Processing server over gRPC, so the
// policy engine can be tested end to end without an Envoy binary.
//
// A Client stands for one Envoy listener with one ext_proc filter in its chain. Do runs a
// single HTTP exchange through it: the downstream request is offered to the filter, sent
// on to an Upstream function with whatever mutations the server asked for, and the
// upstream response comes back through the filter to the downstream client. The Result
// holds what the client received, what reached the upstream, and every ext_proc message
// that crossed the wire.
//
// The wire behaviour follows Envoy's
// source/extensions/filters/http/ext_proc/{ext_proc.cc,processor_state.cc,mutation_utils.cc}
// and source/extensions/filters/common/mutation_rules/mutation_rules.cc.
package envoytest

import (
	"context"
	"crypto/tls"
	"fmt"
	"math"
	"sync/atomic"
	"time"

	mutationrulesv3 "github.com/envoyproxy/go-control-plane/envoy/config/common/mutation_rules/v3"
	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

// Response code details Envoy records for the replies this package produces.
const (
	// DetailsViaUpstream marks a response that came from the upstream.
	DetailsViaUpstream = "via_upstream"
	// DetailsMessageTimeout is the local reply (504) after message_timeout expired.
	DetailsMessageTimeout = "ext_proc_error_per-message_timeout_exceeded"
	// DetailsSpurious is the local reply to a reply of the wrong type or a second reply.
	DetailsSpurious = "spurious_message"
	// DetailsUnhandled is the local reply to a ProcessingResponse with no response set.
	DetailsUnhandled = "unhandled_message"
	// DetailsGRPCErrorPrefix starts the local reply details for a failed stream; the
	// gRPC code and the status message follow: ext_proc_error_gRPC_error_13{boom}.
	DetailsGRPCErrorPrefix = "ext_proc_error_gRPC_error_"
	// DetailsRequestTooLarge is Envoy's 413 for a buffered request body over the limit.
	DetailsRequestTooLarge = "request_payload_too_large"
	// DetailsResponseTooLarge is Envoy's 500 for a buffered response body over the limit.
	DetailsResponseTooLarge = "response_payload_too_large"
)

// FilterConfig mirrors the parts of envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
// (and of the listener around it) that matter on the wire.
type FilterConfig struct {
	// ProcessingMode is the filter's processing_mode. nil means Envoy's defaults:
	// request and response headers SEND, bodies NONE, trailers SKIP.
	// FULL_DUPLEX_STREAMED and GRPC body modes are not supported.
	ProcessingMode *extprocfilterv3.ProcessingMode
	// AllowModeOverride is allow_mode_override.
	AllowModeOverride bool
	// AllowedOverrideModes is allowed_override_modes; empty allows any override.
	AllowedOverrideModes []*extprocfilterv3.ProcessingMode
	// MessageTimeout is message_timeout; 0 means 200ms.
	MessageTimeout time.Duration
	// MaxMessageTimeout is max_message_timeout, the ceiling for a server's
	// override_message_timeout; 0 means overrides are ignored.
	MaxMessageTimeout time.Duration
	// FailureModeAllow is failure_mode_allow.
	FailureModeAllow bool
	// StatusOnError is status_on_error, the status of the local reply when the stream
	// fails or a reply is rejected; 0 means 500.
	StatusOnError int
	// RequestAttributes and ResponseAttributes are request_attributes and
	// response_attributes. Their values come from Request.Attributes.
	RequestAttributes  []string
	ResponseAttributes []string
	// MaxBufferBytes is the listener's per_connection_buffer_limit_bytes, which caps
	// BUFFERED bodies; 0 means 1 MiB.
	MaxBufferBytes int
	// DisallowIsError is mutation_rules.disallow_is_error.
	DisallowIsError bool
	// MutationRules is the whole mutation_rules message; nil means the defaults.
	// DisallowIsError is OR-ed into it.
	MutationRules *mutationrulesv3.HeaderMutationRules
	// ChunkBytes is the size of the data frames a body arrives in, which is what
	// STREAMED mode sends one message per; 0 means 16 KiB.
	ChunkBytes int
	// Connections is the number of HTTP/2 connections streams are spread over,
	// round-robin, like Envoy's per-worker connections; 0 means 1.
	Connections int
	// TLS is the ext_proc cluster's transport_socket (UpstreamTlsContext): the server's
	// trusted CAs, SNI and, for mTLS, the client certificate. nil means plaintext.
	TLS *tls.Config
}

func (cfg FilterConfig) normalize() (FilterConfig, *checker, error) {
	if cfg.ProcessingMode == nil {
		cfg.ProcessingMode = &extprocfilterv3.ProcessingMode{}
	}
	for _, m := range []extprocfilterv3.ProcessingMode_BodySendMode{cfg.ProcessingMode.GetRequestBodyMode(), cfg.ProcessingMode.GetResponseBodyMode()} {
		if !bodyModeSupported(m) {
			return cfg, nil, fmt.Errorf("%w: %s", errUnsupported, m)
		}
	}
	if cfg.MessageTimeout <= 0 {
		cfg.MessageTimeout = 200 * time.Millisecond
	}
	if cfg.StatusOnError == 0 {
		cfg.StatusOnError = 500
	}
	if cfg.MaxBufferBytes <= 0 {
		cfg.MaxBufferBytes = 1 << 20
	}
	if cfg.ChunkBytes <= 0 {
		cfg.ChunkBytes = 16 << 10
	}
	if cfg.Connections <= 0 {
		cfg.Connections = 1
	}
	c, err := newChecker(cfg.MutationRules, cfg.DisallowIsError)
	if err != nil {
		return cfg, nil, err
	}
	return cfg, c, nil
}

func bodyModeSupported(m extprocfilterv3.ProcessingMode_BodySendMode) bool {
	switch m {
	case extprocfilterv3.ProcessingMode_NONE, extprocfilterv3.ProcessingMode_BUFFERED,
		extprocfilterv3.ProcessingMode_STREAMED, extprocfilterv3.ProcessingMode_BUFFERED_PARTIAL:
		return true
	}
	return false
}

// Request is the downstream HTTP request.
type Request struct {
	// Method, Path, Authority and Scheme become the pseudo-headers; empty ones default
	// to GET, /, example.com and http. A "host" header fills an empty Authority and is
	// then dropped, as Envoy's codecs do.
	Method, Path, Authority, Scheme string
	// Headers may repeat a key; keys are lowercased. Nothing is added: Envoy's
	// connection manager would add x-request-id and x-forwarded-proto, so put them here
	// when a test needs them.
	Headers [][2]string
	// Body is the request body; empty means the headers end the stream unless there are
	// trailers.
	Body []byte
	// Trailers are request trailers.
	Trailers [][2]string
	// Attributes holds the values of attribute expressions, keyed by expression text,
	// e.g. {"xds.route_name": "r1"}. Only expressions listed in the filter config are
	// sent; a listed expression without a value here is omitted, as a failed
	// expression is. Values are sent as string_value.
	Attributes map[string]string
}

// Response is what the upstream answers.
type Response struct {
	Status   int // 0 means 200
	Headers  [][2]string
	Body     []byte
	Trailers [][2]string
}

// Upstream is the upstream service. It sees the request after the filter's mutations.
// A nil *Response means 200 with no headers and no body; a nil Upstream answers that too.
// It runs on its own goroutine and must return.
type Upstream func(fwd *Forwarded) *Response

// Forwarded is the request as it reached the upstream.
type Forwarded struct {
	Method, Path, Authority, Scheme string
	Headers                         [][2]string // without pseudo-headers
	Body                            []byte
	Trailers                        [][2]string
}

// Result is the outcome of one HTTP exchange.
type Result struct {
	// Status, Headers (without :status), Body and Trailers are what the downstream
	// client receives.
	Status   int
	Headers  [][2]string
	Body     []byte
	Trailers [][2]string
	// Forwarded is nil if the request never reached the upstream.
	Forwarded *Forwarded
	// LocalReply is true when Envoy generated the response: an immediate_response, an
	// ext_proc failure, or a buffer overflow.
	LocalReply bool
	// Details is Envoy's response code details: DetailsViaUpstream for an upstream
	// response, the server's ImmediateResponse.details (whitespace turned into '_') for an
	// immediate response, or one of the Details* constants or a rejected mutation's
	// message (again with '_' for whitespace) for an error.
	Details string
	// ImmediateResponse is the server's immediate_response when it produced the reply.
	ImmediateResponse *extprocv3.ImmediateResponse
	// Sent is every message sent on the ext_proc stream, in order; Received is every
	// reply read from it, in order. Both are empty when no stream was opened.
	Sent     []*extprocv3.ProcessingRequest
	Received []*extprocv3.ProcessingResponse
}

// Client plays one Envoy ext_proc filter. It is safe for concurrent use; each Do is one
// HTTP request with its own Process stream, multiplexed on shared HTTP/2 connections.
type Client struct {
	cfg     FilterConfig
	checker *checker
	conns   []*grpc.ClientConn
	procs   []extprocv3.ExternalProcessorClient
	next    atomic.Uint64
}

// Dial prepares a client for the ext_proc server at target ("host:port" or
// "unix:///path"), with TLS when cfg.TLS is set, else insecure transport credentials. Connections are made lazily;
// opts are appended to the client's own options.
func Dial(target string, cfg FilterConfig, opts ...grpc.DialOption) (*Client, error) {
	norm, chk, err := cfg.normalize()
	if err != nil {
		return nil, err
	}
	creds := insecure.NewCredentials()
	if norm.TLS != nil {
		creds = credentials.NewTLS(norm.TLS)
	}
	dialOpts := append([]grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		// Envoy puts no 4 MiB cap on ext_proc messages in either direction.
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32), grpc.MaxCallSendMsgSize(math.MaxInt32)),
	}, opts...)
	c := &Client{cfg: norm, checker: chk}
	for i := 0; i < norm.Connections; i++ {
		cc, err := grpc.NewClient(target, dialOpts...)
		if err != nil {
			_ = c.Close()
			return nil, err
		}
		c.conns = append(c.conns, cc)
		c.procs = append(c.procs, extprocv3.NewExternalProcessorClient(cc))
	}
	return c, nil
}

// Close closes the client's connections.
func (c *Client) Close() error {
	var first error
	for _, cc := range c.conns {
		if err := cc.Close(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

func (c *Client) pick() extprocv3.ExternalProcessorClient {
	return c.procs[(c.next.Add(1)-1)%uint64(len(c.procs))]
}

// Do runs one HTTP exchange through the filter. Failures Envoy handles (the stream
// cannot be opened, fails, times out, or answers wrongly) are reported in the Result as
// Envoy would answer the client. An error means the exchange could not be played: ctx
// ended, or the server switched a body to a mode this package does not support.
func (c *Client) Do(ctx context.Context, req *Request, upstream Upstream) (*Result, error) {
	if req == nil {
		req = &Request{}
	}
	x := newExchange(ctx, c, req, upstream)
	return x.run()
}
