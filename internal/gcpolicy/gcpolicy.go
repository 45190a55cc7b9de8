// Package gcpolicy gives the Go collector more room while the process
// allocates fast and its live heap is small, and Go's own policy
// otherwise.
//
// Go's default (GOGC=100) lets the heap grow to twice what the last
// collection found live, and at least to 4 MiB. A proxy with few sessions
// open but many logins therefore collects many times a second: a login
// allocates about 70 KiB, mostly in crypto/tls, so 200 logins a second
// over a live heap of 4 MiB is a collection every 20 logins or so, each
// with its fixed costs (the mark workers and their wake-ups, the sweep).
// Measured on the bench machine: GOGC=800 cut imapgate's CPU per login by
// 4-10%.
//
// A larger GOGC for good would cost memory where it matters most: 9,000
// idle sessions (about 16 MiB live) would keep a heap goal, and so an
// RSS, well above Go's default. The Tuner instead looks at the allocation
// rate every second and sets GOGC so that the next collection is about
// Period away at that rate: the heap goal is the live heap plus
// rate × Period, at least what Go's default gives and at most the live
// heap plus MaxHeadroom. GOGC is not that goal itself: Go multiplies it
// with the live heap and the stacks and globals it scans, and it scales
// its 4 MiB minimum heap by it too (GOGC=2400 means a goal of at least
// 96 MiB however small the heap), so Percent works back from the goal
// through both. A burst of logins gets the room; once
// the process is quiet (idle sessions), GOGC goes back to 100 within a
// second, and the heap goal with it. The memory the burst's heap grew
// into is then given back to the kernel at once (debug.FreeOSMemory: one
// collection and a scavenge per burst, after any raise): left to the runtime's background
// scavenger, it came back only gradually, and 9,000 idle sessions opened
// at 250 a second kept 0.8 KiB more RSS each 20 s later.
//
// A process whose live heap is small (below MaxHeadroom/4, 8 MiB by
// default: a few hundred sessions) keeps its last burst's room instead,
// and so the memory the burst grew into, until its live heap grows past
// that: giving back 30 MiB that the next burst faults in again cost a
// login-rate benchmark 6 to 11 page faults a login (BENCHMARKS.md,
// session 10), where HAProxy has none, for an RSS that matters to no one
// (at most MaxHeadroom more than a quiet process with few sessions would
// have). Memory per idle session matters with many sessions, and there
// the live heap is large and the burst's heap is given back as above.
//
// It stays out of the way of an operator who chose: with GOGC or
// GOMEMLIMIT in the environment, Start does nothing.
package gcpolicy

import (
	"os"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"time"
)

// Options configure a Tuner. The zero value is the defaults.
type Options struct {
	// MaxHeadroom bounds the room above the live heap, and so the memory
	// the Tuner may add to Go's policy. Zero means DefaultMaxHeadroom;
	// negative turns the Tuner off (Go's own policy).
	MaxHeadroom int64
	// Period is the time between collections the Tuner aims at while
	// the process allocates fast. Zero means 2 s.
	Period time.Duration

	every time.Duration // how often the rate is read; zero: 1 s (tests)
}

// DefaultMaxHeadroom is Options.MaxHeadroom's zero value.
const DefaultMaxHeadroom = 32 << 20

// maxPercent bounds GOGC for a nearly empty heap.
const maxPercent = 10000

// Tuner sets GOGC from the allocation rate; see the package comment.
type Tuner struct {
	o      Options
	stop   chan struct{}
	done   chan struct{}
	once   sync.Once
	sample []metrics.Sample

	// The tuning goroutine's own.
	room      uint64 // the headroom kept over a small live heap (keepLive)
	percent   int
	peak      int // the highest percent since the last freeOS
	freedAt   time.Time
	lastAlloc uint64
	lastAt    time.Time
}

// Chosen reports whether the environment sets the collector's policy
// (GOGC or GOMEMLIMIT), in which case Start leaves it alone.
func Chosen() bool {
	_, gogc := os.LookupEnv("GOGC")
	_, limit := os.LookupEnv("GOMEMLIMIT")
	return gogc || limit
}

