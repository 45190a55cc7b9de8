package testenv

import (
	"syscall"
	"testing"
	"time"
)

// SelfCPU is the CPU time (user and system) the test process has used so
// far: benchmarks report the proxy's CPU per operation from two readings.
func SelfCPU(b testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
