package proxy

import (
	"bytes"
	"context"
	"errors"
	"net"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/imapgate/imapgate/routing"
)

// PoolOptions configure a small pool of pre-connected backend connections
// per backend: connected and greeted before a client needs them, so that a
// login skips the backend's connect and greeting round trip. A pooled
// connection is used once, for one user, and never shared or returned: it
// is a connection the backend has greeted and nothing more.
//
// Only backends without a PROXY protocol header (the header names the
// client, unknown in advance) and without implicit TLS (the greeting comes
// after a handshake this pool does not do) are pooled; STARTTLS backends
// are, since their greeting is cleartext and the STARTTLS that follows
// drops anything read before it.
type PoolOptions struct {
	// Size is how many greeted connections are kept ready per backend.
	// Zero (the default) means no pool.
	Size int
	// MaxAge is how long a greeted connection may wait before it is
	// closed unused (the backend may drop a silent connection). Zero
	// means 30 s.
	MaxAge time.Duration
}

// pooled is one greeted connection.
type pooled struct {
	conn  net.Conn
	greet []byte // the greeting line with its CRLF, served first
	born  time.Time
}

// backendPool holds the greeted connections of every backend.
type backendPool struct {
	mu      sync.Mutex
	idle    map[string][]*pooled // by backend address
	filling map[string]int       // dials under way, by address
	closed  bool
	swept   time.Time      // when stale connections of every backend were last closed
	wg      sync.WaitGroup // fill goroutines
}

func newBackendPool() *backendPool {
	return &backendPool{idle: map[string][]*pooled{}, filling: map[string]int{}}
}

// poolable reports whether b's connections may be pooled.
func poolable(b *routing.Backend) bool {
	return b.ProxyProtocol == 0 && b.Security != routing.SecurityTLS
}

// poolTake returns a greeted connection to b wrapped so that its greeting is
// read first, or nil; either way it tops the pool up in the background.
func (s *Server) poolTake(b *routing.Backend) net.Conn {
	po := s.o().Backend.Pool
	if po.Size <= 0 || !poolable(b) {
		return nil
	}
	p := s.pool
	maxAge := po.MaxAge
	if maxAge <= 0 {
		maxAge = 30 * time.Second
	}
	var (
		got   *pooled
		stale []*pooled
	)
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	// The newest fresh connection is taken; stale ones are closed.
	var keep []*pooled
	for _, e := range slices.Backward(p.idle[b.Addr]) {
		switch {
		case time.Since(e.born) >= maxAge:
			stale = append(stale, e)
		case got == nil:
			got = e
		default:
			keep = append(keep, e)
		}
	}
	slices.Reverse(keep) // oldest first again
	p.idle[b.Addr] = keep
	if now := time.Now(); now.Sub(p.swept) >= maxAge {
		// Backends no longer routed to (drained, gone from Consul) are
		// never taken from again: their connections are closed here.
		p.swept = now
		for addr, list := range p.idle {
			var fresh []*pooled
			for _, e := range list {
				if now.Sub(e.born) < maxAge {
					fresh = append(fresh, e)
				} else {
					stale = append(stale, e)
				}
			}
			if len(fresh) == 0 {
				delete(p.idle, addr)
			} else {
				p.idle[addr] = fresh
			}
		}
	}
	missing := po.Size - len(keep) - p.filling[b.Addr]
	p.filling[b.Addr] += max(missing, 0)
	p.wg.Add(max(missing, 0))
	p.mu.Unlock()
	for _, e := range stale {
		e.conn.Close()
	}
	for range max(missing, 0) {
		go s.poolFill(b.Addr)
	}
	if got == nil {
		return nil
	}
	return &greetedConn{Conn: got.conn, greet: got.greet}
}

// poolFill dials addr, reads its greeting and puts the connection in the
// pool. It is the body of a goroutine started by poolTake.
func (s *Server) poolFill(addr string) {
	p := s.pool
	defer p.wg.Done()
	e := s.greet(addr)
	p.mu.Lock()
	p.filling[addr]--
	if e != nil && !p.closed {
		p.idle[addr] = append(p.idle[addr], e)
		e = nil
	}
	p.mu.Unlock()
	if e != nil {
		e.conn.Close()
	}
}

// greet connects to addr and reads the greeting line, or returns nil.
func (s *Server) greet(addr string) *pooled {
	t := s.o().Timeouts
	ctx, cancel := context.WithTimeout(s.base, t.BackendLogin)
	defer cancel()
	d := t.dialer()
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil
	}
	conn.SetReadDeadline(time.Now().Add(t.BackendLogin))
	defer conn.SetReadDeadline(time.Time{})
	// The backend sends its greeting and waits for a command: whatever one
	// read returns with the line is kept and served first.
	buf := make([]byte, 0, 512)
	for !bytes.Contains(buf, []byte("\n")) {
		if len(buf) == cap(buf) {
			conn.Close() // no greeting is this long
			return nil
		}
		n, err := conn.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err != nil {
			conn.Close()
			return nil
		}
	}
	return &pooled{conn: conn, greet: buf, born: time.Now()}
}

// close closes the idle connections and waits for fills under way.
func (p *backendPool) close() {
	p.mu.Lock()
	p.closed = true
	idle := p.idle
	p.idle = map[string][]*pooled{}
	p.mu.Unlock()
	for _, list := range idle {
		for _, e := range list {
			e.conn.Close()
		}
	}
	p.wg.Wait()
}

// greetedConn is a pooled connection: its greeting, already read, comes
// first.
type greetedConn struct {
	net.Conn
	greet []byte
}

// unwrap returns the connection itself once its greeting has been read.
func unwrapGreeted(c net.Conn) net.Conn {
	if g, ok := c.(*greetedConn); ok && len(g.greet) == 0 {
		return g.Conn
	}
	return c
}

// SyscallConn lets the splice wait on the socket (a STARTTLS backend's
// tls.Conn sits on this wrapper).
func (c *greetedConn) SyscallConn() (syscall.RawConn, error) {
	if sc, ok := c.Conn.(syscall.Conn); ok && len(c.greet) == 0 {
		return sc.SyscallConn()
	}
	return nil, errors.New("proxy: greeting not read yet")
}

func (c *greetedConn) Read(b []byte) (int, error) {
	if len(c.greet) > 0 {
		n := copy(b, c.greet)
		c.greet = c.greet[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}
