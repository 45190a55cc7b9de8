package consul

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if any goroutine outlives the tests: the
// Consul router's watches must all end in Close, and its HTTP connections
// with them.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
