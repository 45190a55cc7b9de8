package proxy

import (
	"bufio"
	"encoding/base64"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"

	"github.com/imapgate/imapgate/internal/testenv"
	"github.com/imapgate/imapgate/routing"
)

// scriptedBackend accepts connections on loopback and answers each with
// greeting, then each command line with answer(tag, command) (empty: no
// answer). It plays backends no real server can be made to imitate: one
// that refuses CAPABILITY, one with a very long greeting.
func scriptedBackend(t *testing.T, greeting string, answer func(tag, cmd string) string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	testenv.Accept(t, ln, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(20 * time.Second))
		c.Write([]byte(greeting + "\r\n"))
		br := bufio.NewReader(c)
		for {
			l, err := br.ReadString('\n')
			if err != nil {
				return
			}
			tag, cmd, _ := strings.Cut(strings.TrimRight(l, "\r\n"), " ")
			if a := answer(tag, cmd); a != "" {
				c.Write([]byte(a))
			}
		}
	})
	return ln.Addr().String()
}

// TestBackendRefusesSetupIsUnavailable: a backend's NO or BAD to
// CAPABILITY or STARTTLS is an unavailable backend, not a failed login:
// the client gets NO [UNAVAILABLE] without the backend's text, and no
// failure bucket is charged.
func TestBackendRefusesSetupIsUnavailable(t *testing.T) {
	for _, tc := range []struct {
		name     string
		greeting string
		sec      routing.Security
		answer   func(tag, cmd string) string
	}{
		{"capability NO", "* OK ready", routing.SecurityNone, func(tag, cmd string) string {
			return tag + " NO [AUTHENTICATIONFAILED] secret backend text\r\n"
		}},
		{"capability BAD", "* OK ready", routing.SecurityNone, func(tag, cmd string) string {
			return tag + " BAD secret backend text\r\n"
		}},
		{"starttls NO", "* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] ready", routing.SecurityStartTLS, func(tag, cmd string) string {
			return tag + " NO [AUTHENTICATIONFAILED] secret backend text\r\n"
		}},
		{"post-login capability NO", "* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready", routing.SecurityNone, func(tag, cmd string) string {
			if strings.HasPrefix(cmd, "AUTHENTICATE") {
				return tag + " OK done\r\n" // no capabilities: imapgate asks
			}
			return tag + " NO [AUTHENTICATIONFAILED] secret backend text\r\n"
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr := scriptedBackend(t, tc.greeting, tc.answer)
			h, _, m := limitHarness(t, func(o *Options) {
				o.Router = fixedRouter(&routing.Backend{ID: "odd", Addr: addr, Security: tc.sec})
				o.Limits.IPFailures = RateLimit{Burst: 1, Refill: time.Hour}
				o.Limits.UserFailures = RateLimit{Burst: 1, Refill: time.Hour}
			})
			for _, tag := range []string{"a", "b", "c"} {
				c := dialFrom(t, h.startTLSAddr, net.IPv4(127, 0, 0, 1))
				c.Send(tag + " LOGIN alice@example.org alicepass\r\n")
				l := c.Expect(tag + " NO [UNAVAILABLE]")
				if strings.Contains(l, "secret") {
					t.Errorf("the backend's text reached the client: %q", l)
				}
			}
			now := time.Now()
			lim := h.srv.limiters.Load()
			if got := lim.ip.tokens("127.0.0.1/32", now); got != 1 {
				t.Errorf("network bucket charged: %v tokens left of 1", got)
			}
			if got := lim.user.tokens("alice@example.org", now); got != 1 {
				t.Errorf("user bucket charged: %v tokens left of 1", got)
			}
			if m.hits("auth_failure_rate") != 0 {
				t.Error("refused by the failure limits")
			}
		})
	}
}

// TestBackendLongGreeting logs in to a backend whose greeting carries a
// capability list of 14 KiB (a line longer than the reader's old 4 KiB
// buffer, within maxBackendLine), and refuses one longer than that.
func TestBackendLongGreeting(t *testing.T) {
	caps := "IMAP4rev1 SASL-IR AUTH=PLAIN" + strings.Repeat(" X-VENDOR-CAPABILITY", 700)
	login := func(tag, cmd string) string {
		if strings.HasPrefix(cmd, "AUTHENTICATE PLAIN ") {
			return tag + " OK [CAPABILITY " + caps + "] Logged in\r\n"
		}
		return tag + " BAD unexpected\r\n"
	}
	addr := scriptedBackend(t, "* OK [CAPABILITY "+caps+"] ready", login)
	if len(caps) < 12<<10 || len(caps) > maxBackendLine-100 {
		t.Fatalf("greeting of %d bytes does not test what it should", len(caps))
	}
	h := newHarness(t, fixedRouter(&routing.Backend{ID: "long", Addr: addr}), nil)
	c := dialConv(t, h.tlsAddr, h.clientTLS)
	c.Expect("* OK")
	c.Send("a LOGIN alice@example.org alicepass\r\n")
	c.Expect("a OK [CAPABILITY IMAP4rev1 SASL-IR")

	tooLong := scriptedBackend(t, "* OK [CAPABILITY "+strings.Repeat("X", maxBackendLine)+"] ready", login)
	h2 := newHarness(t, fixedRouter(&routing.Backend{ID: "toolong", Addr: tooLong}), nil)
	c = dialConv(t, h2.tlsAddr, h2.clientTLS)
	c.Expect("* OK")
	c.Send("a LOGIN alice@example.org alicepass\r\n")
	c.Expect("a NO [UNAVAILABLE]")
}

