package bench

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/testenv"
)

// TestLoadChurn holds many live IDLE sessions through imapgate while
// logins churn at a target rate, kills the backend and starts it again in
// the middle, sends SIGHUP, then closes everything and checks that nothing
// leaked: no session, descriptor or goroutine beyond the idle level, every
// session ended with its summary line, and the heap back at the idle level
// it had after a warm-up round of as many sessions. It
// skips unless IMAPGATE_LOAD=1; figures go to the test log (BENCHMARKS.md
// quotes a run).
//
//	IMAPGATE_LOAD_SESSIONS  live IDLE sessions (9000)
//	IMAPGATE_LOAD_OPEN_RATE sessions opened per second (250)
//	IMAPGATE_LOAD_LOGINS    target churn, logins per second (1000)
//	IMAPGATE_LOAD_WORKERS   churn clients (64)
//	IMAPGATE_LOAD_DURATION  length of the churn (60s)
func TestLoadChurn(t *testing.T) {
	if os.Getenv("IMAPGATE_LOAD") != "1" {
		t.Skip("load run: set IMAPGATE_LOAD=1")
	}
	testenv.Need(t, "dovecot")
	sessions := envInt(t, "IMAPGATE_LOAD_SESSIONS", 9000)
	openRate := envInt(t, "IMAPGATE_LOAD_OPEN_RATE", 250)
	loginRate := envInt(t, "IMAPGATE_LOAD_LOGINS", 1000)
	workers := envInt(t, "IMAPGATE_LOAD_WORKERS", 64)
	duration := envDuration(t, "IMAPGATE_LOAD_DURATION", 60*time.Second)
	ctx := context.Background()

	raiseInotify(t, 65536)
	d, creds := startBenchDovecot(t)
	dir := t.TempDir()
	bin, commit := buildImapgate(t, dir, os.Getenv("IMAPGATE_BENCH_REV"))
	addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	httpAddr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	conf := filepath.Join(dir, "imapgate.toml")
	text := strings.Replace(imapgateConfig(addr, d.Addr, d.CA.ServerCertFile, d.CA.ServerKeyFile, filepath.Join(dir, "ticket-keys.json")),
		"[http]\naddr = \"off\"", fmt.Sprintf("[http]\naddr = %q", httpAddr), 1)
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	logFile := filepath.Join(dir, "imapgate.log")
	ig := startServer(t, "imapgate", addr, logFile, d.CA, bin, "-config", conf)
	p := ig.proc()
	metrics := func() map[string]float64 { return scrape(t, "http://"+httpAddr+"/metrics") }
	dialer := Dialer{Addr: addr, Security: ImplicitTLS, TLS: &tls.Config{RootCAs: d.CA.Pool, ServerName: "localhost"}}

	// Idle level: after the start-up probe's session has ended.
	waitMetric(t, metrics, "imapgate_sessions", 0, 10*time.Second)
	idle := metrics()
	idleFDs, _ := p.FDs()
	t.Logf("idle: %.0f goroutines, heap in use %.1f MiB, %d descriptors", idle["go_goroutines"], idle["go_memstats_heap_inuse_bytes"]/(1<<20), idleFDs)

	var dials, dialFails atomic.Int64
	dial := func() (*Conn, error) {
		dials.Add(1)
		c, err := dialer.Dial(ctx)
		if err != nil {
			dialFails.Add(1)
		}
		return c, err
	}

	// Live sessions, opened at openRate; refill keeps them at the target.
	var live sync.Map // *Conn → struct{}
	var liveN atomic.Int64
	openOne := func(i int) error {
		c, err := dial()
		if err != nil {
			return err
		}
		cr := creds[i%len(creds)]
		if err := c.Login(cr.User, cr.Pass); err != nil {
			c.Close()
			return err
		}
		if err := c.Idle(); err != nil {
			c.Close()
			return err
		}
		live.Store(c, struct{}{})
		liveN.Add(1)
		// A closed session (the backend went away) is noticed and dropped.
		go func() {
			b := make([]byte, 256)
			for {
				if _, err := c.nc.Read(b); err != nil {
					if _, ok := live.LoadAndDelete(c); ok {
						liveN.Add(-1)
					}
					c.Close()
					return
				}
			}
		}()
		return nil
	}
	fill := func(target int) (opened int, failed int) {
		tick := time.NewTicker(time.Second / time.Duration(openRate))
		defer tick.Stop()
		var wg sync.WaitGroup
		var fails, inflight atomic.Int64
		sem := make(chan struct{}, 32)
		for i := 0; liveN.Load()+inflight.Load() < int64(target) && fails.Load() < int64(target); i++ {
			<-tick.C
			sem <- struct{}{}
			opened++
			inflight.Add(1)
			wg.Go(func() {
				defer func() { <-sem }()
				defer inflight.Add(-1)
				if openOne(i) != nil {
					fails.Add(1)
				}
			})
		}
		wg.Wait()
		return opened, int(fails.Load())
	}
	closeAll := func() {
		live.Range(func(k, _ any) bool { k.(*Conn).Close(); return true })
		if !waitMetric(t, metrics, "imapgate_sessions", 0, 60*time.Second) {
			t.Errorf("sessions left after every client closed: %v", metrics()["imapgate_sessions"])
		}
	}
	// A warm-up round: the process's idle level after it once held every
	// session (maps and pools that keep their size, heap fragmentation)
	// is what it must return to after the run.
	if _, failed := fill(sessions); failed > 0 {
		t.Logf("warm-up: %d of %d sessions failed to open", failed, sessions)
	}
	closeAll()
	warm := settle(t, metrics)
	warmFDs := waitFDs(p, idleFDs+2, 30*time.Second)
	t.Logf("idle after a warm-up round of %d sessions: %.0f goroutines, heap in use %.1f MiB, %d descriptors", sessions, warm["go_goroutines"], warm["go_memstats_heap_inuse_bytes"]/(1<<20), warmFDs)

	t0 := time.Now()
	if _, failed := fill(sessions); failed > 0 {
		t.Logf("%d of %d sessions failed to open", failed, sessions)
	}
	t.Logf("%d live sessions opened in %v", liveN.Load(), time.Since(t0).Round(time.Millisecond))
	full := metrics()
	fullFDs, _ := p.FDs()
	rss, _ := p.RSS()
	t.Logf("with %d live sessions: %.0f goroutines, heap in use %.1f MiB, RSS %.1f MiB, %d descriptors",
		liveN.Load(), full["go_goroutines"], full["go_memstats_heap_inuse_bytes"]/(1<<20), float64(rss)/(1<<20), fullFDs)

	// Churn: login and logout at loginRate, with the backend killed and
	// started again at a third of the way, SIGHUP at two thirds.
	var ok, failed atomic.Int64
	stop := make(chan struct{})
	tokens := make(chan struct{}, workers)
	go func() {
		tick := time.NewTicker(time.Second / time.Duration(loginRate))
		defer tick.Stop()
		for {
			select {
			case <-stop:
				close(tokens)
				return
			case <-tick.C:
				select {
				case tokens <- struct{}{}:
				default: // the workers are behind: the rate is not reached
				}
			}
		}
	}()
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := 0; ; i++ {
				if _, more := <-tokens; !more {
					return
				}
				c, err := dial()
				if err != nil {
					failed.Add(1)
					continue
				}
				cr := creds[(w*7919+i)%len(creds)]
				if err := c.Login(cr.User, cr.Pass); err != nil {
					failed.Add(1)
				} else {
					ok.Add(1)
					c.Command("LOGOUT")
				}
				c.Close()
			}
		})
	}
	cpu0, _ := p.CPU()
	churnStart := time.Now()
	time.Sleep(duration / 3)
	killedAt := liveN.Load()
	d.Stop(t)
	waitFor := func(cond func() bool, timeout time.Duration) bool {
		deadline := time.Now().Add(timeout)
		for !cond() {
			if time.Now().After(deadline) {
				return false
			}
			time.Sleep(100 * time.Millisecond)
		}
		return true
	}
	if !waitFor(func() bool { return liveN.Load() == 0 }, 30*time.Second) {
		t.Errorf("backend killed: %d of %d live sessions still open after 30 s", liveN.Load(), killedAt)
	}
	time.Sleep(2 * time.Second)
	d.Start(t)
	reopened, refillFailed := fill(sessions)
	t.Logf("backend killed with %d live sessions, all closed; started again, %d reopened (%d failed)", killedAt, reopened, refillFailed)
	if rest := duration/3*2 - time.Since(churnStart); rest > 0 {
		time.Sleep(rest)
	}
	if err := ig.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if rest := duration - time.Since(churnStart); rest > 0 {
		time.Sleep(rest)
	}
	close(stop)
	wg.Wait()
	churn := time.Since(churnStart)
	cpu1, _ := p.CPU()
	m := metrics()
	t.Logf("churn for %v: %d logins ok (%.0f/s of %d/s wanted), %d failed (the backend was down for a while); proxy CPU %.0f%% of one core",
		churn.Round(time.Millisecond), ok.Load(), float64(ok.Load())/churn.Seconds(), loginRate, failed.Load(), 100*(cpu1-cpu0).Seconds()/churn.Seconds())
	if v := m[`imapgate_config_reloads_total{result="applied"}`]; v != 1 {
		t.Errorf("SIGHUP: %v applied reloads, want 1", v)
	}
	if liveN.Load() < int64(sessions)*9/10 {
		t.Errorf("%d live sessions at the end of the churn, want about %d", liveN.Load(), sessions)
	}

	// Everything closes: nothing may be left.
	closeAll()
	endFDs := waitFDs(p, idleFDs+2, 30*time.Second)
	end := settle(t, metrics)
	heapIdle := func(h float64) bool { return h <= 1.25*warm["go_memstats_heap_inuse_bytes"]+1<<20 }
	endRSS, _ := p.RSS()
	t.Logf("after: %.0f goroutines (idle %.0f), heap in use %.1f MiB (idle after warm-up %.1f, cold %.1f), RSS %.1f MiB, %d descriptors (idle %d)",
		end["go_goroutines"], idle["go_goroutines"], end["go_memstats_heap_inuse_bytes"]/(1<<20), warm["go_memstats_heap_inuse_bytes"]/(1<<20),
		idle["go_memstats_heap_inuse_bytes"]/(1<<20), float64(endRSS)/(1<<20), endFDs, idleFDs)
	if endFDs > idleFDs+2 {
		t.Errorf("%d descriptors after, %d idle", endFDs, idleFDs)
	}
	if g := end["go_goroutines"]; g > idle["go_goroutines"]+5 {
		t.Errorf("%.0f goroutines after, %.0f idle", g, idle["go_goroutines"])
	}
	if h := end["go_memstats_heap_inuse_bytes"]; !heapIdle(h) {
		t.Errorf("heap in use %.1f MiB after, %.1f MiB idle after the warm-up", h/(1<<20), warm["go_memstats_heap_inuse_bytes"]/(1<<20))
	}
	// One summary line per session: as many as the sessions that ended,
	// which are every connection made (the start-up probe's included).
	ended := end["imapgate_sessions_ended_total"]
	lines := countLines(t, logFile, `"msg":"session end"`)
	t.Logf("%d connections made (%d failed on the client side), %.0f sessions ended, %d summary lines; build %s", dials.Load(), dialFails.Load(), ended, lines, commit)
	if float64(lines) != ended || lines < int(dials.Load()) {
		t.Errorf("%d summary lines for %.0f ended sessions and %d connections", lines, ended, dials.Load())
	}
}

