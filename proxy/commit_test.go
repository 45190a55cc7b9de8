package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"github.com/imapgate/imapgate/internal/testenv"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/imapgate/imapgate/internal/memimap"
	"github.com/imapgate/imapgate/routing"
)

// committer is a router that records placements: Route proposes b,
// Commit answers what commit says and counts the calls.
type committer struct {
	b      *routing.Backend
	commit func(user string, b *routing.Backend) (*routing.Backend, error)
	calls  atomic.Int64
}

func (c *committer) Route(context.Context, string) (*routing.Backend, error) { return c.b, nil }

func (c *committer) Commit(_ context.Context, user string, b *routing.Backend) (*routing.Backend, error) {
	c.calls.Add(1)
	return c.commit(user, b)
}

// The proxy commits a route only once the backend accepted the login, and
// refuses (temporarily) a login whose commit answers another backend or
// fails: the user is never served where the router did not place them.
func TestLoginCommits(t *testing.T) {
	addr := startMemBackend(t)
	mem := &routing.Backend{ID: "mem1", Addr: addr}
	other := &routing.Backend{ID: "elsewhere", Addr: addr}
	var mu sync.Mutex
	answer := func(*routing.Backend) (*routing.Backend, error) { return mem, nil }
	r := &committer{b: mem, commit: func(_ string, b *routing.Backend) (*routing.Backend, error) {
		mu.Lock()
		defer mu.Unlock()
		return answer(b)
	}}
	set := func(f func(*routing.Backend) (*routing.Backend, error)) {
		mu.Lock()
		answer = f
		mu.Unlock()
	}
	h := newHarness(t, r, nil)

	c := dialConv(t, h.tlsAddr, h.clientTLS)
	c.Expect("* OK")
	c.Send("a LOGIN alice@example.org wrong\r\n")
	c.Expect("a NO [AUTHENTICATIONFAILED]")
	if n := r.calls.Load(); n != 0 {
		t.Fatalf("a failed login committed its route (%d calls)", n)
	}

	set(func(*routing.Backend) (*routing.Backend, error) { return other, nil })
	c.Send("b LOGIN alice@example.org alicepass\r\n")
	c.Expect("b NO [UNAVAILABLE]")
	set(func(*routing.Backend) (*routing.Backend, error) { return nil, routing.ErrNoBackend })
	c.Send("c LOGIN alice@example.org alicepass\r\n")
	c.Expect("c NO [UNAVAILABLE]")
	if n := len(h.srv.Sessions("alice@example.org", "")); n != 0 {
		t.Fatalf("%d sessions of a refused user", n)
	}
	set(func(b *routing.Backend) (*routing.Backend, error) { return b, nil })
	c.Send("d LOGIN alice@example.org alicepass\r\n")
	c.Expect("d OK")
	if n := r.calls.Load(); n != 3 {
		t.Errorf("Commit called %d times, want 3 (once per accepted login)", n)
	}
	testenv.WaitFor(t, func() bool { return len(h.srv.Sessions("alice@example.org", "mem1")) == 1 })
}

// Defect 7: kicking sessions stuck behind clients that do not read runs
// them concurrently. Each kick waits about a second for the pump's write
// to time out; one after the other, five took five seconds.
func TestKickStuckSessionsConcurrently(t *testing.T) {
	const n = 5
	users := map[string]string{}
	for i := range n {
		users[fmt.Sprintf("stuck%d", i)] = "pass"
	}
	// One user per session: go-imap's memory server holds a mailbox's
	// lock while it writes a FETCH answer.
	mem, err := memimap.Start("", users)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mem.Close() })
	h := newHarness(t, fixedRouter(&routing.Backend{ID: "mem1", Addr: mem.Addr}), nil)
	body := bigMessage(8 << 20)
	for u := range users {
		cl, err := imapclient.DialTLS(h.tlsAddr, &imapclient.Options{TLSConfig: h.clientTLS})
		if err != nil {
			t.Fatal(err)
		}
		if err := cl.Login(u, "pass").Wait(); err != nil {
			t.Fatal(err)
		}
		appendMessage(t, cl, body)
		cl.Logout().Wait()
		cl.Close()
	}
	testenv.WaitFor(t, func() bool { return len(h.srv.Sessions("", "")) == 0 })

	for u := range users {
		raw, err := net.Dial("tcp", h.tlsAddr)
		if err != nil {
			t.Fatal(err)
		}
		raw.(*net.TCPConn).SetReadBuffer(4096)
		tc := tls.Client(raw, h.clientTLS)
		t.Cleanup(func() { tc.Close() })
		c := &conv{T: t, C: tc, R: bufioReader(tc)}
		tc.SetDeadline(time.Now().Add(20 * time.Second))
		c.Expect("* OK")
		c.Send("a LOGIN " + u + " pass\r\n")
		c.Expect("a OK")
		c.Send("s SELECT INBOX\r\n")
		c.Tagged("s")
		c.Send("f FETCH 1:* BODY.PEEK[]\r\n") // and never read the answer
	}
	// The backend has sent more than the clients can have taken: the
	// proxy's writes to each client are blocked.
	testenv.WaitFor(t, func() bool {
		ss := h.srv.Sessions("", "mem1")
		if len(ss) != n {
			return false
		}
		for _, s := range ss {
			if s.Out < 1<<20 {
				return false
			}
		}
		return true
	})
	start := time.Now()
	if got := h.srv.EvictBackend("mem1"); got != n {
		t.Fatalf("EvictBackend closed %d, want %d", got, n)
	}
	took := time.Since(start)
	t.Logf("kicked %d stuck sessions in %v", n, took)
	if took > 3*time.Second {
		t.Errorf("kicking %d stuck sessions took %v: they ran one after the other", n, took)
	}
	testenv.WaitFor(t, func() bool { return len(h.srv.Sessions("", "")) == 0 })
}
