// Command imapgate-bench is a load generator for IMAP servers and proxies:
// imapgate, HAProxy or Dovecot itself. It speaks raw IMAP over TLS so that
// its own cost stays small and exact.
//
// Scenarios:
//
//	login   connect + TLS + LOGIN + SELECT INBOX + LOGOUT, -workers at once: logins/s
//	fetch   FETCH a 10 MiB message, then a mailbox of 1,000 small ones: MiB/s
//	noop    NOOP round trips on one logged-in session: p50/p99 latency
//	idle    open -sessions logged-in sessions in IDLE and hold them
//
// With -pid, the CPU time the process with that id (the proxy) spends is
// read from /proc before and after each scenario and reported per login,
// per MiB or per round trip; for idle, its RSS before and while the
// sessions are open, per session.
//
// Typical use, against imapgate on 127.0.0.1:9993:
//
//	imapgate-bench -addr 127.0.0.1:9993 -ca ca.pem -user 'bench%d' -users 100 -pass benchpass \
//	    -scenario login -workers 8 -duration 20s -pid "$(pidof imapgate)"
//
// The fetch scenario needs its mailboxes: -prepare ADDR fills them
// (directly on the backend, e.g. Dovecot's cleartext port) first.
//
// The side-by-side comparison with HAProxy and Dovecot that BENCHMARKS.md
// shows is run by `make bench` (bench/report_test.go), not by this command.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/imapgate/imapgate/bench"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("imapgate-bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		addr      = fs.String("addr", "127.0.0.1:993", "server `host:port`")
		useTLS    = fs.Bool("tls", true, "implicit TLS (set -tls=false for cleartext)")
		startTLS  = fs.Bool("starttls", false, "cleartext greeting, then STARTTLS")
		caFile    = fs.String("ca", "", "PEM `file` of CAs that sign the server's certificate (default: system roots)")
		insecure  = fs.Bool("insecure", false, "do not verify the server's certificate")
		sni       = fs.String("servername", "", "TLS server name (default: the host of -addr)")
		curves    = fs.String("curves", "", "comma-separated TLS key exchanges to offer, e.g. X25519 (default: Go's)")
		resume    = fs.Bool("resume", false, "keep a TLS session cache shared by the workers, so logins after the first resume with the server's ticket")
		user      = fs.String("user", "", "user name; %d in it is replaced by 0..-users-1")
		users     = fs.Int("users", 1, "how many users -user's %d pattern makes")
		pass      = fs.String("pass", "", "password of every -user")
		usersFile = fs.String("users-file", "", "`file` of user:password lines, instead of -user/-pass")
		scenario  = fs.String("scenario", "login", "login, fetch, noop or idle (comma-separated for several)")
		workers   = fs.Int("workers", 0, "concurrent clients (default: login 4, fetch 1, idle 32 openers)")
		duration  = fs.Duration("duration", 10*time.Second, "how long login, noop and each half of fetch run")
		count     = fs.Int("count", 0, "logins, NOOPs or FETCHes to do instead of -duration")
		sessions  = fs.Int("sessions", 500, "idle: sessions to open")
		rate      = fs.Float64("rate", 0, "idle: at most this many new sessions per second (0: no cap)")
		settle    = fs.Duration("settle", 5*time.Second, "idle: wait after the last session opened before reading memory")
		hold      = fs.Duration("hold", 5*time.Second, "idle: how long to keep the sessions open after settling")
		appendN   = fs.Int("append", 0, "idle: APPEND a message of this many `bytes` before IDLE (0: none)")
		pid       = fs.Int("pid", 0, "`pid` of the proxy process to measure (CPU time, RSS); 0: none")
		prepare   = fs.String("prepare", "", "fill the fetch mailboxes first through this cleartext `host:port` (the backend)")
		target    = fs.String("label", "", "label for the results (e.g. imapgate)")
		jsonOut   = fs.Bool("json", false, "print results as JSON lines")
		verbose   = fs.Bool("v", false, "progress on stderr")
	)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	fail := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "imapgate-bench: "+format+"\n", a...)
		return 1
	}
	if fs.NArg() > 0 {
		return fail("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}

	tc := &tls.Config{ServerName: *sni, InsecureSkipVerify: *insecure}
	if tc.ServerName == "" {
		host, _, _ := net.SplitHostPort(*addr)
		tc.ServerName = host
	}
	if *caFile != "" {
		pem, err := os.ReadFile(*caFile)
		if err != nil {
			return fail("%v", err)
		}
		tc.RootCAs = x509.NewCertPool()
		if !tc.RootCAs.AppendCertsFromPEM(pem) {
			return fail("%s: no certificates", *caFile)
		}
	}
	if *curves != "" {
		ids, err := parseCurves(*curves)
		if err != nil {
			return fail("%v", err)
		}
		tc.CurvePreferences = ids
	}
	if *resume {
		tc.ClientSessionCache = tls.NewLRUClientSessionCache(64)
	}
	d := bench.Dialer{Addr: *addr, TLS: tc}
	switch {
	case *startTLS:
		d.Security = bench.StartTLS
	case !*useTLS:
		d.Security = bench.Cleartext
	}

	var creds []bench.Credential
	switch {
	case *usersFile != "":
		var err error
		if creds, err = bench.LoadUsers(*usersFile); err != nil {
			return fail("%v", err)
		}
	case *user != "":
		creds = bench.UsersPattern(*user, *users, *pass)
	default:
		return fail("-user or -users-file is required")
	}

	o := bench.Options{
		Target: *target, Dialer: d, Users: creds, Workers: *workers,
		Duration: *duration, Count: *count,
		Idle: bench.IdleOptions{
			Sessions: *sessions, Rate: *rate, Settle: *settle, Hold: *hold, Append: *appendN,
			// The profile harness waits for this line before it takes its
			// snapshots.
			Ready: func(n int) { fmt.Fprintf(stderr, "imapgate-bench: ready: %d sessions open\n", n) },
		},
	}
	if *pid != 0 {
		o.Proc = &bench.Proc{PID: *pid}
		if _, err := o.Proc.CPU(); err != nil {
			return fail("-pid: %v", err)
		}
	}
	if *verbose {
		o.Logf = func(format string, a ...any) { fmt.Fprintf(stderr, format+"\n", a...) }
	}
	if *prepare != "" {
		pd := bench.Dialer{Addr: *prepare, Security: bench.Cleartext}
		if err := bench.Prepare(ctx, pd, creds[0], o.Fetch); err != nil {
			return fail("prepare: %v", err)
		}
	}

	code := 0
	for sc := range strings.SplitSeq(*scenario, ",") {
		rs, err := bench.Run(ctx, strings.TrimSpace(sc), o)
		for _, r := range rs {
			if *jsonOut {
				b, _ := json.Marshal(r)
				fmt.Fprintf(stdout, "%s\n", b)
			} else {
				fmt.Fprintln(stdout, bench.Describe(r))
			}
		}
		if err != nil {
			fmt.Fprintf(stderr, "imapgate-bench: %s: %v\n", sc, err)
			code = 1
		}
	}
	return code
}

// parseCurves maps names such as X25519 or X25519MLKEM768 to curve IDs.
func parseCurves(s string) ([]tls.CurveID, error) {
	known := map[string]tls.CurveID{}
	for _, id := range []tls.CurveID{tls.X25519, tls.X25519MLKEM768, tls.CurveP256, tls.CurveP384, tls.CurveP521} {
		known[strings.ToLower(id.String())] = id
	}
	var out []tls.CurveID
	for name := range strings.SplitSeq(s, ",") {
		id, ok := known[strings.ToLower(strings.TrimSpace(name))]
		if !ok {
			return nil, fmt.Errorf("unknown key exchange %q", name)
		}
		out = append(out, id)
	}
	return out, nil
}
