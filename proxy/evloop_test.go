//go:build linux

package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imapgate/imapgate/proxy/internal/tls13"
	"github.com/imapgate/imapgate/routing"
)

// loopAsleep reports, from inside its loop, whether es is registered and
// asleep (swept: no AEAD, no buffer).
func loopAsleep(es *evSession) bool {
	var asleep bool
	es.loop.do(func() { asleep = es.key != 0 && !es.gone && es.awakeAt == 0 })
	return asleep
}

// assertLoopAsleep waits until the loop has put es to sleep and checks
// what it then holds, looking from inside the loop goroutine (nothing of
// the session moves meanwhile).
func assertLoopAsleep(t *testing.T, es *evSession) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		var (
			asleep, awake, buf, keys, pend bool
		)
		es.loop.do(func() {
			asleep = es.key != 0 && !es.gone && es.awakeAt == 0
			if !asleep {
				return
			}
			es.rc.wmu.Lock()
			awake, pend = es.rc.l.Awake(), es.rc.pend != nil
			es.rc.wmu.Unlock()
			buf, keys = es.rc.rbuf != nil, es.rc.nbConn.keys != nil
		})
		if !asleep {
			continue
		}
		if awake || buf || keys || pend {
			t.Fatalf("idle loop session holds: AEAD %v, buffer %v, keys %v, pending records %v", awake, buf, keys, pend)
		}
		return
	}
	t.Fatal("the loop did not put the session to sleep within 10s")
}

// endMetrics hands each session's end reason and byte counts to a channel.
type endMetrics struct {
	nopMetrics
	ends chan sessionEnd
}

type sessionEnd struct {
	reason  EndReason
	in, out int64
}

func (m *endMetrics) SessionEnded(_, _ string, r EndReason, in, out int64, _ time.Duration) {
	m.ends <- sessionEnd{r, in, out}
}

// waitEnd returns the next session end, failing after 10 s.
func (m *endMetrics) waitEnd(t *testing.T) sessionEnd {
	t.Helper()
	select {
	case e := <-m.ends:
		return e
	case <-time.After(10 * time.Second):
		t.Fatal("no session end within 10s")
	}
	return sessionEnd{}
}

// pattern is n bytes that show where a byte came from: no '\n', so that a
// stream of them never ends a line.
func pattern(seed, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = 'a' + byte((i*7+seed)%26)
	}
	return b
}

// startLoopBackend is a scripted IMAP backend for the event loop's tests.
// After a login it answers:
//
//	t NOOP       t OK
//	t BIG n      * BIG {n}, n pattern bytes, CRLF, t OK
//	t ECHO       t OK, then every byte back until the client's EOF, then
//	             "* echo done" and a close
//	t QUIT       * BYE, and a close (the backend's EOF)
//	t STREAM     pattern bytes without end, until the connection fails
func startLoopBackend(t *testing.T) string {
	return startScriptBackend(t, "loop", func(c net.Conn, br *bufio.Reader, w func(string), tag, cmd string, args []string) bool { // nbsplice_test.go
		switch cmd {
		case "BIG":
			n, _ := strconv.Atoi(args[0])
			w(fmt.Sprintf("* BIG {%d}\r\n", n))
			c.Write(pattern(n, n))
			w("\r\n" + tag + " OK\r\n")
		case "ECHO":
			w(tag + " OK echo\r\n")
			io.Copy(c, br)
			w("* echo done\r\n")
			return false
		case "QUIT":
			w("* BYE\r\n")
			return false
		case "STREAM":
			for i := 0; ; i++ {
				if _, err := c.Write(pattern(i, 4096)); err != nil {
					return false
				}
			}
		default:
			w(tag + " OK\r\n")
		}
		return true
	})
}

// loopHarness is a harness on startLoopBackend whose session ends reach
// m; mod changes the options further.
func loopHarness(t *testing.T, mod func(*Options)) (*harness, *endMetrics) {
	t.Helper()
	m := &endMetrics{ends: make(chan sessionEnd, 100)}
	b := &routing.Backend{ID: "loop", Addr: startLoopBackend(t), Security: routing.SecurityNone}
	h := newHarness(t, fixedRouter(b), func(o *Options) {
		o.Metrics = m
		if mod != nil {
			mod(o)
		}
	})
	return h, m
}

