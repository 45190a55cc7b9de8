package testenv

import (
	"bufio"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// This file holds the client side of scripted conversations, for the
// proxy's own tests and the integration tests in test/: a line-by-line
// client (Conv) and polling helpers for state that has no signal.

// Conv is a scripted client conversation on one connection: Send a line,
// Expect the answer's prefix. Every failure is the test's (t.Fatal).
type Conv struct {
	T testing.TB
	C net.Conn      // the connection (the TLS one after StartTLS)
	R *bufio.Reader // reads C
}

// DialConv connects to addr, over TLS when tlsCfg is set, with a 20 s
// deadline on the whole conversation. Cleanup closes it.
func DialConv(t testing.TB, addr string, tlsCfg *tls.Config) *Conv {
	t.Helper()
	return DialConvFrom(t, addr, nil, tlsCfg)
}

// DialConvFrom is DialConv from the local address from (nil: any), a
// loopback address other than 127.0.0.1, say, for tests of what is
// counted or forwarded per client address.
func DialConvFrom(t testing.TB, addr string, from net.IP, tlsCfg *tls.Config) *Conv {
	t.Helper()
	d := net.Dialer{}
	if from != nil {
		d.LocalAddr = &net.TCPAddr{IP: from}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	if tlsCfg != nil {
		tc := tls.Client(c, tlsCfg)
		if err := tc.Handshake(); err != nil {
			c.Close()
			t.Fatal(err)
		}
		c = tc
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	return &Conv{T: t, C: c, R: bufio.NewReader(c)}
}

// Send writes s as it is (the caller adds CRLF).
func (c *Conv) Send(s string) {
	c.T.Helper()
	if _, err := io.WriteString(c.C, s); err != nil {
		c.T.Fatalf("send %q: %v", s, err)
	}
}

// SendCut writes s to a server that may answer and hang up before it has
// read all of it (a line over every limit): a failed write is then no
// failure, the answer the test expects next is what counts.
func (c *Conv) SendCut(s string) {
	c.C.Write([]byte(s))
}

// Line reads one line, without its CRLF.
func (c *Conv) Line() string {
	c.T.Helper()
	l, err := c.R.ReadString('\n')
	if err != nil {
		c.T.Fatalf("reading a line: %v (got %q)", err, l)
	}
	return strings.TrimRight(l, "\r\n")
}

// Expect reads one line and checks its prefix.
func (c *Conv) Expect(prefix string) string {
	c.T.Helper()
	l := c.Line()
	if !strings.HasPrefix(l, prefix) {
		c.T.Fatalf("got %q, want a line starting with %q", l, prefix)
	}
	return l
}

// Tagged reads lines up to the one tagged tag (IMAP) and returns it and
// the lines before it.
func (c *Conv) Tagged(tag string) (last string, untagged []string) {
	c.T.Helper()
	for {
		l := c.Line()
		if strings.HasPrefix(l, tag+" ") {
			return l, untagged
		}
		untagged = append(untagged, l)
	}
}

// ExpectClosed checks that the server hangs up, allowing only lines
// that start with allowed (IMAP: "* BYE"; "" allows none).
func (c *Conv) ExpectClosed(allowed string) {
	c.T.Helper()
	for {
		l, err := c.R.ReadString('\n')
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			c.T.Fatalf("the connection is still open (%v)", err)
		}
		if err != nil {
			return
		}
		if allowed == "" || !strings.HasPrefix(l, allowed) {
			c.T.Fatalf("got %q while waiting for the close", l)
		}
	}
}

// StartTLS runs IMAP STARTTLS (tag "st") and the handshake.
func (c *Conv) StartTLS(cfg *tls.Config) {
	c.T.Helper()
	c.Send("st STARTTLS\r\n")
	c.Expect("st OK")
	c.Handshake(cfg)
}

// Handshake switches the conversation to TLS, dropping anything read
// ahead (as a client must after STARTTLS).
func (c *Conv) Handshake(cfg *tls.Config) {
	c.T.Helper()
	tc := tls.Client(c.C, cfg)
	if err := tc.Handshake(); err != nil {
		c.T.Fatalf("STARTTLS handshake: %v", err)
	}
	c.C = tc
	c.R = bufio.NewReader(tc)
}

// WaitFor polls cond for up to 10 s: for state that has no signal to
// wait on (a session registry updated by another goroutine).
func WaitFor(t testing.TB, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// WaitLog waits up to 10 s for a line of Dovecot's log that contains
// every one of want, and returns it: Dovecot writes it asynchronously to
// the event a test caused, and there is no other signal.
func (d *Dovecot) WaitLog(t testing.TB, want ...string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		for _, l := range strings.Split(d.Log(), "\n") {
			ok := true
			for _, w := range want {
				ok = ok && strings.Contains(l, w)
			}
			if ok {
				return l
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no Dovecot log line with %q; log:\n%s", want, d.Log())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// SieveResponse reads one whole ManageSieve response: its data lines
// (capabilities, say) and the status line (OK, NO or BYE).
func (c *Conv) SieveResponse() (lines []string, status string) {
	c.T.Helper()
	for {
		l := c.Line()
		if strings.HasPrefix(l, "OK") || strings.HasPrefix(l, "NO") || strings.HasPrefix(l, "BYE") {
			return lines, l
		}
		lines = append(lines, l)
	}
}

// SieveStartTLS reads the ManageSieve greeting, runs STARTTLS and the
// handshake, and reads the capabilities the server sends again after it.
func (c *Conv) SieveStartTLS(cfg *tls.Config) {
	c.T.Helper()
	c.SieveResponse()
	c.Send("STARTTLS\r\n")
	c.Expect("OK")
	c.Handshake(cfg)
	c.SieveResponse()
}