// lateGreeter is a backend whose connections, from the second on, greet
// only once a command line has arrived: a login that waits for the
// greeting before it sends anything hangs there, a pipelined one goes
// through. Each connection's greeting and login answers come from the
// test; the first lines each connection read are kept.
type lateGreeter struct {
	t     *testing.T
	addr  string
	mu    sync.Mutex
	n     int
	first []string // each connection's first line
}

func newLateGreeter(t *testing.T, greeting func(n int) (caps string, late bool), answer func(n int, tag, cmd string) string) *lateGreeter {
	g := &lateGreeter{t: t}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g.addr = ln.Addr().String()
	testenv.Accept(t, ln, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(20 * time.Second))
		g.mu.Lock()
		g.n++
		n := g.n
		g.first = append(g.first, "")
		g.mu.Unlock()
		caps, late := greeting(n)
		br := bufio.NewReader(c)
		greet := func() { c.Write([]byte("* OK [CAPABILITY " + caps + "] ready\r\n")) }
		if caps == "" {
			greet = func() { c.Write([]byte("* OK ready\r\n")) }
		}
		if !late {
			greet()
		}
		for i := 0; ; i++ {
			l, err := br.ReadString('\n')
			if err != nil {
				return
			}
			l = strings.TrimRight(l, "\r\n")
			if i == 0 {
				g.mu.Lock()
				g.first[n-1] = l
				g.mu.Unlock()
				if late {
					greet()
				}
			}
			tag, cmd, _ := strings.Cut(l, " ")
			if a := answer(n, tag, cmd); a != "" {
				c.Write([]byte(a))
			}
		}
	})
	return g
}

func (g *lateGreeter) firstLines() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.first)
}

// A login to a backend whose greeting is known sends ID and credentials
// before the greeting arrives (pipelinedLogin): the late greeter answers
// it; the first login, with no greeting known, waits for the greeting.
func TestBackendPipelinedLogin(t *testing.T) {
	const caps = "IMAP4rev1 SASL-IR ID AUTH=PLAIN"
	plain := base64.StdEncoding.EncodeToString([]byte("\x00alice@example.org\x00alicepass"))
	g := newLateGreeter(t, func(n int) (string, bool) { return caps, n > 1 }, func(n int, tag, cmd string) string {
		switch {
		case strings.HasPrefix(cmd, "ID "):
			return "* ID NIL\r\n" + tag + " OK ID completed\r\n"
		case cmd == "AUTHENTICATE PLAIN "+plain:
			return tag + " OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
		}
		return tag + " BAD unexpected\r\n"
	})
	h := newHarness(t, fixedRouter(&routing.Backend{ID: "late", Addr: g.addr}), nil)
	for i, tag := range []string{"a", "b", "c"} {
		c := dialConv(t, h.tlsAddr, h.clientTLS)
		c.Expect("* OK")
		c.Send(tag + " LOGIN alice@example.org alicepass\r\n")
		if last, _ := c.Tagged(tag); !strings.HasPrefix(last, tag+" OK") {
			t.Fatalf("login %d: %q", i+1, last)
		}
	}
	for i, l := range g.firstLines() {
		if !strings.HasPrefix(l, "ig1 ID (") {
			t.Errorf("connection %d began with %q, want the ID", i+1, l)
		}
	}
}

