package gcpolicy

import (
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync/atomic"
	"testing"
	"time"
)

func TestPercent(t *testing.T) {
	for _, tc := range []struct {
		live, headroom uint64
		want           int
	}{
		{0, 32 << 20, maxPercent},
		{1 << 10, 32 << 20, maxPercent}, // nearly empty: bounded
		{4 << 20, 32 << 20, 800},        // goal 36 MiB
		{3 << 20, 32 << 20, 1067},       // rounded up: goal ≥ live + headroom
		{32 << 20, 32 << 20, 100},       // Go's default from here on
		{300 << 20, 32 << 20, 100},
		{16 << 20, 0, 100}, // quiet: Go's default
	} {
		if got := Percent(tc.live, tc.headroom); got != tc.want {
			t.Errorf("Percent(%d, %d) = %d, want %d", tc.live, tc.headroom, got, tc.want)
		}
	}
}

func TestHeadroom(t *testing.T) {
	for _, tc := range []struct {
		rate float64
		want uint64
	}{
		{0, 0},
		{1 << 20, 2 << 20},   // 1 MiB/s: two seconds' worth
		{15 << 20, 30 << 20}, // 200 logins/s
		{70 << 20, 32 << 20}, // 1,000 logins/s: bounded
	} {
		if got := Headroom(tc.rate, 2*time.Second, 32<<20); got != tc.want {
			t.Errorf("Headroom(%v) = %d, want %d", tc.rate, got, tc.want)
		}
	}
}

func gogc() int {
	s := []metrics.Sample{{Name: "/gc/gogc:percent"}}
	metrics.Read(s)
	return int(s[0].Value.Uint64())
}

var sink []byte

// TestTunerFollowsAllocation: while the process allocates fast over a
// small live heap, GOGC rises; once it is quiet, GOGC is back to 100;
// Stop leaves 100 too.
func TestTunerFollowsAllocation(t *testing.T) {
	if Chosen() {
		t.Skip("GOGC or GOMEMLIMIT is set in the environment: the Tuner stays off by design")
	}
	var freed atomic.Int32
	freeOS = func() { freed.Add(1) }
	defer func() { freeOS = debug.FreeOSMemory }()
	tu := Start(Options{every: 20 * time.Millisecond})
	if tu == nil {
		t.Fatal("Start returned nil")
	}
	defer tu.Stop()
	deadline := time.Now().Add(10 * time.Second)
	for gogc() <= 200 {
		if time.Now().After(deadline) {
			t.Fatalf("allocating fast, GOGC stayed %d", gogc())
		}
		for range 64 {
			sink = make([]byte, 64<<10) // about 100 MiB/s and more
		}
		runtime.Gosched()
	}
	if p := gogc(); p > maxPercent {
		t.Fatalf("GOGC %d above the bound", p)
	}
	sink = nil
	for gogc() != 100 {
		if time.Now().After(deadline) {
			t.Fatalf("quiet, GOGC stayed %d", gogc())
		}
		time.Sleep(5 * time.Millisecond) // quiet is what is tested: no allocation
	}
	tu.Stop()
	if p := gogc(); p != 100 {
		t.Fatalf("after Stop GOGC = %d, want 100", p)
	}
	if n := freed.Load(); n != 1 {
		t.Fatalf("memory given back %d times after one burst, want once (at most once per %v)", n, freeEvery)
	}
}

func TestOff(t *testing.T) {
	if tu := Start(Options{MaxHeadroom: -1}); tu != nil {
		tu.Stop()
		t.Fatal("negative headroom: want no Tuner")
	}
	t.Setenv("GOGC", "200")
	if tu := Start(Options{}); tu != nil {
		tu.Stop()
		t.Fatal("GOGC set: want no Tuner")
	}
}
