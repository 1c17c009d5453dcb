package kernel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/flowctl"
	"github.com/policy-engine/policy-engine/internal/rawio"
	"github.com/policy-engine/policy-engine/internal/uds"
	// Marshals the agent API and ext_proc messages without reflection.
	_ "github.com/policy-engine/policy-engine/internal/vtcodec"
)

// AgentClient is how the kernel talks to one policy-agent. The transport behind it (a unary
// RPC per call, or long-lived multiplexed streams) is the client's business.
type AgentClient interface {
	// Execute runs one chain. An error wrapping ErrNotDelivered means the request never
	// reached the agent, so no policy ran and a retry is safe. Execute must not keep req, or
	// anything it points to, after it returns: the kernel reuses them for the stream's next
	// phase and for the next stream.
	Execute(ctx context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error)
	GetAgentConfig(ctx context.Context) (*agentv1.GetAgentConfigResponse, error)
	// Check asks the agent's gRPC health service.
	Check(ctx context.Context) error
	Close() error
}

// chainValidator is an AgentClient that can ask its agent to build chain entries the way it
// will run them (ValidateChains). Its answer has one message per entry, in order: "" when the
// entry builds, else why not; and, from agents that report them, the entries' facts. An agent
// that predates the call answers codes.Unimplemented.
type chainValidator interface {
	ValidateChains(ctx context.Context, entries []*agentv1.ChainEntry) (*agentv1.ValidateChainsResponse, error)
}

// timeoutExecutor is an AgentClient that takes a call's timeout as a duration, which saves the
// derived context on the hot path.
type timeoutExecutor interface {
	ExecuteTimeout(ctx context.Context, req *agentv1.PolicyRequest, timeout time.Duration) (*agentv1.PolicyResponse, error)
}

// ErrNotDelivered marks an agent call that failed before the agent could see it.
var ErrNotDelivered = errors.New("request not delivered to the agent")

// grpcAgentClient keeps a fixed pool of connections to an agent's Unix socket and spreads
// calls over them round-robin. Connections reconnect by themselves with a short backoff, so an
// agent that comes back is used again within a second.
type grpcAgentClient struct {
	conns  []*grpc.ClientConn
	agents []agentv1.PolicyAgentClient
	next   atomic.Uint32
}

// dialAgent opens n connections to the agent at socketPath. Connecting is lazy: a missing
// agent is not an error here.
func dialAgent(socketPath string, n int, maxMsg int) (*grpcAgentClient, error) {
	c := &grpcAgentClient{}
	path := uds.Path(socketPath)
	target := "unix://" + path
	// Connections that read and write without waking the runtime's monitor thread.
	dial := func(ctx context.Context, _ string) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", path)
		if err != nil {
			return nil, err
		}
		return rawio.Wrap(c), nil
	}
	for i := 0; i < n; i++ {
		conn, err := grpc.NewClient(target, append(flowctl.DialOptions(),
			grpc.WithContextDialer(dial),
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithConnectParams(grpc.ConnectParams{
				Backoff:           backoff.Config{BaseDelay: 50 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
				MinConnectTimeout: time.Second,
			}),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMsg), grpc.MaxCallSendMsgSize(maxMsg)),
		)...)
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("dial agent at %q: %w", socketPath, err)
		}
		conn.Connect()
		c.conns = append(c.conns, conn)
		c.agents = append(c.agents, agentv1.NewPolicyAgentClient(conn))
	}
	return c, nil
}

// dialStreamAgent opens the connections to an agent and runs its calls over long-lived
// streams, stuck sends given up after the agent's timeout. Each new stream learns the agent's
// policy set before a call goes out on it; onLearn (if set) hears of a set that changed.
func dialStreamAgent(ac AgentConfig, maxMsg int, onLearn func(AgentClient, *agentv1.GetAgentConfigResponse)) (*streamAgentClient, error) {
	u, err := dialAgent(ac.SocketPath, ac.Connections, maxMsg)
	if err != nil {
		return nil, err
	}
	c := newStreamAgentClient(u, time.Duration(ac.TimeoutMS)*time.Millisecond)
	c.verify = true
	c.onLearn = onLearn
	return c, nil
}

func (c *grpcAgentClient) pick() int {
	return int(c.next.Add(1) % uint32(len(c.conns)))
}

func (c *grpcAgentClient) Execute(ctx context.Context, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
	return c.executeOn(ctx, c.pick(), req)
}

// executeOn runs a unary Execute on connection i.
func (c *grpcAgentClient) executeOn(ctx context.Context, i int, req *agentv1.PolicyRequest) (*agentv1.PolicyResponse, error) {
	// A call on a connection that is not ready when it starts can only fail before the
	// agent reads it; on a ready connection an Unavailable error may come after delivery.
	wasReady := c.conns[i].GetState() == connectivity.Ready
	resp, err := c.agents[i].Execute(ctx, req)
	if err != nil && !wasReady && status.Code(err) == codes.Unavailable {
		return nil, fmt.Errorf("%w: %w", ErrNotDelivered, err)
	}
	if err == nil {
		err = checkReplyUTF8(resp)
	}
	return resp, err
}

func (c *grpcAgentClient) GetAgentConfig(ctx context.Context) (*agentv1.GetAgentConfigResponse, error) {
	return c.agents[c.pick()].GetAgentConfig(ctx, &agentv1.GetAgentConfigRequest{})
}

// ValidateChains asks the agent to build chain entries; see chainValidator.
func (c *grpcAgentClient) ValidateChains(ctx context.Context, entries []*agentv1.ChainEntry) (*agentv1.ValidateChainsResponse, error) {
	// The agent answered GetAgentConfig on some connection; this one may still be waiting out a
	// dial that failed before the agent was up. Wait for it within ctx rather than fail at once.
	return c.agents[c.pick()].ValidateChains(ctx, &agentv1.ValidateChainsRequest{Entries: entries}, grpc.WaitForReady(true))
}

func (c *grpcAgentClient) Check(ctx context.Context) error {
	resp, err := healthpb.NewHealthClient(c.conns[c.pick()]).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		return err
	}
	if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("agent reports %s", resp.GetStatus())
	}
	return nil
}

func (c *grpcAgentClient) Close() error {
	var errs []error
	for _, conn := range c.conns {
		errs = append(errs, conn.Close())
	}
	return errors.Join(errs...)
}

var (
	_ AgentClient    = (*grpcAgentClient)(nil)
	_ chainValidator = (*grpcAgentClient)(nil)
)
