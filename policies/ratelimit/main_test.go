package ratelimit

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests when any goroutine outlives them: the stores' clocks and
// the Redis clients must stop when their last factory closes.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
