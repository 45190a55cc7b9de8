package proxy

import (
	"crypto/tls"
	"fmt"
	"testing"

	"github.com/imapgate/imapgate/routing"
)

// A client that resumes its TLS session with the ticket of an earlier one
// (as mail clients do on reconnect) logs in, selects and logs out through
// the proxy to Dovecot like any other, with a fresh backend connection or
// a pooled one. The bench's resumed login row relies on the first check:
// its CPU figure means nothing if the ticket is not taken.
func TestDovecotResumedLogin(t *testing.T) {
	d := startDovecot(t)
	const user, pass = "bob@example.org", "bob pass with spaces"
	if d.Users[user] != pass {
		t.Fatalf("testenv's Dovecot has no user %s with password %q", user, pass)
	}
	for _, pool := range []int{0, 2} {
		t.Run(fmt.Sprintf("pool=%d", pool), func(t *testing.T) {
			h := newHarness(t, fixedRouter(dovecotBackend(d, routing.SecurityNone)), func(o *Options) {
				o.Backend.Pool.Size = pool
			})
			cfg := h.clientTLS.Clone()
			cfg.ClientSessionCache = tls.NewLRUClientSessionCache(4)
			for i := range 3 {
				c := dialConv(t, h.tlsAddr, cfg)
				c.Expect("* OK")
				// The ticket came with the greeting (after the handshake);
				// every connection after the first offers it.
				if got := c.C.(*tls.Conn).ConnectionState().DidResume; got != (i > 0) {
					t.Fatalf("connection %d: DidResume = %v, want %v", i, got, i > 0)
				}
				c.Send("a LOGIN " + quote(user) + " " + quote(pass) + "\r\n")
				if l, _ := c.Tagged("a"); !hasPrefixFold(l, "a OK") {
					t.Fatalf("connection %d: LOGIN: %q", i, l)
				}
				c.Send("b SELECT INBOX\r\n")
				if l, _ := c.Tagged("b"); !hasPrefixFold(l, "b OK") {
					t.Fatalf("connection %d: SELECT: %q", i, l)
				}
				c.Send("c LOGOUT\r\n")
				if l, _ := c.Tagged("c"); !hasPrefixFold(l, "c OK") {
					t.Fatalf("connection %d: LOGOUT: %q", i, l)
				}
				c.ExpectClosed("* BYE")
			}
		})
	}
}

func hasPrefixFold(s, prefix string) bool {
	_, ok := cutPrefixFold(s, prefix)
	return ok
}
