package auditlog

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if a sink's writer goroutine outlives them: every Close
// must end its goroutine.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