// When the greeting of a pipelined login asks for another login than the
// one that went early, the connection is dropped and the login done over
// the usual way, on a third connection: the backend lost AUTH=PLAIN (the
// client is logged in with LOGIN), or its greeting no longer carries its
// capabilities (imapgate asks for them first).
func TestBackendPipelinedLoginGreetingChanged(t *testing.T) {
	for _, tc := range []struct {
		name      string
		caps      string // the greeting's from the second connection on
		answer    func(tag, cmd string) string
		wantThird string // the third connection's first line
	}{
		{"lost AUTH=PLAIN", "IMAP4rev1", func(tag, cmd string) string {
			if cmd == `LOGIN "alice@example.org" "alicepass"` {
				return tag + " OK [CAPABILITY IMAP4rev1] Logged in\r\n"
			}
			return tag + " BAD unexpected\r\n"
		}, `ig1 LOGIN "alice@example.org" "alicepass"`},
		{"no capabilities", "", func(tag, cmd string) string {
			switch {
			case cmd == "CAPABILITY":
				return "* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN\r\n" + tag + " OK done\r\n"
			case strings.HasPrefix(cmd, "AUTHENTICATE PLAIN "):
				return tag + " OK [CAPABILITY IMAP4rev1] Logged in\r\n"
			}
			return tag + " BAD unexpected\r\n"
		}, "ig1 CAPABILITY"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newLateGreeter(t, func(n int) (string, bool) {
				if n == 1 {
					return "IMAP4rev1 SASL-IR AUTH=PLAIN", false
				}
				return tc.caps, n == 2
			}, func(n int, tag, cmd string) string {
				switch {
				case n == 1 && strings.HasPrefix(cmd, "AUTHENTICATE PLAIN "):
					return tag + " OK [CAPABILITY IMAP4rev1] Logged in\r\n"
				case n == 2:
					return "" // the early AUTHENTICATE: imapgate hangs up before any answer
				}
				return tc.answer(tag, cmd)
			})
			h := newHarness(t, fixedRouter(&routing.Backend{ID: "changed", Addr: g.addr}), func(o *Options) { o.Backend.NoForwardID = true })
			for _, tag := range []string{"a", "b"} {
				c := dialConv(t, h.tlsAddr, h.clientTLS)
				c.Expect("* OK")
				c.Send(tag + " LOGIN alice@example.org alicepass\r\n")
				if last, _ := c.Tagged(tag); !strings.HasPrefix(last, tag+" OK") {
					t.Fatalf("login %s: %q", tag, last)
				}
			}
			got := g.firstLines()
			if len(got) != 3 || !strings.HasPrefix(got[1], "ig1 AUTHENTICATE PLAIN ") || got[2] != tc.wantThird {
				t.Fatalf("first lines of the backend's connections: %q", got)
			}
		})
	}
}

// planLogin and oneWrite: how credentials go to a backend, from its
// capabilities, and which of those ways may go before its greeting.
func TestPlanLogin(t *testing.T) {
	plain := &credentials{mech: "LOGIN", user: "alice", pass: "pw"}
	odd := &credentials{mech: "LOGIN", user: "alice", pass: "p\xe4ss"}
	authz := &credentials{mech: sasl.Plain, authzid: "bob", user: "alice", pass: "pw"}
	oauth := &credentials{mech: "XOAUTH2", user: "alice", oauth: []byte("tok")}
	for _, tc := range []struct {
		name    string
		caps    string
		cr      *credentials
		want    loginPlan
		oneShot bool
		err     bool
	}{
		{"plain with sasl-ir", "IMAP4rev1 SASL-IR AUTH=PLAIN ID LITERAL+", plain, loginPlan{kind: loginPlain, saslIR: true, id: true}, true, false},
		{"plain without sasl-ir", "IMAP4rev1 AUTH=PLAIN", plain, loginPlan{kind: loginPlain}, false, false},
		{"login quoted", "IMAP4rev1 SASL-IR", plain, loginPlan{kind: loginLogin}, true, false},
		{"login literal+", "IMAP4rev1 LITERAL+", odd, loginPlan{kind: loginLogin, literalPlus: true}, true, false},
		{"login literal", "IMAP4rev1", odd, loginPlan{kind: loginLogin}, false, false},
		{"authzid needs plain", "IMAP4rev1", authz, loginPlan{}, false, true},
		{"logindisabled", "IMAP4rev1 LOGINDISABLED", plain, loginPlan{}, false, true},
		{"oauth offered", "IMAP4rev1 SASL-IR AUTH=XOAUTH2", oauth, loginPlan{kind: loginOAuth, saslIR: true}, false, false},
		{"oauth not offered", "IMAP4rev1 AUTH=PLAIN", oauth, loginPlan{}, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := planLogin(tc.caps, tc.cr, true)
			if (err != nil) != tc.err {
				t.Fatalf("error %v, want one: %v", err, tc.err)
			}
			if err != nil {
				return
			}
			if p != tc.want {
				t.Fatalf("plan %+v, want %+v", p, tc.want)
			}
			if got := p.oneWrite(tc.cr); got != tc.oneShot {
				t.Fatalf("one write: %v, want %v", got, tc.oneShot)
			}
		})
	}
	// Never before STARTTLS, whatever the greeting said.
	srv := &Server{}
	b := &routing.Backend{Addr: "192.0.2.1:143", Security: routing.SecurityStartTLS}
	srv.rememberGreeting(b, "IMAP4rev1 SASL-IR AUTH=PLAIN")
	if _, ok := srv.pipelinedLogin(b, plain, &clientInfo{}); ok {
		t.Fatal("pipelined before STARTTLS")
	}
	b.Security = routing.SecurityTLS
	srv.rememberGreeting(b, "IMAP4rev1 SASL-IR AUTH=PLAIN")
	if _, ok := srv.pipelinedLogin(b, plain, &clientInfo{}); !ok {
		t.Fatal("not pipelined over TLS")
	}
	if _, ok := srv.pipelinedLogin(b, oauth, &clientInfo{}); ok {
		t.Fatal("an OAuth login pipelined")
	}
}
