package ratelimit

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/rs/zerolog"

	"github.com/policy-engine/policy-engine/internal/logging"
)

// go-redis logs events of its own (a failed dial, a Sentinel naming a new master, a cluster
// reloading its slots) by printing plain lines to stderr, one per event, which during an
// outage is one or more a second beside the agent's JSON log. They go to the agent's log
// instead, as debug lines, at most one a second: failures that decide requests are reported
// by the policy itself (redisStore.failed), throttled, at warning level.
func init() {
	redis.SetLogger(goRedisLogger{})
}

// goRedisLog is the logger of the last factory made with one: one agent has one logger.
var goRedisLog atomic.Pointer[logging.Logger]

var goRedisThrottle = logging.NewThrottle(time.Second)

type goRedisLogger struct{}

func (goRedisLogger) Printf(_ context.Context, format string, v ...any) {
	l := goRedisLog.Load()
	if !l.Enabled(zerolog.DebugLevel) || !goRedisThrottle.Allow() {
		return
	}
	if ev := l.Debug(); ev != nil {
		ev.Str("policy", Name).Str("source", "go-redis").Msg(fmt.Sprintf(format, v...))
	}
}
