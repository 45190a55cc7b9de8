package consul

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/imapgate/imapgate/internal/testenv"
	"github.com/imapgate/imapgate/routing/routingtest"
)

// TestScale is the scale benchmark of issue 14 (not a CI test: it needs
// IMAPGATE_SCALE=1, several GB of memory for Consul at 1M keys, and
// minutes). For each size in IMAPGATE_SCALE_USERS (default
// "100000,1000000") it bulk-loads that many placements into a real
// Consul, starts IMAPGATE_SCALE_INSTANCES routers (default 2) with
// session books, and measures:
//
//   - start-up time and Go heap per instance;
//   - moves (Operator.Move on instance 0) of users with a live session on
//     every instance: time until each instance evicted the old session
//     (p50/p99), imapgate CPU and Consul CPU per move;
//   - the same during a storm of IMAPGATE_SCALE_STORM (default 500) first
//     logins per second;
//   - IMAPGATE_SCALE_HERD (default 20) routers started at once.
//
// Results are logged as "SCALE key=value" lines (BENCHMARKS.md).
//
//	IMAPGATE_SCALE=1 go test -run TestScale -timeout 2h -v ./routing/consul/
func TestScale(t *testing.T) {
	if os.Getenv("IMAPGATE_SCALE") == "" {
		t.Skip("the scale benchmark runs with IMAPGATE_SCALE=1")
	}
	sizes := envInts("IMAPGATE_SCALE_USERS", []int{100000, 1000000})
	for _, n := range sizes {
		t.Run(strconv.Itoa(n), func(t *testing.T) { runScale(t, n) })
	}
}

func envInts(name string, def []int) []int {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	var out []int
	for f := range strings.SplitSeq(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err == nil {
			out = append(out, n)
		}
	}
	return out
}

func envInt(name string, def int) int { return envInts(name, []int{def})[0] }

// scaleBook is a session book that reports when a user's sessions are
// evicted.
type scaleBook struct {
	*routingtest.SessionBook
	mu      sync.Mutex
	evicted map[string]chan struct{}
}

func newScaleBook() *scaleBook {
	return &scaleBook{SessionBook: routingtest.NewSessionBook(), evicted: map[string]chan struct{}{}}
}

func (b *scaleBook) watch(user string) <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	ch := make(chan struct{})
	b.evicted[user] = ch
	return ch
}

func (b *scaleBook) EvictUser(user, keep string) int {
	n := b.SessionBook.EvictUser(user, keep)
	if n > 0 {
		b.mu.Lock()
		if ch, ok := b.evicted[user]; ok {
			close(ch)
			delete(b.evicted, user)
		}
		b.mu.Unlock()
	}
	return n
}

func scaleLoad(t *testing.T, client *api.Client, n int) []string {
	names := make([]string, n)
	for i := range n {
		names[i] = fmt.Sprintf("user%07d@example.org", i)
	}
	start := time.Now()
	const workers = 4
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			var ops api.TxnOps
			flush := func() bool {
				ok, resp, _, err := client.Txn().Txn(ops, nil)
				if err != nil || !ok {
					errs <- fmt.Errorf("txn: %v %v", err, resp)
					return false
				}
				ops = ops[:0]
				return true
			}
			for i := w; i < n; i += workers {
				ops = append(ops, &api.TxnOp{KV: &api.KVTxnOp{
					Verb: api.KVSet, Key: "imapgate/users/" + names[i], Value: []byte(fmt.Sprintf("imap%d", i%4)),
				}})
				if len(ops) == 64 && !flush() {
					return
				}
			}
			if len(ops) > 0 {
				flush()
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	t.Logf("SCALE users=%d load_s=%.1f", n, time.Since(start).Seconds())
	return names
}

// consulPid finds the pid of the agent testenv started for c.
func consulPid(c *testenv.Consul) int {
	conf := filepath.Join(filepath.Dir(c.DataDir), "consul.json")
	dirs, _ := os.ReadDir("/proc")
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", d.Name(), "cmdline"))
		if err == nil && strings.Contains(string(b), conf) {
			return pid
		}
	}
	return 0
}

// procCPU is a process's user+system CPU time from /proc/<pid>/stat.
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * (time.Second / 100)
}