// settle waits until the collector has run twice since it was called
// (with nothing to allocate the runtime forces a cycle every two
// minutes; scraping allocates a little), so that the heap shows what is
// still live, and returns the metrics then.
func settle(t testing.TB, metrics func() map[string]float64) map[string]float64 {
	const gcs = "go_gc_duration_seconds_count"
	m := metrics()
	start := m[gcs]
	for deadline := time.Now().Add(5 * time.Minute); m[gcs] < start+2; {
		if time.Now().After(deadline) {
			t.Errorf("the collector did not run twice in 5 minutes")
			break
		}
		time.Sleep(time.Second)
		m = metrics()
	}
	return m
}

// scrape reads a Prometheus text page into name{labels} → value, and sums
// every metric's series under its bare name.
func scrape(t testing.TB, url string) map[string]float64 {
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if l == "" || l[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		v, err := strconv.ParseFloat(l[i+1:], 64)
		if i < 0 || err != nil {
			continue
		}
		series := l[:i]
		out[series] = v
		if j := strings.IndexByte(series, '{'); j >= 0 {
			out[series[:j]] += v
		}
	}
	return out
}

// waitMetric waits until the metric (summed over its series) is want.
func waitMetric(t testing.TB, metrics func() map[string]float64, name string, want float64, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for metrics()[name] != want {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(200 * time.Millisecond)
	}
	return true
}

func countLines(t testing.TB, path, substr string) int {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		if strings.Contains(sc.Text(), substr) {
			n++
		}
	}
	return n
}
