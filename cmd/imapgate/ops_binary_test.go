package main

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/adminapi"
	"github.com/imapgate/imapgate/internal/testenv"
	"go.uber.org/goleak"
)

// binaryConfig is a config for the built binary: one cleartext listener
// that allows login from loopback, the static router over the given
// backends, no per-IP limit (every test client is 127.0.0.1).
func binaryConfig(imapAddr, httpAddr string, backends map[string]string, shutdown string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `[log]
format = "json"

[[listen]]
addr = %q
mode = "starttls"
name = "imap"
insecure_auth = ["127.0.0.0/8"]

[limits]
auth_failure_delay = "-1s"
max_connections_per_ip = -1

[http]
addr = %q

[shutdown]
%s
`, imapAddr, httpAddr, shutdown)
	for _, id := range slices.Sorted(func(yield func(string) bool) {
		for id := range backends {
			yield(id)
		}
	}) {
		fmt.Fprintf(&b, "\n[backends.%s]\naddr = %q\n", id, backends[id])
	}
	return b.String()
}

// TestSIGTERMDrainsWithReuseportHandoff runs the zero-downtime upgrade:
// instance A holds 500 live sessions; instance B starts on the same port
// (SO_REUSEPORT); SIGTERM to A makes it stop accepting and close its
// sessions spread over the drain window, while B takes every new login;
// A exits 0 within the window plus a margin.
func TestSIGTERMDrainsWithReuseportHandoff(t *testing.T) {
	before := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, before) })
	const (
		sessions = 500
		window   = 3 * time.Second
	)
	bin := opsBinary(t)
	backend := opsBackend(t, "m1", testUsers)
	imapAddr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	httpA := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	httpB := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	dir := t.TempDir()
	confA, confB := filepath.Join(dir, "a.toml"), filepath.Join(dir, "b.toml")
	shutdown := fmt.Sprintf("drain_window = %q\ngrace = \"5s\"", window)
	write(t, confA, binaryConfig(imapAddr, httpA, map[string]string{"m1": backend}, shutdown))
	write(t, confB, binaryConfig(imapAddr, httpB, map[string]string{"m1": backend}, shutdown))

	a := startOps(t, bin, "-config", confA)
	waitHTTP(t, "http://"+httpA+"/readyz", 10*time.Second)

	// 500 logged-in sessions on A, opened 50 at a time.
	users := slices.Sorted(func(yield func(string) bool) {
		for u := range testUsers {
			yield(u)
		}
	})
	clients := make([]*opsClient, sessions)
	var wg sync.WaitGroup
	errs := make(chan error, sessions)
	sem := make(chan struct{}, 50)
	for i := range clients {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			c, err := opsDial(imapAddr, false)
			if err != nil {
				errs <- err
				return
			}
			u := users[i%len(users)]
			if err := c.login(u, testUsers[u]); err != nil {
				c.Close()
				errs <- err
				return
			}
			clients[i] = c
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("opening sessions: %v", err)
	}
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	var sr adminapi.SessionsReply
	getJSON(t, "http://"+httpA+"/admin/sessions?state=spliced", "", &sr)
	if sr.Count != sessions {
		t.Fatalf("A has %d spliced sessions, want %d", sr.Count, sessions)
	}

	b := startOps(t, bin, "-config", confB)
	waitHTTP(t, "http://"+httpB+"/readyz", 10*time.Second)

	closedAt := make([]time.Duration, sessions)
	start := time.Now()
	for i, c := range clients {
		wg.Go(func() {
			if err := c.waitClosed(window + 10*time.Second); err != nil {
				closedAt[i] = -1
				return
			}
			closedAt[i] = time.Since(start)
		})
	}
	a.signal(syscall.SIGTERM)
	a.waitLog(t, 5*time.Second, `"draining"`)
	// "draining" is logged just before A closes its listeners; a
	// connection queued on A's socket at that moment is reset by the
	// kernel (see deploy/README.md on net.ipv4.tcp_migrate_req).
	time.Sleep(200 * time.Millisecond)

	// While A drains, new clients keep logging in: B takes them.
	handoff := 0
	for time.Since(start) < window-500*time.Millisecond {
		c, err := opsDial(imapAddr, false)
		if err != nil {
			t.Fatalf("connect during the drain (after %v): %v", time.Since(start), err)
		}
		if err := c.login("alice@example.org", testUsers["alice@example.org"]); err != nil {
			t.Fatalf("login during the drain (after %v): %v", time.Since(start), err)
		}
		c.Close()
		handoff++
		time.Sleep(100 * time.Millisecond)
	}
	code := a.wait(t, window+10*time.Second)
	exited := time.Since(start)
	wg.Wait()
	if code != 0 {
		t.Fatalf("A exited %d after SIGTERM; log:\n%s", code, a.dump())
	}

	slices.Sort(closedAt)
	if open := slices.IndexFunc(closedAt, func(d time.Duration) bool { return d >= 0 }); open != 0 {
		t.Fatalf("%d sessions were not closed", open)
	}
	first, p50, last := closedAt[0], closedAt[sessions/2], closedAt[sessions-1]
	t.Logf("%d sessions drained: first close %v, median %v, last %v; process exited after %v; %d logins handed to B",
		sessions, first.Round(time.Millisecond), p50.Round(time.Millisecond), last.Round(time.Millisecond),
		exited.Round(time.Millisecond), handoff)
	if last > window+time.Second {
		t.Errorf("last session closed after %v, window %v", last, window)
	}
	// Spread, not a burst: every sixth of the window closes between a
	// quarter and twice its share.
	buckets := make([]int, 6)
	for _, d := range closedAt {
		buckets[min(int(d*6/window), 5)]++
	}
	for _, n := range buckets {
		if n < sessions/6/4 || n > sessions/6*2 {
			t.Errorf("closes per sixth of the window: %v", buckets)
			break
		}
	}
	if handoff < 5 {
		t.Errorf("only %d logins during the drain", handoff)
	}
	a.waitLog(t, time.Second, `"drained"`, fmt.Sprintf(`"closed":%d`, sessions))

	// B served every login made during the drain, and keeps serving.
	metrics := fetchText(t, "http://"+httpB+"/metrics")
	if v, _ := metricValue(metrics, "imapgate_logins_total", `result="ok"`); int(v) != handoff {
		t.Errorf("B counted %v logins, want the %d made during the drain", v, handoff)
	}
	c, err := opsDial(imapAddr, false)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := c.backend("bob@example.org", testUsers["bob@example.org"]); err != nil || got != "m1" {
		t.Errorf("login after A exited: %q %v", got, err)
	}
	c.Close()
	b.signal(syscall.SIGTERM)
	if code := b.wait(t, 15*time.Second); code != 0 {
		t.Errorf("B exited %d", code)
	}
}

