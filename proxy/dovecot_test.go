package proxy

import (
	"bufio"
	"compress/flate"
	"crypto/tls"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/imapgate/imapgate/internal/testenv"
	"github.com/imapgate/imapgate/routing"
)

// These tests put imapgate in front of a real Dovecot, started by the
// test with its own configuration (internal/testenv).

func startDovecot(t *testing.T) *testenv.Dovecot {
	t.Helper()
	testenv.Need(t, "dovecot")
	// Trusted: no auth-failure delay, and x-originating-ip is honoured.
	return testenv.StartDovecot(t, testenv.DovecotOptions{TrustedNetworks: "127.0.0.0/8"})
}

func dovecotBackend(d *testenv.Dovecot, sec routing.Security) *routing.Backend {
	b := &routing.Backend{ID: "dovecot-" + sec.String(), Addr: d.Addr, Security: sec}
	if sec == routing.SecurityTLS {
		b.Addr = d.TLSAddr
	}
	if sec != routing.SecurityNone {
		b.TLS = &tls.Config{RootCAs: d.CA.Pool, ServerName: "localhost"}
	}
	return b
}

func TestDovecotLogin(t *testing.T) {
	d := startDovecot(t)
	for _, sec := range []routing.Security{routing.SecurityNone, routing.SecurityStartTLS, routing.SecurityTLS} {
		t.Run("backend="+sec.String(), func(t *testing.T) {
			h := newHarness(t, fixedRouter(dovecotBackend(d, sec)), nil)
			for user, pass := range d.Users {
				// Dovecot penalises failures (seconds each), so one user
				// per backend tries a wrong password first.
				tryWrong := user == "alice@example.org"
				t.Run(user, func(t *testing.T) {
					// imapclient picks quoted strings or literals as needed;
					// the client leg uses STARTTLS, so both legs may be TLS
					// upgraded in the same session.
					c, err := imapclient.DialStartTLS(h.startTLSAddr, &imapclient.Options{TLSConfig: h.clientTLS})
					if err != nil {
						t.Fatal(err)
					}
					defer c.Close()
					if tryWrong {
						if err := c.Login(user, pass+"x").Wait(); err == nil || !strings.Contains(err.Error(), "AUTHENTICATIONFAILED") {
							t.Fatalf("wrong password: %v, want AUTHENTICATIONFAILED", err)
						}
					}
					if err := c.Login(strings.ToUpper(user[:1])+user[1:], pass).Wait(); err != nil {
						t.Fatalf("login: %v", err)
					}
					if !c.Caps().Has(imap.CapIMAP4rev1) || c.Caps().Has(imap.CapStartTLS) {
						t.Errorf("post-login capabilities %v are not Dovecot's", c.Caps())
					}
					if _, err := c.Select("INBOX", nil).Wait(); err != nil {
						t.Fatal(err)
					}
					if err := c.Logout().Wait(); err != nil {
						t.Fatal(err)
					}
				})
			}
		})
	}
}

// Logins after the first to a Dovecot send ID and AUTHENTICATE PLAIN
// before its greeting (pipelinedLogin): Dovecot answers them as it
// answers the usual ones, a wrong password included.
func TestDovecotPipelinedLogin(t *testing.T) {
	d := startDovecot(t)
	const user = "bob@example.org"
	for _, sec := range []routing.Security{routing.SecurityNone, routing.SecurityTLS} {
		t.Run("backend="+sec.String(), func(t *testing.T) {
			b := dovecotBackend(d, sec)
			h := newHarness(t, fixedRouter(b), nil)
			login := func(pass string) error {
				c, err := imapclient.DialTLS(h.tlsAddr, &imapclient.Options{TLSConfig: h.clientTLS})
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				if err := c.Login(user, pass).Wait(); err != nil {
					return err
				}
				if _, err := c.Select("INBOX", nil).Wait(); err != nil {
					t.Fatal(err)
				}
				return c.Logout().Wait()
			}
			if err := login(d.Users[user]); err != nil {
				t.Fatalf("first login: %v", err)
			}
			cr := &credentials{mech: "LOGIN", user: user, pass: d.Users[user]}
			if p, ok := h.srv.pipelinedLogin(b, cr, &clientInfo{id: []string{"x", "y"}}); !ok || p.kind != loginPlain || !p.id {
				t.Fatalf("after one login, pipelined: %v (%+v), want AUTHENTICATE PLAIN after ID", ok, p)
			}
			if err := login(d.Users[user] + "x"); err == nil || !strings.Contains(err.Error(), "AUTHENTICATIONFAILED") {
				t.Fatalf("pipelined wrong password: %v, want AUTHENTICATIONFAILED", err)
			}
			if err := login(d.Users[user]); err != nil {
				t.Fatalf("pipelined login: %v", err)
			}
		})
	}
}

