package proxy

import (
	"bufio"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/testenv"
	"github.com/imapgate/imapgate/routing"
)

// startSplitBackend is a scripted IMAP backend that answers every NOOP
// in two writes (an untagged line, then the tagged one), so that bytes
// often arrive while the proxy is still forwarding the first part.
func startSplitBackend(t *testing.T) string {
	return startScriptBackend(t, "split", func(c net.Conn, br *bufio.Reader, w func(string), tag, cmd string, _ []string) bool {
		switch cmd {
		case "NOOP":
			w("* 1 EXISTS\r\n")
			w(tag + " OK NOOP done\r\n")
		case "LOGOUT":
			w("* BYE bye\r\n")
			w(tag + " OK LOGOUT done\r\n")
			return false
		default:
			w(tag + " OK\r\n")
		}
		return true
	})
}

// startScriptBackend is a scripted IMAP backend: it greets, accepts any
// LOGIN or AUTHENTICATE, and hands every other command line (its tag, its
// name in upper case and its other words) to answer, until answer returns
// false or the connection ends.
func startScriptBackend(t *testing.T, name string, answer func(c net.Conn, br *bufio.Reader, w func(string), tag, cmd string, args []string) bool) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	testenv.Accept(t, ln, func(c net.Conn) {
		w := func(s string) { c.Write([]byte(s)) }
		w("* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] " + name + " backend\r\n")
		br := bufio.NewReader(c)
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			f := strings.Fields(line)
			if len(f) < 2 {
				w("* BAD\r\n")
				continue
			}
			tag, cmd := f[0], strings.ToUpper(f[1])
			if cmd == "AUTHENTICATE" || cmd == "LOGIN" {
				w(tag + " OK [CAPABILITY IMAP4rev1] logged in\r\n")
				continue
			}
			if !answer(c, br, w, tag, cmd, f[2:]) {
				return
			}
		}
	})
	return ln.Addr().String()
}

// TestSpliceNoLostWakeup: with the parker out of reach (parkAfter of an
// hour), a spliced direction must still see every byte as it arrives. A
// wait that loses the poller's readiness (bytes that arrived between the
// last read and the wait) stalls the conversation until the deadline; the
// connection's 20 s deadline catches that.
func TestSpliceNoLostWakeup(t *testing.T) {
	b := &routing.Backend{ID: "split", Addr: startSplitBackend(t), Security: routing.SecurityNone}
	h := newHarness(t, fixedRouter(b), nil)
	h.srv.parkAfter = time.Hour
	c := dialConv(t, h.tlsAddr, h.clientTLS)
	c.Expect("* OK")
	c.Send("a LOGIN user pass\r\n")
	if last, _ := c.Tagged("a"); !strings.HasPrefix(last, "a OK") {
		t.Fatalf("login: %q", last)
	}
	for i := range 500 {
		tag := fmt.Sprintf("n%d", i)
		c.C.SetDeadline(time.Now().Add(10 * time.Second))
		c.Send(tag + " NOOP\r\n")
		last, untagged := c.Tagged(tag)
		if !strings.HasPrefix(last, tag+" OK") || len(untagged) != 1 {
			t.Fatalf("NOOP %d: %q after %q", i, last, untagged)
		}
	}
	c.Send("z LOGOUT\r\n")
	c.Tagged("z")
}