func procRSSMB(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for l := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return float64(kb) / 1024
		}
	}
	return 0
}

func selfCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func heapMB() float64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return float64(m.HeapAlloc) / (1 << 20)
}

func pct(d []time.Duration, p int) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*p/100)]
}

func runScale(t *testing.T, n int) {
	ctx := context.Background()
	c := testenv.StartConsul(t)
	client := newAPIClient(t, c.HTTPAddr)
	for i := range 4 {
		err := client.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: fmt.Sprintf("imap%d", i), Name: testService, Address: "127.0.0.1", Port: 1143 + i,
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	names := scaleLoad(t, client, n)
	pid := consulPid(c)
	t.Logf("SCALE users=%d consul_rss_mb=%.0f", n, procRSSMB(pid))

	instances := envInt("IMAPGATE_SCALE_INSTANCES", 2)
	heap0 := heapMB()
	var routers []*Consul
	var books []*scaleBook
	for i := range instances {
		book := newScaleBook()
		start := time.Now()
		r, err := NewConsul(ctx, scaleConfig(c.HTTPAddr, book))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		t.Logf("SCALE users=%d instance=%d start_s=%.2f", n, i, time.Since(start).Seconds())
		routers = append(routers, r)
		books = append(books, book)
	}
	t.Logf("SCALE users=%d heap_per_instance_mb=%.1f self_rss_mb=%.0f", n, (heapMB()-heap0)/float64(instances), procRSSMB(os.Getpid()))

	// Live users: a session on every instance.
	live := envInt("IMAPGATE_SCALE_LIVE", 2000)
	var liveUsers []string
	for k := range live {
		u := names[(k*7919)%n]
		liveUsers = append(liveUsers, u)
		for i, r := range routers {
			b, err := r.Route(ctx, u)
			if err != nil {
				t.Fatal(err)
			}
			b, err = r.Commit(ctx, u, b)
			if err != nil {
				t.Fatal(err)
			}
			books[i].Add(u, b.ID)
		}
	}
	t.Logf("SCALE users=%d live=%d heap_per_instance_mb=%.1f users_in_memory=%d", n, live, (heapMB()-heap0)/float64(instances), routers[0].userCount())

	// Returning users this instance never saw: one read each (feed), or
	// nothing (full watch).
	cold := min(2000, n/2)
	cpu0, ccpu0 := selfCPU(), procCPU(pid)
	t0 := time.Now()
	for k := range cold {
		if _, err := routers[0].Route(ctx, names[n-1-k]); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("SCALE users=%d phase=cold-routes routes=%d us_per_route=%.0f imapgate_cpu_us_per_route=%.0f consul_cpu_us_per_route=%.0f cached=%d",
		n, cold, float64(time.Since(t0).Microseconds())/float64(cold), float64((selfCPU()-cpu0).Microseconds())/float64(cold),
		float64((procCPU(pid)-ccpu0).Microseconds())/float64(cold), routers[0].userCount())

	next := 0
	move := func() []time.Duration {
		u := liveUsers[next%len(liveUsers)]
		next++
		from := books[0].On(u)[0]
		var to string
		for i := range 4 {
			if id := fmt.Sprintf("imap%d", i); id != from {
				to = id
				break
			}
		}
		var chans []<-chan struct{}
		for _, b := range books {
			chans = append(chans, b.watch(u))
		}
		t0 := time.Now()
		mctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		if err := routers[0].Move(mctx, u, to); err != nil {
			t.Errorf("move %s: %v", u, err)
			return nil
		}
		var lat []time.Duration
		for i, ch := range chans {
			select {
			case <-ch:
				lat = append(lat, time.Since(t0))
			case <-mctx.Done():
				t.Errorf("move %s: instance %d did not evict", u, i)
			}
			books[i].Add(u, to)
		}
		return lat
	}

	moves := envInt("IMAPGATE_SCALE_MOVES", 30)
	var lat []time.Duration
	cpu0, ccpu0 = selfCPU(), procCPU(pid)
	for range moves {
		lat = append(lat, move()...)
	}
	cpu, ccpu := selfCPU()-cpu0, procCPU(pid)-ccpu0
	t.Logf("SCALE users=%d phase=moves moves=%d evict_p50_ms=%d evict_p99_ms=%d evict_max_ms=%d imapgate_cpu_ms_per_move_per_instance=%.1f consul_cpu_ms_per_move=%.1f",
		n, moves, pct(lat, 50).Milliseconds(), pct(lat, 99).Milliseconds(), pct(lat, 100).Milliseconds(),
		float64(cpu.Microseconds())/1000/float64(moves)/float64(instances), float64(ccpu.Microseconds())/1000/float64(moves))

	// A storm of first logins, with moves meanwhile.
	rate := envInt("IMAPGATE_SCALE_STORM", 500)
	stormFor := time.Duration(envInt("IMAPGATE_SCALE_STORM_S", 20)) * time.Second
	sctx, stop := context.WithTimeout(ctx, stormFor)
	defer stop()
	var storm sync.WaitGroup
	var logins, failed int
	var smu sync.Mutex
	storm.Go(func() {
		tick := time.NewTicker(time.Second / time.Duration(rate))
		defer tick.Stop()
		sem := make(chan struct{}, 64)
		var wg sync.WaitGroup
		for k := 0; ; k++ {
			select {
			case <-sctx.Done():
				wg.Wait()
				return
			case <-tick.C:
			}
			sem <- struct{}{}
			wg.Go(func() {
				defer func() { <-sem }()
				r := routers[k%len(routers)]
				u := fmt.Sprintf("storm%07d-%d@example.org", k, n)
				b, err := r.Route(ctx, u)
				if err == nil {
					_, err = r.Commit(ctx, u, b)
				}
				smu.Lock()
				logins++
				if err != nil {
					failed++
				}
				smu.Unlock()
			})
		}
	})
	lat = lat[:0]
	stormMoves := 0
	cpu0, ccpu0 = selfCPU(), procCPU(pid)
	t0 = time.Now()
	for sctx.Err() == nil {
		lat = append(lat, move()...)
		stormMoves++
		sleepCtx(sctx, 500*time.Millisecond)
	}
	storm.Wait()
	el := time.Since(t0)
	cpu, ccpu = selfCPU()-cpu0, procCPU(pid)-ccpu0
	t.Logf("SCALE users=%d phase=storm logins=%d failed=%d logins_per_s=%.0f moves=%d evict_p50_ms=%d evict_p99_ms=%d evict_max_ms=%d imapgate_cpu_pct=%.0f consul_cpu_pct=%.0f",
		n, logins, failed, float64(logins)/el.Seconds(), stormMoves, pct(lat, 50).Milliseconds(), pct(lat, 99).Milliseconds(), pct(lat, 100).Milliseconds(),
		100*cpu.Seconds()/el.Seconds(), 100*ccpu.Seconds()/el.Seconds())

	// Start-up herd.
	herd := envInt("IMAPGATE_SCALE_HERD", 20)
	if herd > 0 {
		ccpu0 = procCPU(pid)
		cpu0 = selfCPU()
		t0 := time.Now()
		var wg sync.WaitGroup
		var hmu sync.Mutex
		var starts []time.Duration
		for range herd {
			wg.Go(func() {
				s := time.Now()
				r, err := NewConsul(ctx, scaleConfig(c.HTTPAddr, newScaleBook()))
				if err != nil {
					t.Error(err)
					return
				}
				d := time.Since(s)
				r.Close()
				hmu.Lock()
				starts = append(starts, d)
				hmu.Unlock()
			})
		}
		wg.Wait()
		t.Logf("SCALE users=%d phase=herd instances=%d all_started_s=%.2f start_p50_s=%.2f start_max_s=%.2f imapgate_cpu_s=%.1f consul_cpu_s=%.1f",
			n, herd, time.Since(t0).Seconds(), pct(starts, 50).Seconds(), pct(starts, 100).Seconds(), (selfCPU() - cpu0).Seconds(), (procCPU(pid) - ccpu0).Seconds())
	}
	t.Logf("SCALE users=%d consul_rss_mb=%.0f self_rss_mb=%.0f", n, procRSSMB(pid), procRSSMB(os.Getpid()))
}