// loginLoop logs a TLS 1.3 client in and returns it once its session is
// on an event loop.
func loginLoop(t *testing.T, h *harness) (*conv, *session) {
	t.Helper()
	c := dialConv(t, h.tlsAddr, h.clientTLS)
	c.C.SetDeadline(time.Now().Add(30 * time.Second))
	c.Expect("* OK")
	c.Send("a LOGIN user pass\r\n")
	if last, _ := c.Tagged("a"); !strings.HasPrefix(last, "a OK") {
		t.Fatalf("login: %q", last)
	}
	// The login's OK can reach the client a moment before the splice
	// hands the session to its loop: wait for that hand-off.
	local := c.C.LocalAddr().String()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		for _, s := range h.srv.spliceSessions() {
			if s.remote.String() == local && s.ev.Load() != nil {
				return c, s
			}
		}
	}
	t.Fatal("no session on an event loop within 10s")
	return nil, nil
}

// readN reads exactly n bytes of c's stream.
func readN(t *testing.T, c *conv, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.R, b); err != nil {
		t.Fatalf("reading %d bytes: %v", n, err)
	}
	return b
}

// expectCloseNotify reads to the end of c's stream and checks that it
// ended with close_notify (crypto/tls says io.EOF only then).
func expectCloseNotify(t *testing.T, c *conv) {
	t.Helper()
	rest, err := io.ReadAll(c.R)
	if err != nil || len(rest) != 0 {
		t.Fatalf("the end of the stream: %v after %q, want close_notify", err, rest)
	}
}

