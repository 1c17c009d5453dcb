package policy

import (
	"context"
	"time"
)

// MinAnswerReserve is the least time AnswerBy leaves between a policy's decision and the
// chain's deadline.
const MinAnswerReserve = 10 * time.Millisecond

// AnswerBy returns when a policy that waits on something outside the agent (a key server,
// Redis) must stop waiting and decide without it, by its own rule for a backend that does not
// answer. The kernel stops waiting for the agent at about the chain's deadline and then
// applies the agent's fail_open, so a policy that waits until the deadline itself hands its
// decision to fail_open. AnswerBy leaves half of the time that is left, and at least
// MinAnswerReserve, for the rest of the chain and the answer's way back to the kernel: the
// kernel's clock started before the call was queued and sent, and on a loaded machine that part
// and the way back can take tens of milliseconds, which the agent's deadline does not see.
//
// ok is false when ctx has no deadline. The time may already have passed: the policy then
// decides at once.
func AnswerBy(ctx context.Context) (t time.Time, ok bool) {
	d, ok := ctx.Deadline()
	if !ok {
		return time.Time{}, false
	}
	return d.Add(-max(time.Until(d)/2, MinAnswerReserve)), true
}