// TestSIGHUPKeepsServing: a broken file is refused with a clear log line
// and the old configuration serves on, live sessions untouched; a good
// file is applied and the log says what changed.
func TestSIGHUPKeepsServing(t *testing.T) {
	before := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, before) })
	bin := opsBinary(t)
	m1 := opsBackend(t, "m1", testUsers)
	m2 := opsBackend(t, "m2", testUsers)
	imapAddr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	httpAddr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	conf := filepath.Join(t.TempDir(), "imapgate.toml")
	good := binaryConfig(imapAddr, httpAddr, map[string]string{"m1": m1}, `drain_window = "1s"`)
	write(t, conf, good)
	p := startOps(t, bin, "-config", conf)
	waitHTTP(t, "http://"+httpAddr+"/readyz", 10*time.Second)

	live, err := opsDial(imapAddr, false)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	if b, err := live.backend("alice@example.org", "alicepass"); err != nil || b != "m1" {
		t.Fatalf("login: %q %v", b, err)
	}

	for i, broken := range []string{
		good + "\n[limits\n",                                           // TOML syntax
		good + "\n[routing]\ndefault = [\"nowhere\"]\n",                // validates badly
		strings.Replace(good, `mode = "starttls"`, `mode = "smtp"`, 1), // bad value
	} {
		write(t, conf, broken)
		p.signal(syscall.SIGHUP)
		p.waitLog(t, 5*time.Second, "reload refused, the running configuration stays")
		// Still serving: the live session and a new login.
		if _, err := live.cmd("NOOP"); err != nil {
			t.Fatalf("live session after broken reload %d: %v", i, err)
		}
		c, err := opsDial(imapAddr, false)
		if err != nil {
			t.Fatalf("connect after broken reload %d: %v", i, err)
		}
		if b, err := c.backend("bob@example.org", testUsers["bob@example.org"]); err != nil || b != "m1" {
			t.Fatalf("login after broken reload %d: %q %v", i, b, err)
		}
		c.Close()
		p.mu.Lock()
		p.logs = nil // the next wait must see the next refusal
		p.mu.Unlock()
	}
	metrics := fetchText(t, "http://"+httpAddr+"/metrics")
	if v, _ := metricValue(metrics, "imapgate_config_reloads_total", `result="refused"`); v != 3 {
		t.Errorf("imapgate_config_reloads_total{refused} = %v, want 3", v)
	}

	// A good change: a second backend for bob only, and a log level.
	next := strings.Replace(binaryConfig(imapAddr, httpAddr, map[string]string{"m1": m1, "m2": m2}, `drain_window = "1s"`),
		"[log]\n", "[log]\nlevel = \"debug\"\n", 1) + "\n[routing]\ndefault = [\"m1\"]\n[routing.users]\n\"bob@example.org\" = \"m2\"\n"
	write(t, conf, next)
	p.signal(syscall.SIGHUP)
	line := p.waitLog(t, 5*time.Second, "reload applied")
	for _, k := range []string{"log.level", "backends.m2.addr", "routing.default", `routing.users.\"bob@example.org\"`} {
		if !strings.Contains(line, k) {
			t.Errorf("reload line lacks %s: %s", k, line)
		}
	}
	c, err := opsDial(imapAddr, false)
	if err != nil {
		t.Fatal(err)
	}
	if b, err := c.backend("bob@example.org", testUsers["bob@example.org"]); err != nil || b != "m2" {
		t.Errorf("bob after the reload: %q %v, want m2", b, err)
	}
	c.Close()
	if _, err := live.cmd("NOOP"); err != nil {
		t.Fatalf("alice's session after the good reload: %v", err)
	}
	p.signal(syscall.SIGTERM)
	if code := p.wait(t, 10*time.Second); code != 0 {
		t.Errorf("exit %d after SIGTERM", code)
	}
	_ = os.Remove(conf)
}