// Start returns a running Tuner, or nil if it is off
// (Options.MaxHeadroom negative, or Chosen).
func Start(o Options) *Tuner {
	if o.MaxHeadroom == 0 {
		o.MaxHeadroom = DefaultMaxHeadroom
	}
	if o.Period <= 0 {
		o.Period = 2 * time.Second
	}
	if o.every <= 0 {
		o.every = time.Second
	}
	if o.MaxHeadroom < 0 || Chosen() {
		return nil
	}
	t := &Tuner{o: o, stop: make(chan struct{}), done: make(chan struct{}), percent: 100,
		sample: []metrics.Sample{{Name: "/gc/heap/allocs:bytes"}, {Name: "/gc/heap/live:bytes"},
			{Name: "/gc/scan/stack:bytes"}, {Name: "/gc/scan/globals:bytes"}}}
	metrics.Read(t.sample)
	for _, s := range t.sample {
		if s.Value.Kind() != metrics.KindUint64 {
			return nil // a Go without these metrics: leave its policy
		}
	}
	t.lastAlloc, t.lastAt = t.sample[0].Value.Uint64(), time.Now()
	go t.run() // goroutine "gcpolicy"
	return t
}

// Stop ends the tuning and gives Go's default (GOGC=100) back.
func (t *Tuner) Stop() {
	if t == nil {
		return
	}
	t.once.Do(func() { close(t.stop) })
	<-t.done
}

func (t *Tuner) run() {
	defer close(t.done)
	defer debug.SetGCPercent(100)
	tick := time.NewTicker(t.o.every)
	defer tick.Stop()
	for {
		select {
		case <-t.stop:
			return
		case now := <-tick.C:
			t.tune(now)
		}
	}
}

// tune reads the allocation rate since the last tick and sets GOGC.
func (t *Tuner) tune(now time.Time) {
	metrics.Read(t.sample)
	alloc, live := t.sample[0].Value.Uint64(), t.sample[1].Value.Uint64()
	roots := t.sample[2].Value.Uint64() + t.sample[3].Value.Uint64()
	dt := now.Sub(t.lastAt).Seconds()
	if dt <= 0 {
		return
	}
	rate := float64(alloc-t.lastAlloc) / dt
	t.lastAlloc, t.lastAt = alloc, now
	room := Headroom(rate, t.o.Period, uint64(t.o.MaxHeadroom))
	if live < uint64(t.o.MaxHeadroom)/4 {
		// A small heap keeps its largest room: see the package comment.
		room = max(room, t.room)
		t.room = room
	} else {
		t.room = 0
	}
	p := Percent(live, roots, room)
	// Only worth a change of a tenth or more, or back to the default.
	if p != t.percent && (p == 100 || p*10 > t.percent*11 || p*11 < t.percent*10) {
		debug.SetGCPercent(p)
		t.percent = p
	}
	t.peak = max(t.peak, t.percent)
	// Any raise counts: it let the heap grow past Go's own goal (over a
	// 16 MiB live heap the raise is to about 177, where a GOGC bound of
	// 200 once missed the 9,000 idle sessions' opening burst).
	if t.percent == 100 && t.peak > 100 && now.Sub(t.freedAt) >= freeEvery {
		// A burst is over: at most once per freeEvery, so that a rate
		// hovering about the threshold does not collect for it (a burst
		// that ends sooner is given back on a later tick).
		freeOS()
		t.freedAt, t.peak = now, 100
	}
	tuned()
}

// tuned is called after every tick; tests count them.
var tuned = func() {}

// freeOS gives the heap a burst grew into back to the kernel; tests
// count the calls.
var freeOS = debug.FreeOSMemory

// freeEvery is the least time between two of them.
const freeEvery = 10 * time.Second

// Headroom is the room above the live heap for a collection every period
// at rate bytes a second, at most max.
func Headroom(rate float64, period time.Duration, max uint64) uint64 {
	h := rate * period.Seconds()
	if h >= float64(max) {
		return max
	}
	return uint64(h)
}

// heapMinimum is the runtime's smallest heap goal at GOGC=100 (its
// defaultHeapMinimum); at GOGC=p it is heapMinimum×p/100.
const heapMinimum = 4 << 20

// Percent is the GOGC that puts the heap goal at live plus headroom, or at
// Go's default if that is more: roots is what the collector scans besides
// the heap (stacks and globals), which Go's goal grows with GOGC as well:
//
//	goal = max(live + (live+roots)×GOGC/100, heapMinimum×GOGC/100)
//
// Rounded down, so that the goal stays within live plus headroom.
func Percent(live, roots, headroom uint64) int {
	if headroom == 0 {
		return 100
	}
	byScan := headroom * 100 / max(live+roots, 1)
	byMinimum := (live + headroom) * 100 / heapMinimum
	return int(min(max(min(byScan, byMinimum), 100), maxPercent))
}
