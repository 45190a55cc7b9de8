package bench

import (
	"context"
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/testenv"
)

// TestBenchmarkReport runs every scenario side by side against imapgate,
// HAProxy (L4, terminating TLS), nginx's mail proxy (when installed) and
// Dovecot's own TLS port, all in front of one Dovecot, and writes the
// table into BENCHMARKS.md. It takes about fifteen minutes and skips
// unless IMAPGATE_BENCH=1 (make bench sets it).
//
// Environment (defaults are make bench's):
//
//	IMAPGATE_BENCH_SESSIONS  idle sessions per proxy (9000)
//	IMAPGATE_BENCH_RATE      idle sessions opened per second (250)
//	IMAPGATE_BENCH_DURATION  length of login and of each fetch half (20s)
//	IMAPGATE_BENCH_WORKERS   concurrent login clients (8)
//	IMAPGATE_BENCH_NOOPS     NOOP round trips (20000)
//	IMAPGATE_BENCH_ROUNDS    rounds the login and fetch scenarios are split
//	                         into, each visiting every target in turn (3)
//	IMAPGATE_BENCH_APPEND    the upload of idle-append in bytes (65536)
//	IMAPGATE_BENCH_OUT       file to write ("../BENCHMARKS.md"; "-" for none)
//	IMAPGATE_BENCH_REV       build imapgate from this git revision instead of the working tree
//	IMAPGATE_BENCH_BASE      also build this git revision and run it as the
//	                         target "imapgate@REV": before and after in one run
//	IMAPGATE_BENCH_BASE_CONFIG  extra TOML appended to the base's configuration
//	                         ("\n" for a newline), e.g. "[splice]\nevent_loop = false"
//	                         with IMAPGATE_BENCH_BASE=HEAD: one switch on and off
//	IMAPGATE_BENCH_CONFIG    the same for the imapgate column itself
//	IMAPGATE_BENCH_ENV       environment for the imapgate process under test,
//	                         space-separated (e.g. "GOGC=50 GOMEMLIMIT=150MiB")
//	IMAPGATE_BENCH_POOL      backend.pool of the extra login-only column
//	                         "imapgate+pool" (4; 0 for no such column)
//	IMAPGATE_BENCH_TARGETS   the columns besides imapgate (and the base):
//	                         any of haproxy, nginx, direct, pool (all when empty)
//	IMAPGATE_BENCH_ONLY      a comma-separated subset of login, login-x25519,
//	                         login-resume, fetch, noop, idle, idle-append
//	                         (empty: all), for focused runs while iterating
//
// nginx's mail proxy is a column when nginx and libnginx-mod-mail are
// installed (scripts/install-test-deps.sh installs them).
func TestBenchmarkReport(t *testing.T) {
	if os.Getenv("IMAPGATE_BENCH") != "1" {
		t.Skip("benchmark report: set IMAPGATE_BENCH=1 (make bench)")
	}
	testenv.Need(t, "dovecot", "haproxy")
	sessions := envInt(t, "IMAPGATE_BENCH_SESSIONS", 9000)
	rate := envInt(t, "IMAPGATE_BENCH_RATE", 250)
	duration := envDuration(t, "IMAPGATE_BENCH_DURATION", 20*time.Second)
	workers := envInt(t, "IMAPGATE_BENCH_WORKERS", 8)
	noops := envInt(t, "IMAPGATE_BENCH_NOOPS", 20000)
	rounds := envInt(t, "IMAPGATE_BENCH_ROUNDS", 3)
	appendSize := envInt(t, "IMAPGATE_BENCH_APPEND", 65536)
	only := map[string]bool{}
	for _, sc := range strings.Split(os.Getenv("IMAPGATE_BENCH_ONLY"), ",") {
		if sc = strings.TrimSpace(sc); sc != "" {
			only[sc] = true
		}
	}
	want := func(sc string) bool { return len(only) == 0 || only[sc] }
	out := os.Getenv("IMAPGATE_BENCH_OUT")
	if out == "" {
		out = "../BENCHMARKS.md"
	}
	const noopRounds = 5
	ctx := context.Background()
	logf := func(format string, a ...any) { t.Logf(format, a...) }

	raiseInotify(t, 65536)
	d, creds := startBenchDovecot(t)
	fetch := FetchOptions{}
	if err := Prepare(ctx, Dialer{Addr: d.Addr, Security: Cleartext}, creds[0], fetch); err != nil {
		t.Fatalf("prepare mailboxes: %v\n%s", err, d.Log())
	}
	dir := t.TempDir()
	bin, commit := buildImapgate(t, dir, os.Getenv("IMAPGATE_BENCH_REV"))
	var baseBin, baseName string
	if rev := os.Getenv("IMAPGATE_BENCH_BASE"); rev != "" {
		bdir := filepath.Join(dir, "base")
		if err := os.Mkdir(bdir, 0o755); err != nil {
			t.Fatal(err)
		}
		var c string
		baseBin, c = buildImapgate(t, bdir, rev)
		baseName = "imapgate@" + c[:min(7, len(c))]
	}
	env := strings.Fields(os.Getenv("IMAPGATE_BENCH_ENV"))
	pool := 4
	if v := os.Getenv("IMAPGATE_BENCH_POOL"); v == "0" {
		pool = 0
	} else if v != "" {
		pool = envInt(t, "IMAPGATE_BENCH_POOL", 4)
	}
	poolName := fmt.Sprintf("imapgate+pool%d", pool)
	withNginx := haveNginxMail()
	if !withNginx {
		t.Logf("nginx or %s missing: no nginx column (scripts/install-test-deps.sh installs them)", nginxMailModule)
	}

	type target struct {
		name string
		addr string
		srv  *server // nil for direct
	}
	// IMAPGATE_BENCH_TARGETS narrows the columns for focused runs.
	cols := map[string]bool{}
	for _, n := range strings.Split(os.Getenv("IMAPGATE_BENCH_TARGETS"), ",") {
		if n = strings.TrimSpace(n); n != "" {
			cols[n] = true
		}
	}
	use := func(n string) bool { return len(cols) == 0 || cols[n] }
	// start starts the proxies, in the order of the columns.
	start := func() []target {
		ig := startImapgateWith(t, dir, bin, d, extraConfig("IMAPGATE_BENCH_CONFIG"), env)
		ts := []target{{"imapgate", ig.addr, ig}}
		if baseBin != "" {
			var b *server
			if extra := extraConfig("IMAPGATE_BENCH_BASE_CONFIG"); extra != "" {
				b = startImapgateWith(t, filepath.Join(dir, "base"), baseBin, d, extra, nil)
			} else {
				b = startImapgate(t, filepath.Join(dir, "base"), baseBin, d)
			}
			ts = append(ts, target{baseName, b.addr, b})
		}
		if use("haproxy") {
			hp := startHAProxy(t, dir, d)
			ts = append(ts, target{"haproxy", hp.addr, hp})
		}
		if withNginx && use("nginx") {
			ng := startNginx(t, dir, d)
			ts = append(ts, target{"nginx", ng.addr, ng})
		}
		return ts
	}
	targets := start()
	if use("direct") {
		targets = append(targets, target{"direct", d.TLSAddr, nil})
	}
	// The pool only changes logins: its column has login rows alone.
	var (
		loginTargets []target
		poolSrv      *server
	)
	if pool > 0 && use("pool") {
		pdir := filepath.Join(dir, "pool")
		if err := os.Mkdir(pdir, 0o755); err != nil {
			t.Fatal(err)
		}
		pg := startImapgateWith(t, pdir, bin, d, fmt.Sprintf("\n[backend]\npool = %d\n", pool), env)
		poolSrv = pg
		loginTargets = append(loginTargets, targets[0], target{poolName, pg.addr, pg})
		loginTargets = append(loginTargets, targets[1:]...)
	} else {
		loginTargets = targets
	}
	var names []string
	for _, tg := range loginTargets {
		names = append(names, tg.name)
	}
	setup := []string{
		"One Dovecot (internal/testenv, plus `imap_hibernate_timeout = 2s` and limits for 10,000 sessions), ECDSA P-256 certificate; users bench0…bench199.",
		"**imapgate**: `bin/imapgate -config imapgate.toml` built from this commit; implicit TLS listener, Dovecot's cleartext port as backend (`security = \"none\"`), `max_connections_per_ip = -1`, session ticket keys shared through a file (`[tls.session_tickets] store = \"file\"`, as a fleet without Consul), logging at the default level (info, JSON) to a file; GOMAXPROCS default (2)." + mainConfigNote(),
	}
	if len(env) > 0 {
		setup = append(setup, fmt.Sprintf("imapgate's environment: `%s`.", strings.Join(env, " ")))
	}
	if pool > 0 {
		setup = append(setup, fmt.Sprintf("**%s**: imapgate with `[backend] pool = %d` (greeted backend connections kept ready), login rows only.", poolName, pool))
	}
	if baseName != "" {
		setup = append(setup, fmt.Sprintf("**%s**: the same configuration, built from that commit (the \"before\" of this run)%s.", baseName, baseConfigNote()))
	}
	setup = append(setup, "**haproxy**: `haproxy -db -f haproxy.cfg`, `mode tcp`, `bind … ssl crt combined.pem defer-accept` (as imapgate defers accept on its implicit-TLS listeners), `server s1` = Dovecot's cleartext port, `maxconn 9950`, no logging, threads default (2).")
	if withNginx {
		setup = append(setup, "**nginx**: nginx's `mail` module (Debian's libnginx-mod-mail), `proxy on`, TLS on the listener, `auth_http` answered by the test process (every user to Dovecot's cleartext port), `ssl_session_cache shared:MAIL:10m`, one process (`master_process off`: one core, where the others may use two), no access log.")
	}
	setup = append(setup,
		"**direct**: the load generator talks TLS to Dovecot's own imaps port (no proxy, so no proxy CPU or RSS).",
		fmt.Sprintf("NOOP: %d round trips per target on one session each, in %d rounds that visit the targets in turn; logins and fetches likewise in %d rounds of %v each (per fetch half), merged (total CPU over total operations).", noops, noopRounds, rounds, (duration/time.Duration(rounds)).Round(100*time.Millisecond)),
		"Load generator in the test process (raw IMAP over crypto/tls). Every login is a full handshake except in `login (resumed)`, where the workers share a client session cache and resume with the server's TLS 1.3 ticket (psk_dhe_ke: the key exchange is still done, the certificate and its signature are not). Proxy CPU = utime+stime from /proc/PID/stat across the scenario, divided by logins, MiB (bytes read by the client after TLS, 2^20) or round trips. The machine is shared: rates move between runs, CPU per operation much less.",
	)
	rep := &Report{
		Machine: ThisMachine(testenv.Bin("haproxy"), testenv.Bin("dovecot")),
		Targets: names,
		Commands: []string{
			"make bench   # = IMAPGATE_BENCH=1 go test -run '^TestBenchmarkReport$' -count=1 -timeout 60m -v ./bench",
			fmt.Sprintf("# this run: IMAPGATE_BENCH_SESSIONS=%d IMAPGATE_BENCH_RATE=%d IMAPGATE_BENCH_DURATION=%v IMAPGATE_BENCH_WORKERS=%d IMAPGATE_BENCH_NOOPS=%d IMAPGATE_BENCH_ROUNDS=%d IMAPGATE_BENCH_BASE=%q IMAPGATE_BENCH_ONLY=%q",
				sessions, rate, duration, workers, noops, rounds, os.Getenv("IMAPGATE_BENCH_BASE"), os.Getenv("IMAPGATE_BENCH_ONLY")),
			"# one scenario by hand against a running proxy, e.g.:",
			"go run ./cmd/imapgate-bench -addr 127.0.0.1:PORT -ca ca.pem -user 'bench%d' -users 200 -pass benchpass -scenario login -workers 8 -duration 20s -pid PID",
		},
		Setup: setup,
	}
	run := func(scenario string, tg target, mod func(*Options)) []Result {
		o := Options{
			Target: tg.name, Users: creds, Workers: workers, Duration: duration, Logf: logf,
			Dialer: Dialer{Addr: tg.addr, TLS: &tls.Config{RootCAs: d.CA.Pool, ServerName: "localhost"}},
			Fetch:  fetch,
		}
		if tg.srv != nil {
			o.Proc = tg.srv.proc()
		}
		if mod != nil {
			mod(&o)
		}
		rs, err := Run(ctx, scenario, o)
		for _, r := range rs {
			t.Log(Describe(r))
		}
		if err != nil {
			t.Errorf("%s %s: %v", tg.name, scenario, err)
		}
		return rs
	}
	add := func(rs []Result, rename string) {
		for _, r := range rs {
			if rename != "" {
				r.Scenario = rename
			}
			rep.Results = append(rep.Results, r)
		}
	}

	// inRounds runs a scenario in rounds that visit every target in turn,
	// each round a share of the duration, and adds the merged results: a
	// machine whose load changes during the run then weighs on every
	// target alike.
	inRounds := func(tgs []target, scenario string, mod func(*Options), rename string) {
		by := map[string][]Result{}
		var order []string
		for range rounds {
			for _, tg := range tgs {
				for _, r := range run(scenario, tg, func(o *Options) {
					if mod != nil {
						mod(o)
					}
					o.Duration = duration / time.Duration(rounds)
				}) {
					k := tg.name + "\x00" + r.Scenario
					if _, ok := by[k]; !ok {
						order = append(order, k)
					}
					by[k] = append(by[k], r)
				}
			}
		}
		for _, k := range order {
			m := Merge(by[k])
			t.Logf("merged: %s", Describe(m))
			add([]Result{m}, rename)
		}
	}
	// Logins with Go's default key exchange (X25519MLKEM768 where the
	// server has it: imapgate does, HAProxy's OpenSSL 3.0, nginx and
	// Dovecot fall back to X25519), then with X25519 alone, like for like,
	// then resuming with a session ticket as mail clients do on reconnect.
	if want("login") {
		inRounds(loginTargets, "login", nil, "login")
	}
	if want("login-x25519") {
		inRounds(loginTargets, "login", func(o *Options) { o.Dialer.TLS.CurvePreferences = []tls.CurveID{tls.X25519} }, "login (X25519 only)")
	}
	if want("login-resume") {
		inRounds(loginTargets, "login", func(o *Options) {
			o.Dialer.TLS.ClientSessionCache = tls.NewLRUClientSessionCache(64)
		}, "login (resumed)")
	}
	if poolSrv != nil {
		poolSrv.stop(t) // its pooled connections would sit in Dovecot
	}
	if want("fetch") {
		inRounds(targets, "fetch", func(o *Options) { o.Workers = 1 }, "")
	}
	// NOOP latency is the figure the machine's noise moves most: the
	// round trips are spread over rounds that visit every target in turn.
	if want("noop") {
		noopBy := map[string][]Result{}
		for range noopRounds {
			for _, tg := range targets {
				noopBy[tg.name] = append(noopBy[tg.name], run("noop", tg, func(o *Options) { o.Count = noops / noopRounds })...)
			}
		}
		for _, tg := range targets {
			m := Merge(noopBy[tg.name])
			t.Logf("merged: %s", Describe(m))
			add([]Result{m}, "")
		}
	}

	// Idle sessions on fresh proxy processes, so "before" is a proxy that
	// has served nothing but a few warm-up logins.
	idle := func(name string, appendN int) {
		for _, tg := range targets {
			if tg.srv != nil {
				tg.srv.stop(t)
			}
		}
		waitHibernated(d, 30*time.Second)
		targets = start()
		for _, tg := range targets {
			t.Logf("%s (pid %d): warm-up logins, then %d idle sessions", tg.name, tg.srv.cmd.Process.Pid, sessions)
			run("login", tg, func(o *Options) { o.Count, o.Workers, o.Proc = 20, 2, nil })
			base, _ := tg.srv.proc().FDs()
			add(run("idle", tg, func(o *Options) {
				o.Workers = 32
				o.Idle = IdleOptions{Sessions: sessions, Rate: float64(rate), Settle: 10 * time.Second, Hold: 10 * time.Second, Append: appendN}
			}), name)
			// The sessions are closed; let the proxy and Dovecot let go of
			// them before the next target opens its own.
			if n := waitFDs(tg.srv.proc(), base+10, 60*time.Second); n > base+10 {
				t.Logf("%s still holds %d descriptors (%d before)", tg.name, n, base)
			}
			waitHibernated(d, 60*time.Second)
		}
	}
	if want("idle") {
		idle("idle", 0)
	}
	if want("idle-append") {
		idle(fmt.Sprintf("idle after a %d KiB APPEND", appendSize>>10), appendSize)
	}
	rep.Notes = append(rep.Notes, fmt.Sprintf("Idle: %d sessions per proxy, opened at most %d/s by 32 openers, each TLS + LOGIN + SELECT INBOX (+ one APPEND of %d bytes in the APPEND row) + IDLE; RSS read 20 s after the last one opened (10 s settle + 10 s hold). Not run direct: there is no proxy process to measure.", sessions, rate, appendSize))

	rep.Machine.Commit = commit
	md := rep.Markdown()
	t.Logf("\n%s", md)
	if out != "-" {
		if err := UpdateFile(out, md); err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %s", out)
	}
}

// baseConfigNote says what IMAPGATE_BENCH_BASE_CONFIG added to the base.
func baseConfigNote() string {
	if c := os.Getenv("IMAPGATE_BENCH_BASE_CONFIG"); c != "" {
		return fmt.Sprintf(", with `%s` appended to its configuration", c)
	}
	return ""
}

// mainConfigNote says what IMAPGATE_BENCH_CONFIG added to imapgate's.
func mainConfigNote() string {
	if c := os.Getenv("IMAPGATE_BENCH_CONFIG"); c != "" {
		return fmt.Sprintf(" With `%s` appended to its configuration.", c)
	}
	return ""
}

// extraConfig is the TOML in the environment variable name, "\n" read
// as a newline, on lines of its own.
func extraConfig(name string) string {
	extra := strings.ReplaceAll(os.Getenv(name), `\n`, "\n")
	if extra != "" {
		extra = "\n" + extra + "\n"
	}
	return extra
}
