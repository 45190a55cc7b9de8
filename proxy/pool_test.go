package proxy

import (
	"errors"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/imapgate/imapgate/routing"
)

// poolIdle is how many greeted connections wait for b.
func (s *Server) poolIdle(addr string) int {
	s.pool.mu.Lock()
	defer s.pool.mu.Unlock()
	return len(s.pool.idle[addr])
}

// waitPool waits until the pool holds want connections to addr.
func waitPool(t *testing.T, s *Server, addr string, want int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for s.poolIdle(addr) != want {
		if time.Now().After(deadline) {
			t.Fatalf("pool holds %d connections to %s, want %d", s.poolIdle(addr), addr, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// poolLogin logs in through h and runs a command on the backend.
func poolLogin(t *testing.T, h *harness, user, pass string) {
	t.Helper()
	c, err := imapclient.DialTLS(h.tlsAddr, &imapclient.Options{TLSConfig: h.clientTLS})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Login(user, pass).Wait(); err != nil {
		t.Fatalf("login as %s: %v", user, err)
	}
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	if err := c.Logout().Wait(); err != nil {
		t.Fatal(err)
	}
}

func TestDovecotBackendPool(t *testing.T) {
	d := startDovecot(t)
	for _, sec := range []routing.Security{routing.SecurityNone, routing.SecurityStartTLS} {
		t.Run("backend="+sec.String(), func(t *testing.T) {
			b := dovecotBackend(d, sec)
			h := newHarness(t, fixedRouter(b), func(o *Options) { o.Backend.Pool = PoolOptions{Size: 2} })
			user, pass := "alice@example.org", d.Users["alice@example.org"]
			poolLogin(t, h, user, pass) // dials, and fills the pool
			waitPool(t, h.srv, b.Addr, 2)
			for user, pass := range d.Users { // each from the pool, used once
				poolLogin(t, h, user, pass)
				waitPool(t, h.srv, b.Addr, 2)
			}

			// Waiting connections the backend dropped: the login dials anew.
			h.srv.pool.mu.Lock()
			for _, e := range h.srv.pool.idle[b.Addr] {
				e.conn.Close()
			}
			h.srv.pool.mu.Unlock()
			poolLogin(t, h, user, pass)

			// A wrong password on a pooled connection is the backend's NO,
			// told to the client as it is.
			waitPool(t, h.srv, b.Addr, 2)
			c, err := imapclient.DialTLS(h.tlsAddr, &imapclient.Options{TLSConfig: h.clientTLS})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if err := c.Login("bob@example.org", "wrong").Wait(); err == nil || !strings.Contains(err.Error(), "AUTHENTICATIONFAILED") {
				t.Fatalf("wrong password on a pooled connection: %v, want AUTHENTICATIONFAILED", err)
			}
		})
	}
}

func TestBackendPoolSkipsProxyProtocolAndTLS(t *testing.T) {
	for _, b := range []*routing.Backend{
		{ID: "pp", Addr: "127.0.0.1:1", ProxyProtocol: 2},
		{ID: "tls", Addr: "127.0.0.1:1", Security: routing.SecurityTLS},
	} {
		if poolable(b) {
			t.Errorf("backend %s is pooled", b.ID)
		}
	}
}

// TestDovecotBackendPoolStale: connections that waited longer than MaxAge
// are closed, not used; the login dials.
func TestDovecotBackendPoolStale(t *testing.T) {
	d := startDovecot(t)
	b := dovecotBackend(d, routing.SecurityNone)
	h := newHarness(t, fixedRouter(b), func(o *Options) { o.Backend.Pool = PoolOptions{Size: 2, MaxAge: time.Nanosecond} })
	user, pass := "alice@example.org", d.Users["alice@example.org"]
	poolLogin(t, h, user, pass)
	waitPool(t, h.srv, b.Addr, 2)
	h.srv.pool.mu.Lock()
	old := slices.Clone(h.srv.pool.idle[b.Addr])
	h.srv.pool.mu.Unlock()
	// Logged in and still spliced: a stale connection it had used would be
	// open now.
	c, err := imapclient.DialTLS(h.tlsAddr, &imapclient.Options{TLSConfig: h.clientTLS})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Login(user, pass).Wait(); err != nil {
		t.Fatal(err)
	}
	for _, e := range old {
		e.conn.SetReadDeadline(time.Now().Add(time.Second)) // an open one must not hang the test
		if _, err := e.conn.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
			t.Errorf("a stale pooled connection is still open (read: %v)", err)
		}
	}
}
