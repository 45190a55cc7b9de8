package testenv

import (
	"bufio"
	"compress/flate"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// imapClient is a minimal scripted IMAP conversation over raw bytes, so
// these tests check Dovecot itself and not an IMAP library's quoting.
type imapClient struct {
	t    testing.TB
	conn net.Conn
	r    *bufio.Reader
	w    io.Writer
	n    int
}

func dialIMAP(t testing.TB, addr string, conf *tls.Config) *imapClient {
	t.Helper()
	var c net.Conn
	var err error
	if conf != nil {
		c, err = tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, conf)
	} else {
		c, err = net.DialTimeout("tcp", addr, 5*time.Second)
	}
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	ic := &imapClient{t: t}
	ic.setConn(c)
	if g := ic.readLine(); !strings.HasPrefix(g, "* OK") {
		t.Fatalf("greeting: %q", g)
	}
	return ic
}

func (c *imapClient) setConn(conn net.Conn) {
	c.conn, c.r, c.w = conn, bufio.NewReader(conn), conn
	conn.SetDeadline(time.Now().Add(20 * time.Second))
}

func (c *imapClient) readLine() string {
	c.t.Helper()
	line, err := c.r.ReadString('\n')
	if err != nil {
		c.t.Fatalf("read: %v (got %q)", err, line)
	}
	return strings.TrimRight(line, "\r\n")
}

func (c *imapClient) write(s string) {
	c.t.Helper()
	if _, err := io.WriteString(c.w, s); err != nil {
		c.t.Fatalf("write: %v", err)
	}
	if f, ok := c.w.(interface{ Flush() error }); ok {
		if err := f.Flush(); err != nil {
			c.t.Fatalf("flush: %v", err)
		}
	}
}

// cmd sends one command line and returns every line up to and including
// the tagged response. Literals in args are sent by cmdParts.
func (c *imapClient) cmd(line string) (untagged []string, tagged string) {
	c.t.Helper()
	return c.cmdParts(line)
}

// cmdParts sends a command made of parts; every part but the last ends in
// a synchronising literal announcement "{N}", so the client waits for the
// "+" continuation before sending the next part.
func (c *imapClient) cmdParts(parts ...string) (untagged []string, tagged string) {
	c.t.Helper()
	c.n++
	tag := fmt.Sprintf("t%d", c.n)
	for i, p := range parts {
		if i == 0 {
			p = tag + " " + p
		}
		c.write(p + "\r\n")
		if i < len(parts)-1 {
			if l := c.readLine(); !strings.HasPrefix(l, "+") {
				c.t.Fatalf("no continuation for literal: %q", l)
			}
		}
	}
	for {
		l := c.readLine()
		if strings.HasPrefix(l, tag+" ") {
			return untagged, strings.TrimPrefix(l, tag+" ")
		}
		untagged = append(untagged, l)
	}
}