// Many sessions on the loops at once, each echoing a megabyte in chunks
// of every size both ways while the others do the same: every byte comes
// back intact and in order, and each session ends with the client's
// half-close, the backend's answer after it, and close_notify.
func TestLoopInterleavedSessions(t *testing.T) {
	h, m := loopHarness(t, nil)
	const sessions, total = 12, 1 << 20
	var wg sync.WaitGroup
	errs := make(chan error, sessions)
	loops := map[*evLoop]int{}
	for i := range sessions {
		c, s := loginLoop(t, h)
		loops[s.ev.Load().loop]++
		c.Send("e ECHO\r\n")
		c.Expect("e OK")
		wg.Add(2)
		data := pattern(i, total)
		go func() { // writer "echo-writer"
			defer wg.Done()
			for off, k := 0, 0; off < total; k++ {
				n := min(total-off, 1+(k*7919+i*131)%(40<<10))
				if _, err := c.C.Write(data[off : off+n]); err != nil {
					errs <- err
					return
				}
				off += n
			}
			c.C.(*tls.Conn).CloseWrite()
		}()
		go func() { // reader "echo-reader"
			defer wg.Done()
			got := make([]byte, total)
			if _, err := io.ReadFull(c.R, got); err != nil {
				errs <- fmt.Errorf("session %d: %v", i, err)
				return
			}
			if !bytes.Equal(got, data) {
				errs <- fmt.Errorf("session %d: the echo differs", i)
				return
			}
			l, err := c.R.ReadString('\n')
			rest, rerr := io.ReadAll(c.R)
			if l != "* echo done\r\n" || err != nil || rerr != nil || len(rest) > 0 {
				errs <- fmt.Errorf("session %d: after the echo %q %v, then %q %v", i, l, err, rest, rerr)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if len(loops) >= sessions {
		t.Fatalf("%d sessions on %d loops: none shared one", sessions, len(loops))
	}
	for range sessions {
		if e := m.waitEnd(t); e.reason != EndClientClosed || e.in < total || e.out < total {
			t.Errorf("session end %+v, want %v with at least %d bytes each way", e, EndClientClosed, total)
		}
	}
}

// A client that stops reading while its backend sends 32 MiB: the loop
// stops reading the backend with one buffer of sealed records pending,
// and once the client reads, every byte arrives intact.
func TestLoopSlowClient(t *testing.T) {
	h, _ := loopHarness(t, nil)
	c, s := loginLoop(t, h)
	es := s.ev.Load()
	const n = 32 << 20
	c.Send(fmt.Sprintf("b BIG %d\r\n", n))
	var (
		stalled     bool
		pendLen     int
		rbuf, ready bool
		out         int64
	)
	for deadline := time.Now().Add(10 * time.Second); !stalled && time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		es.loop.do(func() {
			es.rc.wmu.Lock()
			defer es.rc.wmu.Unlock()
			stalled = es.rc.pend != nil && !es.cOut
			if stalled {
				pendLen = es.rc.pendEnd - es.rc.pendOff
				rbuf, out = es.rc.rbuf != nil, s.out.Load()
				for _, r := range es.loop.ready {
					ready = ready || r == es
				}
			}
		})
	}
	if !stalled {
		t.Fatal("the session never stalled on the client")
	}
	if pendLen <= 0 || pendLen > tls13.SealBufLen || rbuf || ready || out >= n {
		t.Fatalf("stalled session: %d bytes pending, read buffer %v, on the ready list %v, %d of %d bytes out", pendLen, rbuf, ready, out, n)
	}
	if l := c.Line(); l != fmt.Sprintf("* BIG {%d}", n) {
		t.Fatalf("got %q", l)
	}
	if got := readN(t, c, n); !bytes.Equal(got, pattern(n, n)) {
		t.Fatal("the 32 MiB arrived changed")
	}
	c.Expect("")
	c.Expect("b OK")
	c.Send("c NOOP\r\n")
	c.Expect("c OK")
}

// startLoops logs a first session in, which starts the loops, and
// returns it after a round trip.
func startLoops(t *testing.T, h *harness) *session {
	t.Helper()
	c, s := loginLoop(t, h)
	c.Send("z NOOP\r\n")
	c.Expect("z OK")
	return s
}

// eachLoop runs f in every loop's goroutine in turn.
func eachLoop(h *harness, f func(*evLoop)) {
	for _, l := range h.srv.loops.Load().loops {
		l.do(func() { f(l) })
	}
}

// setAdoptHook sets testHookAdopt to f until the test ends.
func setAdoptHook(t *testing.T, f func(s *session, adopt func())) {
	testHookAdopt.Store(&f)
	t.Cleanup(func() { testHookAdopt.Store(nil) })
}

// A session goes onto its loop without waking it: the loop takes its
// queue (eventfd) only for do's own calls around a login and a round trip.
func TestLoopAdoptsWithoutWaking(t *testing.T) {
	h, _ := loopHarness(t, nil)
	s0 := startLoops(t, h)
	queued := func() map[*evLoop]uint64 {
		m := map[*evLoop]uint64{}
		eachLoop(h, func(l *evLoop) { m[l] = l.queued })
		return m
	}
	before := queued()
	c, s := loginLoop(t, h)
	c.Send("b NOOP\r\n")
	c.Expect("b OK")
	after := queued()
	for l, n := range after {
		if d := n - before[l]; d != 1 {
			t.Errorf("a loop took its queue %d times around a login and a NOOP, want 1 (do's own)", d)
		}
	}
	if s.ev.Load().loop == nil || s0.ev.Load() == nil {
		t.Fatal("sessions not on loops")
	}
}

// A session closed from outside between its publication and its
// adoption (a kick at that moment) is ended by its loop and not
// registered after: the loop's map does not keep it.
func TestLoopClosedBeforeAdopt(t *testing.T) {
	h, m := loopHarness(t, nil)
	startLoops(t, h)
	count := func() int {
		n := 0
		eachLoop(h, func(l *evLoop) {
			l.mu.Lock()
			n += len(l.sessions)
			l.mu.Unlock()
		})
		return n
	}
	before := count()
	adopted := make(chan bool, 1)
	setAdoptHook(t, func(s *session, adopt func()) {
		s.closeConns()
		es := s.ev.Load()
		gone := false
		for deadline := time.Now().Add(10 * time.Second); !gone && time.Now().Before(deadline); time.Sleep(time.Millisecond) {
			es.loop.do(func() { gone = es.gone })
		}
		adopt()
		adopted <- gone
	})
	c := dialConv(t, h.tlsAddr, h.clientTLS)
	c.C.SetDeadline(time.Now().Add(30 * time.Second))
	c.Expect("* OK")
	c.Send("a LOGIN user pass\r\n")
	select {
	case gone := <-adopted:
		if !gone {
			t.Fatal("the loop did not end the closed session")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the session was not adopted")
	}
	testHookAdopt.Store(nil)
	select {
	case <-m.ends:
	case <-time.After(10 * time.Second):
		t.Fatal("the session did not end")
	}
	if after := count(); after != before {
		t.Fatalf("the loops hold %d sessions after, %d before", after, before)
	}
}

// A session whose sockets close before its adoption, without its loop
// being told (closeConns not yet past the close): adopt finds them
// closed and queues the session, which its loop ends.
func TestLoopClosedAtAdopt(t *testing.T) {
	h, m := loopHarness(t, nil)
	startLoops(t, h)
	setAdoptHook(t, func(s *session, adopt func()) {
		s.raw.Close()
		s.mu.Lock()
		bc := s.bconn
		s.mu.Unlock()
		bc.Close()
		adopt()
	})
	c := dialConv(t, h.tlsAddr, h.clientTLS)
	c.C.SetDeadline(time.Now().Add(30 * time.Second))
	c.Expect("* OK")
	c.Send("a LOGIN user pass\r\n")
	select {
	case <-m.ends:
	case <-time.After(10 * time.Second):
		t.Fatal("the session closed at its adoption did not end")
	}
}

// A backend that stops reading while the client sends: the loop keeps
// the remainder, asks for EPOLLOUT on the backend's socket, and goes on
// when the backend reads again: every byte comes back.
func TestLoopSlowBackend(t *testing.T) {
	h, _ := loopHarness(t, nil)
	c, s := loginLoop(t, h)
	es := s.ev.Load()
	c.Send("b ECHO\r\n")
	c.Expect("b OK echo")
	const n = 64 << 20 // more than every socket buffer on the way holds
	data := pattern(7, n)
	sent := make(chan error, 1)
	go func() { // the client writes without reading: the echo backs up
		_, err := c.C.Write(data)
		sent <- err
	}()
	stalled := false
	for deadline := time.Now().Add(10 * time.Second); !stalled && time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		es.loop.do(func() { stalled = es.upPend > 0 && !es.bOut && es.bArmed })
	}
	if !stalled {
		t.Fatal("the session never stalled on the backend")
	}
	if got := readN(t, c, n); !bytes.Equal(got, data) {
		t.Fatal("the echo came back changed")
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
}

// A kick while the session is quiet says BYE (the stream is at a line
// boundary) and ends it with the kick's reason; a kick in the middle of a
// stream says nothing that could land inside it.
func TestLoopKick(t *testing.T) {
	h, m := loopHarness(t, nil)
	c, _ := loginLoop(t, h)
	c.Send("b NOOP\r\n")
	c.Expect("b OK")
	if n := h.srv.EvictUser("user", ""); n != 1 {
		t.Fatalf("evicted %d sessions", n)
	}
	c.Expect("* BYE [UNAVAILABLE] Your mailbox moved")
	expectCloseNotify(t, c)
	if e := m.waitEnd(t); e.reason != EndMoved {
		t.Fatalf("ended %v, want %v", e.reason, EndMoved)
	}

	c, _ = loginLoop(t, h)
	c.Send("s STREAM\r\n")
	readN(t, c, 1) // the stream has started: no line ends from here on
	if n := h.srv.EvictUser("user", ""); n != 1 {
		t.Fatalf("evicted %d sessions", n)
	}
	rest, _ := io.ReadAll(c.R)
	if bytes.Contains(rest, []byte("BYE")) {
		t.Fatal("a BYE inside the stream")
	}
	if e := m.waitEnd(t); e.reason != EndMoved {
		t.Fatalf("ended %v, want %v", e.reason, EndMoved)
	}
}

// closeConns from another goroutine (as a drain or Shutdown's force do)
// ends a loop session promptly, asleep or streaming: a closed socket
// leaves the epoll set without an event, so the loop must be told.
func TestLoopCloseConns(t *testing.T) {
	h, m := loopHarness(t, nil)
	c, s := loginLoop(t, h)
	c.Send("b NOOP\r\n")
	c.Expect("b OK")
	assertLoopAsleep(t, s.ev.Load())
	go s.closeConns() // goroutine "closer"
	io.ReadAll(c.R)
	if e := m.waitEnd(t); e.reason != EndClosed {
		t.Fatalf("idle: ended %v, want %v", e.reason, EndClosed)
	}

	c, s = loginLoop(t, h)
	c.Send("s STREAM\r\n")
	readN(t, c, 64<<10)
	go s.closeConns() // goroutine "closer"
	io.ReadAll(c.R)
	if e := m.waitEnd(t); e.reason != EndClosed {
		t.Fatalf("busy: ended %v, want %v", e.reason, EndClosed)
	}
}

// The backend's EOF: its last bytes, close_notify, both legs closed.
// The client's half-close is TestLoopInterleavedSessions'.
func TestLoopBackendEOF(t *testing.T) {
	h, m := loopHarness(t, nil)
	c, _ := loginLoop(t, h)
	c.Send("q QUIT\r\n")
	c.Expect("* BYE")
	expectCloseNotify(t, c)
	if e := m.waitEnd(t); e.reason != EndBackendClosed {
		t.Fatalf("ended %v, want %v", e.reason, EndBackendClosed)
	}
}

// A 4 MiB APPEND to a real Dovecot through the loop, and its FETCH back.
func TestDovecotLoopLargeAppend(t *testing.T) {
	d := startDovecot(t)
	h := newHarness(t, fixedRouter(dovecotBackend(d, routing.SecurityNone)), nil)
	const user = "alice@example.org"
	c := dialConv(t, h.tlsAddr, h.clientTLS)
	c.C.SetDeadline(time.Now().Add(60 * time.Second))
	c.Expect("* OK")
	c.Send("a LOGIN " + user + " " + d.Users[user] + "\r\n")
	if last, _ := c.Tagged("a"); !strings.HasPrefix(last, "a OK") {
		t.Fatalf("login: %q", last)
	}
	body := bigMessage(4 << 20)
	c.Send(fmt.Sprintf("b APPEND INBOX {%d+}\r\n%s\r\n", len(body), body))
	if last, _ := c.Tagged("b"); !strings.HasPrefix(last, "b OK") {
		t.Fatalf("APPEND: %q", last)
	}
	found := false
	for _, s := range h.srv.spliceSessions() {
		found = found || s.ev.Load() != nil
	}
	if !found {
		t.Fatal("the session is not on an event loop")
	}
	c.Send("c SELECT INBOX\r\n")
	c.Tagged("c")
	c.Send("d FETCH * BODY.PEEK[]\r\n")
	head := c.Line()
	var n int
	if _, err := fmt.Sscanf(head[strings.LastIndexByte(head, '{'):], "{%d}", &n); err != nil || n != len(body) {
		t.Fatalf("FETCH answer %q", head)
	}
	if got := readN(t, c, n); !bytes.Equal(got, body) {
		t.Fatal("FETCH brought back other bytes than the APPEND sent")
	}
	if last, _ := c.Tagged("d"); !strings.HasPrefix(last, "d OK") {
		t.Fatalf("FETCH: %q", last)
	}
}

// loopParked is 2 when sess is on an event loop and asleep there (both
// directions "parked": no goroutine, no AEAD, no buffer), else 0.
func loopParked(sess *session) int {
	if es := sess.ev.Load(); es != nil && loopAsleep(es) {
		return 2
	}
	return 0
}

// A loop's sockets leave the runtime's epoll set: the loop found that set,
// and it no longer lists the session's client socket.
func TestLoopLeavesRuntimePoller(t *testing.T) {
	h, _ := loopHarness(t, nil)
	c, s := loginLoop(t, h)
	c.Send("b NOOP\r\n")
	c.Expect("b OK")
	es := s.ev.Load()
	rtPoller.Lock()
	rt := rtPoller.fd
	rtPoller.Unlock()
	if rt <= 0 {
		t.Fatalf("the runtime's epoll set was not found (%d)", rt)
	}
	var fd int
	es.crw.Control(func(f uintptr) { fd = int(f) })
	if got := findRuntimeEpoll(fd, es.loop.epfd); got != -1 {
		t.Fatalf("the client socket is still in epoll set %d", got)
	}
}

// A panic in one session's work on a loop ends that session (panic), and
// the loop goes on serving the others.
func TestLoopPanicEndsOneSession(t *testing.T) {
	h, m := loopHarness(t, nil)
	other, os := loginLoop(t, h)
	// Sessions go to the loops in turn: one of the next len(loops) shares
	// the first one's loop.
	var (
		c  *conv
		es *evSession
	)
	for range h.srv.loops.Load().loops {
		var s *session
		c, s = loginLoop(t, h)
		if es = s.ev.Load(); es.loop == os.ev.Load().loop {
			break
		}
	}
	es.loop.do(func() {
		// A read offset past the buffer: the next read slices out of range.
		es.rc.rbuf = recBufs.Get().(*[]byte)
		es.rc.have = 1 << 20
	})
	c.Send("p NOOP\r\n")
	io.ReadAll(c.R)
	if e := m.waitEnd(t); e.reason != EndPanic {
		t.Fatalf("ended %v, want %v", e.reason, EndPanic)
	}
	other.Send("b NOOP\r\n")
	other.Expect("b OK")
}

// Shutdown whose context ends while a loop session is still open closes
// it (BYE, reason shutdown), returns the context's error, and stops the
// loops after the session ended.
func TestLoopShutdownForced(t *testing.T) {
	h, m := loopHarness(t, nil)
	c, s := loginLoop(t, h)
	l := s.ev.Load().loop
	c.Send("b NOOP\r\n")
	c.Expect("b OK")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := h.srv.Shutdown(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Shutdown = %v, want %v", err, context.Canceled)
	}
	c.Expect("* BYE [UNAVAILABLE] Server shutting down")
	expectCloseNotify(t, c)
	if e := m.waitEnd(t); e.reason != EndShutdown {
		t.Fatalf("ended %v, want %v", e.reason, EndShutdown)
	}
	select {
	case <-l.done:
	default:
		t.Fatal("the loop still runs after Shutdown returned")
	}
}

// With the runtime's epoll set not found (findRuntimeEpoll failing, as
// where /proc is not mounted), a loop keeps serving its sessions with
// their sockets in both sets: the runtime's edges wake nobody who acts
// on them. Round trips, a stream larger than the socket buffers with a
// stalled reader, and the next command all work.
func TestLoopKeepsRuntimePoller(t *testing.T) {
	h, _ := loopHarness(t, nil)
	c0, _ := loginLoop(t, h) // starts the loops
	c0.Send("z NOOP\r\n")
	c0.Expect("z OK")
	rtPoller.Lock()
	was := rtPoller.fd
	rtPoller.fd = -1
	rtPoller.Unlock()
	t.Cleanup(func() {
		rtPoller.Lock()
		rtPoller.fd = was
		rtPoller.Unlock()
	})
	c, s := loginLoop(t, h)
	es := s.ev.Load()
	var fd int
	es.crw.Control(func(f uintptr) { fd = int(f) })
	if got := findRuntimeEpoll(fd, es.loop.epfd); got <= 0 {
		t.Fatalf("the client socket left the runtime's epoll set (%d) though it was not to be looked for", got)
	}
	for i := range 50 {
		c.Send(fmt.Sprintf("n%d NOOP\r\n", i))
		c.Expect(fmt.Sprintf("n%d OK", i))
	}
	stallThenDrain(t, c, s, 16<<20)
}

// stallThenDrain asks for n bytes, lets the session stall on the
// client's full socket (waitStalled), then reads them all and checks
// them, and that the session goes on.
func stallThenDrain(t *testing.T, c *conv, s *session, n int) {
	t.Helper()
	c.Send(fmt.Sprintf("b BIG %d\r\n", n))
	waitStalled(t, s, int64(n))
	if l := c.Line(); l != fmt.Sprintf("* BIG {%d}", n) {
		t.Fatalf("got %q", l)
	}
	if got := readN(t, c, n); !bytes.Equal(got, pattern(n, n)) {
		t.Fatalf("the %d bytes arrived changed", n)
	}
	c.Expect("")
	c.Expect("b OK")
	c.Send("c NOOP\r\n")
	c.Expect("c OK")
}

// waitStalled waits until s has sent part of an n-byte answer and sends
// no more: its writer waits on the client's full socket.
func waitStalled(t *testing.T, s *session, n int64) {
	t.Helper()
	last, same := int64(-1), 0
	for deadline := time.Now().Add(10 * time.Second); same < 20; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the session never stalled on the client: %d of %d bytes out", s.out.Load(), n)
		}
		out := s.out.Load()
		if out == last && out > 0 && out < n {
			same++
		} else {
			same = 0
		}
		last = out
	}
}

// On the goroutine path (event_loop off) the backend-to-client writer
// waits on a full client socket (rawWrite's wait for writability) and
// resumes when the client reads: the stream arrives whole, and the
// session goes on.
func TestSpliceGoroutineSlowClient(t *testing.T) {
	h, _ := loopHarness(t, func(o *Options) { o.SpliceLoop = LoopOff })
	c := dialConv(t, h.tlsAddr, h.clientTLS)
	c.C.SetDeadline(time.Now().Add(30 * time.Second))
	c.Expect("* OK")
	c.Send("a LOGIN user pass\r\n")
	c.Expect("a OK")
	var s *session
	for deadline := time.Now().Add(10 * time.Second); s == nil; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no spliced session")
		}
		if ss := h.srv.spliceSessions(); len(ss) == 1 {
			s = ss[0]
		}
	}
	if s.ev.Load() != nil {
		t.Fatal("the session is on an event loop with event_loop off")
	}
	stallThenDrain(t, c, s, 32<<20)
}
