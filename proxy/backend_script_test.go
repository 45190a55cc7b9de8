package proxy

import (
	"bufio"
	"net"
	"strings"
	"testing"
	"time"

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