// quote makes an IMAP quoted string (RFC 3501 section 4.3).
func quote(s string) string {
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(s) + `"`
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

// login logs in with quoted strings, or with a literal password when it
// cannot be quoted (quoted strings are 7-bit text without CR or LF in
// IMAP4rev1), and returns the tagged response.
func (c *imapClient) login(user, pass string) string {
	c.t.Helper()
	if isASCII(pass) && !strings.ContainsAny(pass, "\r\n") {
		_, tagged := c.cmd("LOGIN " + quote(user) + " " + quote(pass))
		return tagged
	}
	_, tagged := c.cmdParts(fmt.Sprintf("LOGIN %s {%d}", quote(user), len(pass)), pass)
	return tagged
}

func TestDovecotLoginEveryDefaultUser(t *testing.T) {
	d := StartDovecot(t, DovecotOptions{})
	for user, pass := range DefaultUsers {
		t.Run(user, func(t *testing.T) {
			c := dialIMAP(t, d.Addr, nil)
			if got := c.login(user, pass); !strings.HasPrefix(got, "OK") {
				t.Fatalf("LOGIN %s: %s\n%s", user, got, d.Log())
			}
			if _, got := c.cmd("SELECT INBOX"); !strings.HasPrefix(got, "OK") {
				t.Fatalf("SELECT: %s", got)
			}
			c.cmd("LOGOUT")
		})
	}
	t.Run("literal user and password", func(t *testing.T) {
		c := dialIMAP(t, d.Addr, nil)
		user, pass := "carol", DefaultUsers["carol"]
		_, got := c.cmdParts(fmt.Sprintf("LOGIN {%d}", len(user)), fmt.Sprintf("%s {%d}", user, len(pass)), pass)
		if !strings.HasPrefix(got, "OK") {
			t.Fatalf("LOGIN with literals: %s", got)
		}
	})
	t.Run("user name case", func(t *testing.T) {
		c := dialIMAP(t, d.Addr, nil)
		if got := c.login("Alice@Example.ORG", "alicepass"); !strings.HasPrefix(got, "OK") {
			t.Fatalf("LOGIN in mixed case: %s", got)
		}
	})
	// Last: a failure makes Dovecot delay the next logins from this address.
	t.Run("wrong password", func(t *testing.T) {
		c := dialIMAP(t, d.Addr, nil)
		if got := c.login("alice@example.org", "wrong"); !strings.HasPrefix(got, "NO") {
			t.Fatalf("LOGIN with a wrong password: %s", got)
		}
	})
}

func TestDovecotTLS(t *testing.T) {
	d := StartDovecot(t, DovecotOptions{})
	conf := &tls.Config{RootCAs: d.CA.Pool, ServerName: "localhost"}

	t.Run("STARTTLS", func(t *testing.T) {
		c := dialIMAP(t, d.Addr, nil)
		caps, _ := c.cmd("CAPABILITY")
		if !strings.Contains(strings.Join(caps, " "), "STARTTLS") {
			t.Fatalf("no STARTTLS in %q", caps)
		}
		if _, got := c.cmd("STARTTLS"); !strings.HasPrefix(got, "OK") {
			t.Fatalf("STARTTLS: %s", got)
		}
		tc := tls.Client(c.conn, conf)
		if err := tc.Handshake(); err != nil {
			t.Fatalf("handshake against the test CA: %v", err)
		}
		c.setConn(tc)
		if got := c.login("bob@example.org", DefaultUsers["bob@example.org"]); !strings.HasPrefix(got, "OK") {
			t.Fatalf("LOGIN after STARTTLS: %s", got)
		}
	})
	t.Run("implicit TLS", func(t *testing.T) {
		c := dialIMAP(t, d.TLSAddr, conf)
		if got := c.login("alice@example.org", "alicepass"); !strings.HasPrefix(got, "OK") {
			t.Fatalf("LOGIN over TLS: %s", got)
		}
	})
	t.Run("certificate is for localhost and 127.0.0.1", func(t *testing.T) {
		for _, name := range []string{"localhost", "127.0.0.1"} {
			c, err := tls.Dial("tcp", d.TLSAddr, &tls.Config{RootCAs: d.CA.Pool, ServerName: name})
			if err != nil {
				t.Fatalf("ServerName %q: %v", name, err)
			}
			c.Close()
		}
	})
}

func TestDovecotCompress(t *testing.T) {
	d := StartDovecot(t, DovecotOptions{})
	if !strings.Contains(readFile(d.conf), "imap_zlib") {
		t.Skip("this Dovecot has no imap_zlib plugin")
	}
	c := dialIMAP(t, d.Addr, nil)
	got := c.login("alice@example.org", "alicepass")
	if !strings.Contains(got, "COMPRESS=DEFLATE") {
		t.Fatalf("post-login capabilities lack COMPRESS=DEFLATE: %s", got)
	}
	if _, got := c.cmd("COMPRESS DEFLATE"); !strings.HasPrefix(got, "OK") {
		t.Fatalf("COMPRESS DEFLATE: %s", got)
	}
	// RFC 4978: raw DEFLATE both ways, flushed after every command.
	fw, err := flate.NewWriter(c.conn, flate.DefaultCompression)
	if err != nil {
		t.Fatal(err)
	}
	c.r = bufio.NewReader(flate.NewReader(c.conn))
	c.w = fw
	if _, got := c.cmd("NOOP"); !strings.HasPrefix(got, "OK") {
		t.Fatalf("NOOP after COMPRESS: %s", got)
	}
}

func TestDovecotHibernate(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for the hibernate timeout")
	}
	d := StartDovecot(t, DovecotOptions{})
	c := dialIMAP(t, d.Addr, nil)
	if got := c.login("alice@example.org", "alicepass"); !strings.HasPrefix(got, "OK") {
		t.Fatal(got)
	}
	c.cmd("SELECT INBOX")
	c.write("idle IDLE\r\n")
	if l := c.readLine(); !strings.HasPrefix(l, "+") {
		t.Fatalf("IDLE: %q", l)
	}
	// The process titles carry the instance name (the directory's base
	// name), which tells this Dovecot's processes from other tests'.
	want := filepath.Base(d.Dir) + "/imap-hibernate [1 connections]"
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(psDovecot(t), want) {
		if time.Now().After(deadline) {
			t.Fatalf("session did not hibernate: no %q\nprocesses:\n%s\nlog:\n%s", want, psDovecot(t), d.Log())
		}
		time.Sleep(200 * time.Millisecond)
	}
	// And the imap process it came from is gone.
	if ps := psDovecot(t); strings.Contains(ps, filepath.Base(d.Dir)+"/imap [alice@example.org") {
		t.Errorf("imap process still there after hibernation:\n%s", ps)
	}
	// New mail must wake the session (the inotify handover works), and so
	// must the client ending IDLE.
	d.Doveadm(t, "save", "-u", "alice@example.org", "-m", "INBOX")
	for !strings.HasSuffix(c.readLine(), " EXISTS") {
	}
	c.write("DONE\r\n")
	for {
		l := c.readLine()
		if strings.HasPrefix(l, "idle ") {
			if !strings.HasPrefix(l, "idle OK") {
				t.Fatalf("end of IDLE: %q", l)
			}
			break
		}
	}
	if _, got := c.cmd("NOOP"); !strings.HasPrefix(got, "OK") {
		t.Fatalf("NOOP after hibernation: %s", got)
	}
}

