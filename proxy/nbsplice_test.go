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
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	testenv.Accept(t, ln, func(c net.Conn) {
		w := func(s string) { c.Write([]byte(s)) }
		w("* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] split backend\r\n")
		br := bufio.NewReader(c)
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			tag, rest, _ := strings.Cut(strings.TrimRight(line, "\r\n"), " ")
			cmd, _, _ := strings.Cut(rest, " ")
			switch strings.ToUpper(cmd) {
			case "AUTHENTICATE", "LOGIN":
				w(tag + " OK [CAPABILITY IMAP4rev1] logged in\r\n")
			case "NOOP":
				w("* 1 EXISTS\r\n")
				w(tag + " OK NOOP done\r\n")
			case "LOGOUT":
				w("* BYE bye\r\n")
				w(tag + " OK LOGOUT done\r\n")
				return
			default:
				w(tag + " OK\r\n")
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