// TestSecondSignalCutsDrainShort: an operator's second SIGTERM closes
// every session at once instead of waiting out a long drain window.
func TestSecondSignalCutsDrainShort(t *testing.T) {
	before := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, before) })
	bin := opsBinary(t)
	m1 := opsBackend(t, "m1", testUsers)
	imapAddr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	httpAddr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	conf := filepath.Join(t.TempDir(), "imapgate.toml")
	write(t, conf, binaryConfig(imapAddr, httpAddr, map[string]string{"m1": m1}, "drain_window = \"60s\"\ngrace = \"60s\""))
	p := startOps(t, bin, "-config", conf)
	waitHTTP(t, "http://"+httpAddr+"/readyz", 10*time.Second)
	var clients []*opsClient
	for range 3 {
		c, err := opsDial(imapAddr, false)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.login("alice@example.org", "alicepass"); err != nil {
			t.Fatalf("login: %v; log:\n%s", err, p.dump())
		}
		clients = append(clients, c)
	}
	start := time.Now()
	p.signal(syscall.SIGTERM)
	p.waitLog(t, 5*time.Second, `"draining"`)
	p.signal(syscall.SIGTERM)
	if code := p.wait(t, 10*time.Second); code != 0 {
		t.Fatalf("exit %d; log:\n%s", code, p.dump())
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("exited %v after the second signal, drain window 60s", d)
	}
	p.waitLog(t, time.Second, "drain cut short")
	for _, c := range clients {
		if err := c.waitClosed(time.Second); err != nil {
			t.Errorf("%v; log:\n%s", err, p.dump())
		}
	}
}