func psDovecot(t testing.TB) string {
	Need(t, "ps") // procps; with CI set a missing ps fails the test
	out, err := exec.Command("ps", "-eo", "pid,user,args").Output()
	if err != nil {
		t.Fatalf("ps: %v", err)
	}
	var lines []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, "dovecot") {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "\n")
}

func TestDovecotStopStartAndTwoInstances(t *testing.T) {
	a := StartDovecot(t, DovecotOptions{})
	b := StartDovecot(t, DovecotOptions{Users: map[string]string{"Zed@Example.COM": "zed:colon{PLAIN}x"}, TrustedNetworks: "127.0.0.0/8"})
	if a.Addr == b.Addr || a.Dir == b.Dir {
		t.Fatalf("instances share %s / %s", a.Addr, a.Dir)
	}
	if got := dialIMAP(t, b.Addr, nil).login("zed@example.com", "zed:colon{PLAIN}x"); !strings.HasPrefix(got, "OK") {
		t.Fatalf("LOGIN on b: %s\n%s", got, b.Log())
	}
	if got := dialIMAP(t, b.Addr, nil).login("alice@example.org", "alicepass"); !strings.HasPrefix(got, "NO") {
		t.Fatalf("b knows a's user: %s", got)
	}

	c := dialIMAP(t, a.Addr, nil)
	if got := c.login("alice@example.org", "alicepass"); !strings.HasPrefix(got, "OK") {
		t.Fatal(got)
	}
	a.Doveadm(t, "mailbox", "create", "-u", "alice@example.org", "Kept")

	a.Stop(t)
	a.Stop(t) // idempotent
	// A live session is cut when its backend stops.
	c.conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(c.r); err != nil {
		t.Fatalf("session after Stop: %v", err)
	}
	if conn, err := net.DialTimeout("tcp", a.Addr, time.Second); err == nil {
		conn.Close()
		t.Fatalf("%s still accepts after Stop", a.Addr)
	}
	if got := dialIMAP(t, b.Addr, nil).login("zed@example.com", "zed:colon{PLAIN}x"); !strings.HasPrefix(got, "OK") {
		t.Fatalf("b is affected by a's Stop: %s", got)
	}

	a.Start(t)
	c = dialIMAP(t, a.Addr, nil)
	if got := c.login("alice@example.org", "alicepass"); !strings.HasPrefix(got, "OK") {
		t.Fatal(got)
	}
	if lines, _ := c.cmd(`LIST "" "*"`); !strings.Contains(strings.Join(lines, "\n"), "Kept") {
		t.Fatalf("mail did not survive the restart: %q", lines)
	}
	if !strings.Contains(a.Log(), "Login: user=<alice@example.org>") {
		t.Fatalf("log has no login line:\n%s", a.Log())
	}
}
