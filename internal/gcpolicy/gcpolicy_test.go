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
	const mib = 1 << 20
	for _, tc := range []struct {
		live, roots, headroom uint64
		want                  int
	}{
		// A small heap: the minimum heap, scaled by GOGC, is the goal.
		{0, 0, 32 * mib, 800},             // goal 32 MiB: 4 MiB × 8
		{1 * mib, 1 * mib, 32 * mib, 825}, // goal 33 MiB (live + headroom), not 2×16 MiB = 64
		{1 << 10, 0, 32 * mib, 800},
		// A larger one: live and roots times GOGC.
		{16 * mib, 2 * mib, 32 * mib, 177}, // goal 16 + 18×1.77 = 47.9 MiB
		{4 * mib, 0, 32 * mib, 800},        // goal 36 MiB either way
		{3 * mib, 1 * mib, 32 * mib, 800},  // goal max(3 + 4×8, 4×8) = 35 MiB
		{32 * mib, 0, 32 * mib, 100},       // Go's default from here on
		{300 * mib, 0, 32 * mib, 100},
		{16 * mib, 0, 0, 100}, // quiet: Go's default
		{0, 0, 1 << 40, maxPercent},
	} {
		if got := Percent(tc.live, tc.roots, tc.headroom); got != tc.want {
			t.Errorf("Percent(%d, %d, %d) = %d, want %d", tc.live, tc.roots, tc.headroom, got, tc.want)
		}
	}
}

// goal is Go's heap goal for GOGC=p, as the runtime computes it
// (mgcpacer.go's commit): the model Percent inverts.
func goal(live, roots uint64, p int) uint64 {
	return max(live+(live+roots)*uint64(p)/100, heapMinimum*uint64(p)/100)
}

// FuzzPercentBoundsGoal: whatever the heap, the goal Percent leads to is
// at most live plus headroom, unless that is less than Go's default goal.
func FuzzPercentBoundsGoal(f *testing.F) {
	f.Add(uint64(1<<20), uint64(1<<20), uint64(32<<20))
	f.Add(uint64(16<<20), uint64(2<<20), uint64(32<<20))
	f.Fuzz(func(t *testing.T, live, roots, headroom uint64) {
		live, roots, headroom = live%(1<<34), roots%(1<<30), headroom%(1<<34)
		p := Percent(live, roots, headroom)
		if p < 100 || p > maxPercent {
			t.Fatalf("Percent = %d out of [100, %d]", p, maxPercent)
		}
		if g := goal(live, roots, p); p > 100 && g > live+headroom {
			t.Fatalf("Percent(%d, %d, %d) = %d: goal %d above live + headroom %d", live, roots, headroom, p, g, live+headroom)
		}
	})
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
	return int(read("/gc/gogc:percent"))
}

func read(name string) uint64 {
	s := []metrics.Sample{{Name: name}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

var sink []byte

// countFreeOS skips the test where the Tuner is off by design, and counts
// the Tuner's freeOS calls for the rest of it instead of making them.
func countFreeOS(t *testing.T) *atomic.Int32 {
	t.Helper()
	if Chosen() {
		t.Skip("GOGC or GOMEMLIMIT is set in the environment: the Tuner stays off by design")
	}
	var freed atomic.Int32
	freeOS = func() { freed.Add(1) }
	t.Cleanup(func() { freeOS = debug.FreeOSMemory })
	return &freed
}

// startAndAllocate starts a Tuner that reads every 20 ms and allocates
// fast (about 100 MiB/s and more) until GOGC is above above; the deadline
// it returns bounds the rest of the test.
func startAndAllocate(t *testing.T, above int) (*Tuner, time.Time) {
	t.Helper()
	tu := Start(Options{every: 20 * time.Millisecond})
	if tu == nil {
		t.Fatal("Start returned nil")
	}
	deadline := time.Now().Add(10 * time.Second)
	for gogc() <= above {
		if time.Now().After(deadline) {
			tu.Stop()
			t.Fatalf("allocating fast, GOGC stayed %d", gogc())
		}
		for range 64 {
			sink = make([]byte, 64<<10)
		}
		runtime.Gosched()
	}
	return tu, deadline
}

// TestTunerFollowsAllocation: while the process allocates fast over a
// small live heap, GOGC rises; once it is quiet, a small heap keeps that
// room (the next burst finds its memory there) and nothing is given back;
// once the live heap is large, GOGC is back to 100 and the burst's heap
// is given back, once; Stop leaves 100.
func TestTunerFollowsAllocation(t *testing.T) {
	freed := countFreeOS(t)
	ticks := countTicks(t)
	tu, deadline := startAndAllocate(t, 200)
	defer tu.Stop()
	if p := gogc(); p > maxPercent {
		t.Fatalf("GOGC %d above the bound", p)
	}
	// The runtime's own goal, not only GOGC, stays within the headroom.
	// (A GOGC computed from the live heap alone put it at 3× the bound:
	// Go scales its 4 MiB minimum heap by GOGC.)
	if g, live := read("/gc/heap/goal:bytes"), read("/gc/heap/live:bytes"); g > live+DefaultMaxHeadroom+2<<20 {
		t.Fatalf("heap goal %d MiB with %d MiB live: above live + the %d MiB headroom", g>>20, live>>20, DefaultMaxHeadroom>>20)
	}
	sink = nil
	raised := gogc()
	for from := ticks.Load(); ticks.Load() < from+10; {
		if time.Now().After(deadline) {
			t.Fatal("the tuner stopped ticking")
		}
		time.Sleep(5 * time.Millisecond) // quiet is what is tested: no allocation
	}
	if p := gogc(); p*10 < raised*9 || freed.Load() != 0 {
		t.Fatalf("quiet over a small heap: GOGC %d (was %d), given back %d times; want the room kept", p, raised, freed.Load())
	}

	held = make([]byte, 3*DefaultMaxHeadroom/8) // a live heap above MaxHeadroom/4
	defer func() { held = nil }()
	runtime.GC()
	for gogc() != 100 || freed.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("quiet over a large heap: GOGC %d, given back %d times", gogc(), freed.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
	tu.Stop()
	if p := gogc(); p != 100 {
		t.Fatalf("after Stop GOGC = %d, want 100", p)
	}
	if n := freed.Load(); n != 1 {
		t.Fatalf("memory given back %d times after one burst, want once (at most once per %v)", n, freeEvery)
	}
}

// countTicks counts the Tuner's ticks for the rest of the test.
func countTicks(t *testing.T) *atomic.Int32 {
	var n atomic.Int32
	tuned = func() { n.Add(1) }
	t.Cleanup(func() { tuned = func() {} })
	return &n
}

var held []byte

// TestTunerFreesAfterSmallRaise: over a large live heap the burst's raise
// is small (GOGC about 130 over 24 MiB live), and the heap it grew into is
// still given back once the process is quiet.
func TestTunerFreesAfterSmallRaise(t *testing.T) {
	freed := countFreeOS(t)
	held = make([]byte, 24<<20)
	defer func() { held = nil }()
	runtime.GC() // the live heap the tuner reads is now about 24 MiB
	tu, deadline := startAndAllocate(t, 100)
	defer tu.Stop()
	if p := gogc(); p >= 200 {
		t.Fatalf("GOGC %d over a 24 MiB live heap: the raise this test needs is below 200", p)
	}
	sink = nil
	for freed.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("quiet after a raise to GOGC > 100, the heap was never given back (GOGC %d)", gogc())
		}
		time.Sleep(5 * time.Millisecond) // quiet is what is tested: no allocation
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
