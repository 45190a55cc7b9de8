package proxy

import (
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// sockKeepAlive reads c's keep-alive settings from the kernel: off, or on
// with the idle time, interval (s) and probe count.
func sockKeepAlive(t *testing.T, c net.Conn) (on bool, idle, intvl, cnt int) {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var errs [4]error
	var ka int
	rc.Control(func(fd uintptr) {
		ka, errs[0] = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_KEEPALIVE)
		idle, errs[1] = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_KEEPIDLE)
		intvl, errs[2] = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_KEEPINTVL)
		cnt, errs[3] = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_KEEPCNT)
	})
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	return ka != 0, idle, intvl, cnt
}

// TestKeepAliveBothLegs: both legs of a spliced session carry
// Timeouts.KeepAlive (2 min by default, where Go alone would have set
// 15 s on the accepted and the dialled connection), and a negative value
// turns keep-alive off on both.
func TestKeepAliveBothLegs(t *testing.T) {
	for _, tc := range []struct {
		name string
		set  time.Duration
		on   bool
		idle int
	}{
		{"default", 0, true, 120},
		{"set", 45 * time.Second, true, 45},
		{"off", -1, false, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := memHarness(t, func(o *Options) { o.Timeouts.KeepAlive = tc.set })
			c := dialConv(t, h.tlsAddr, h.clientTLS)
			c.Expect("* OK")
			c.Send("a LOGIN alice@example.org alicepass\r\n")
			c.Expect("a OK")
			sess := h.srv.spliceSessions()
			if len(sess) != 1 {
				t.Fatalf("%d spliced sessions, want 1", len(sess))
			}
			s := sess[0]
			s.mu.Lock()
			legs := map[string]net.Conn{"client": s.raw, "backend": s.bconn}
			s.mu.Unlock()
			for leg, conn := range legs {
				on, idle, intvl, cnt := sockKeepAlive(t, conn)
				if on != tc.on || on && (idle != tc.idle || intvl != 30 || cnt != 4) {
					t.Errorf("%s leg: keep-alive %v idle %d s interval %d s count %d; want %v idle %d s, 30 s, 4",
						leg, on, idle, intvl, cnt, tc.on, tc.idle)
				}
			}
		})
	}
}

// TestKeepAliveLMTP: LMTP connections get Timeouts.KeepAlive too (the
// binary's listeners set none), through the listener serveLMTP wraps.
func TestKeepAliveLMTP(t *testing.T) {
	srv, err := NewServer(Options{Router: fixedRouter(nil), Timeouts: Timeouts{KeepAlive: 50 * time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	lc := net.ListenConfig{KeepAlive: -1} // as cmd/imapgate listens
	ln, err := lc.Listen(t.Context(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	kl := keepAliveListener{ln, srv}
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sc, err := kl.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	if on, idle, intvl, cnt := sockKeepAlive(t, sc); !on || idle != 50 || intvl != 30 || cnt != 4 {
		t.Errorf("keep-alive %v idle %d s interval %d s count %d; want on, 50 s, 30 s, 4", on, idle, intvl, cnt)
	}
}