func TestDovecotRawLiteralLogin(t *testing.T) {
	d := startDovecot(t)
	h := newHarness(t, fixedRouter(dovecotBackend(d, routing.SecurityNone)), nil)
	c := dialConv(t, h.tlsAddr, h.clientTLS)
	c.Expect("* OK")
	pass := d.Users["carol"]
	c.Send("a LOGIN {5}\r\n")
	c.Expect("+ ")
	c.Send(fmt.Sprintf("CAROL {%d}\r\n", len(pass)))
	c.Expect("+ ")
	c.Send(pass + "\r\n")
	l := c.Expect("a OK [CAPABILITY IMAP4rev1")
	if strings.Contains(l, "LOGINDISABLED") || strings.Contains(l, "STARTTLS") {
		t.Errorf("login reply %q carries pre-auth capabilities", l)
	}
	c.Send("b LOGOUT\r\n")
	c.Expect("* BYE")
	c.Expect("b OK")
	c.ExpectClosed("* BYE")
}

func TestDovecotMailFlow(t *testing.T) {
	d := startDovecot(t)
	h := newHarness(t, fixedRouter(dovecotBackend(d, routing.SecurityStartTLS)), nil)
	const user = "alice@example.org"
	pass := d.Users[user]

	// Session 1 idles on INBOX and must see what session 2 appends.
	idler, exists := dialWatching(t, h, user, pass)
	sel, err := idler.Select("INBOX", nil).Wait()
	if err != nil {
		t.Fatal(err)
	}
	idle, err := idler.Idle()
	if err != nil {
		t.Fatal(err)
	}

	c, err := imapclient.DialStartTLS(h.startTLSAddr, &imapclient.Options{TLSConfig: h.clientTLS})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Login(user, pass).Wait(); err != nil {
		t.Fatal(err)
	}
	body := bigMessage(4 << 20)
	appendMessage(t, c, body)

	select {
	case n := <-exists:
		if n != sel.NumMessages+1 {
			t.Errorf("IDLE saw %d EXISTS, want %d", n, sel.NumMessages+1)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the idling session saw no EXISTS within 30s")
	}
	if err := idle.Close(); err != nil {
		t.Fatal(err)
	}
	if err := idle.Wait(); err != nil {
		t.Fatal(err)
	}

	checkNewest(t, c, body)
	for _, cl := range []*imapclient.Client{c, idler} {
		if err := cl.Logout().Wait(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestDovecotCompress turns on COMPRESS=DEFLATE after login: imapgate
// must pass the compressed stream through untouched.
func TestDovecotCompress(t *testing.T) {
	d := startDovecot(t)
	h := newHarness(t, fixedRouter(dovecotBackend(d, routing.SecurityNone)), nil)
	c := dialConv(t, h.tlsAddr, h.clientTLS)
	c.Expect("* OK")
	c.Send(`a LOGIN "bob@example.org" "` + d.Users["bob@example.org"] + `"` + "\r\n")
	l := c.Expect("a OK [CAPABILITY")
	if !strings.Contains(l, "COMPRESS=DEFLATE") {
		t.Skipf("this Dovecot has no COMPRESS=DEFLATE (imap_zlib): %q", l)
	}
	c.Send("z COMPRESS DEFLATE\r\n")
	c.Expect("z OK")
	fw, err := flate.NewWriter(c.C, flate.DefaultCompression)
	if err != nil {
		t.Fatal(err)
	}
	// c.br may hold nothing past the OK line: the server starts
	// compressing right after it.
	zr := bufio.NewReader(flate.NewReader(io.MultiReader(c.R, c.C)))
	for i, cmd := range []string{"s SELECT INBOX", "n NOOP", "o LOGOUT"} {
		fmt.Fprintf(fw, "%s\r\n", cmd)
		if err := fw.Flush(); err != nil {
			t.Fatal(err)
		}
		tag := cmd[:1]
		for {
			line, err := zr.ReadString('\n')
			if err != nil {
				t.Fatalf("command %d: reading compressed reply: %v", i, err)
			}
			if strings.HasPrefix(line, tag+" ") {
				if !strings.HasPrefix(line, tag+" OK") {
					t.Fatalf("%s: %q", cmd, line)
				}
				break
			}
		}
	}
}

func TestDovecotBackendGoesAway(t *testing.T) {
	d := startDovecot(t)
	h := newHarness(t, fixedRouter(dovecotBackend(d, routing.SecurityNone)), func(o *Options) {
		o.Timeouts.BackendConnect = 2 * time.Second
	})
	c := dialConv(t, h.tlsAddr, h.clientTLS)
	c.Expect("* OK")
	c.Send("a LOGIN alice@example.org " + d.Users["alice@example.org"] + "\r\n")
	c.Expect("a OK")
	c.Send("s SELECT INBOX\r\n")
	c.Tagged("s")

	// Dovecot stops mid-session: the client must see the connection end
	// (after Dovecot's BYE, if it sends one), not hang.
	d.Stop(t)
	c.C.SetReadDeadline(time.Now().Add(10 * time.Second))
	c.ExpectClosed("* BYE")

	// While it is down, logins get a quick NO [UNAVAILABLE].
	c2 := dialConv(t, h.tlsAddr, h.clientTLS)
	c2.Expect("* OK")
	start := time.Now()
	c2.Send("a LOGIN alice@example.org " + d.Users["alice@example.org"] + "\r\n")
	c2.Expect("a NO [UNAVAILABLE]")
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("NO [UNAVAILABLE] took %v", took)
	}
	// And once it is back, the same session logs in.
	d.Start(t)
	c2.Send("b LOGIN alice@example.org " + d.Users["alice@example.org"] + "\r\n")
	c2.Expect("b OK")
}
