//go:build linux

package proxy

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/testenv"
	"github.com/imapgate/imapgate/proxy/internal/tls13"
	"github.com/imapgate/imapgate/routing"
	"golang.org/x/sys/unix"
)

// recClient is an IMAP client whose TLS records, after its login, are
// carried by tls13 too: so that the test sees what imapgate's record
// layer sends (KeyUpdates, close_notify), not only the bytes.
type recClient struct {
	t       *testing.T
	c       net.Conn
	l       *tls13.Layer
	buf     []byte
	have    int
	pending []byte // application data read, not yet consumed
	empty   int    // records without application data (KeyUpdates)
}

func (r *recClient) record() error {
	for {
		n, err := r.l.RecordLen(r.buf[:r.have])
		if err != nil {
			return err
		}
		if n > 0 {
			data, upd, err := r.l.Open(r.buf[:n])
			r.pending = append(r.pending, data...)
			r.have = copy(r.buf, r.buf[n:r.have])
			if err == nil && len(data) == 0 {
				r.empty++
			}
			if upd {
				r.t.Fatal("imapgate asked for a KeyUpdate")
			}
			return err
		}
		m, err := r.c.Read(r.buf[r.have:])
		r.have += m
		if err != nil {
			return err
		}
	}
}

// line reads one line of the stream.
func (r *recClient) line() string {
	r.t.Helper()
	for {
		if i := bytes.IndexByte(r.pending, '\n'); i >= 0 {
			l := string(r.pending[:i+1])
			r.pending = r.pending[i+1:]
			return l
		}
		if err := r.record(); err != nil {
			r.t.Fatalf("reading a line: %v", err)
		}
	}
}

func (r *recClient) tagged(tag string) string {
	r.t.Helper()
	for {
		if l := r.line(); strings.HasPrefix(l, tag+" ") {
			return l
		}
	}
}

func (r *recClient) send(p []byte) {
	r.t.Helper()
	for len(p) > 0 {
		n := min(len(p), tls13.MaxPlaintext)
		rec, err := r.l.SealRecord(nil, p[:n])
		if err != nil {
			r.t.Fatal(err)
		}
		if _, err := r.c.Write(rec); err != nil {
			r.t.Fatal(err)
		}
		p = p[n:]
	}
}

// parkedSession waits until the server holds one spliced session and both its
// directions are parked, and returns it.
func parkedSession(t *testing.T, srv *Server) *session {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		srv.mu.Lock()
		var s *session
		for sess := range srv.sessions {
			s = sess
		}
		srv.mu.Unlock()
		if s != nil {
			s.mu.Lock()
			up, down := s.up, s.down
			s.mu.Unlock()
			if up != nil && down != nil && up.parked.Load() && down.parked.Load() {
				return s
			}
			if es := s.ev.Load(); es != nil && loopAsleep(es) {
				return s
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatal("no parked spliced session within 10s")
	return nil
}

// assertAsleep checks what a parked taken-over session holds. It looks
// while holding the parker's lock with both directions parked: the parker
// cannot start either again meanwhile, so the test reads their state
// after their last writes and before their next ones.
func assertAsleep(t *testing.T, srv *Server, s *session) {
	t.Helper()
	if es := s.ev.Load(); es != nil {
		assertLoopAsleep(t, es)
		return
	}
	p := srv.parker.Load()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		p.mu.Lock()
		if !s.up.parked.Load() || !s.down.parked.Load() {
			p.mu.Unlock()
			continue
		}
		rc := s.rec.Load()
		if rc == nil {
			p.mu.Unlock()
			t.Fatal("the TLS 1.3 session was not taken over")
		}
		s.wmu.Lock()
		_, isRec := s.client.(*recordConn)
		awake := rc.l.Awake()
		s.wmu.Unlock()
		buf, keys := rc.rbuf != nil, rc.nbConn.keys != nil
		p.mu.Unlock()
		if !isRec || awake || buf || keys {
			t.Fatalf("parked session holds: client is record conn %v, AEAD %v, buffer %v, keys %v", isRec, awake, buf, keys)
		}
		return
	}
	t.Fatal("the session did not park within 10s")
}

// A TLS 1.3 session through imapgate to a real Dovecot is handed over to
// imapgate's record layer at the splice, parks holding no AEAD and no
// buffer, wakes for commands, a 64 KiB APPEND and its FETCH, answers a
// KeyUpdate, and ends with close_notify.
//
// It runs on both data paths: the event loop (the default) and, with
// the loop off, the goroutines of the parker path.
func TestDovecotRecordTakeover(t *testing.T) {
	d := startDovecot(t)
	t.Run("event loop", func(t *testing.T) { testRecordTakeover(t, d, LoopAuto) })
	t.Run("goroutines", func(t *testing.T) { testRecordTakeover(t, d, LoopOff) })
}

func testRecordTakeover(t *testing.T, d *testenv.Dovecot, loop LoopMode) {
	h := newHarness(t, fixedRouter(dovecotBackend(d, routing.SecurityNone)), func(o *Options) { o.SpliceLoop = loop })
	const user = "alice@example.org"

	keys := new(tls13.KeyLog)
	cfg := h.clientTLS.Clone()
	cfg.KeyLogWriter = keys
	tc, err := tls.Dial("tcp", h.tlsAddr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	tc.SetDeadline(time.Now().Add(30 * time.Second))
	br := bufio.NewReader(tc)
	readLine := func() string {
		l, err := br.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	readLine() // greeting
	fmt.Fprintf(tc, "a LOGIN %s %s\r\n", user, d.Users[user])
	for l := readLine(); !strings.HasPrefix(l, "a "); l = readLine() {
	}
	if br.Buffered() != 0 {
		t.Fatal("bytes after the login's OK")
	}
	s := parkedSession(t, h.srv)
	if onLoop := s.ev.Load() != nil; onLoop != (loop == LoopAuto) {
		t.Fatalf("the taken-over session on an event loop: %v, with %v", onLoop, loop)
	}
	assertAsleep(t, h.srv, s)

	// The client hands its side over too.
	l, err := tls13.Takeover(tc, keys)
	if err != nil {
		t.Fatal(err)
	}
	rc := &recClient{t: t, c: tc.NetConn(), l: l, buf: make([]byte, 64<<10)}
	rc.send([]byte("b SELECT INBOX\r\n"))
	if got := rc.tagged("b"); !strings.HasPrefix(got, "b OK") {
		t.Fatalf("SELECT: %q", got)
	}

	// A KeyUpdate asking for one back, then a command under the new key.
	ku, err := l.SealKeyUpdate(nil, true)
	if err != nil {
		t.Fatal(err)
	}
	rc.c.Write(ku)
	rc.send([]byte("c NOOP\r\n"))
	if got := rc.tagged("c"); !strings.HasPrefix(got, "c OK") {
		t.Fatalf("NOOP after a KeyUpdate: %q", got)
	}
	if rc.empty != 1 {
		t.Fatalf("%d KeyUpdates from imapgate, want 1", rc.empty)
	}
	assertAsleep(t, h.srv, s)

	// Wake with an upload of 64 KiB: full records, cut across reads.
	body := bigMessage(64 << 10)
	rc.send(fmt.Appendf(nil, "d APPEND INBOX {%d+}\r\n%s\r\n", len(body), body))
	if got := rc.tagged("d"); !strings.HasPrefix(got, "d OK") {
		t.Fatalf("APPEND: %q", got)
	}
	rc.send([]byte("e FETCH * BODY.PEEK[]\r\n"))
	head := rc.line()
	var n int
	if _, err := fmt.Sscanf(head[strings.LastIndexByte(head, '{'):], "{%d}", &n); err != nil || n != len(body) {
		t.Fatalf("FETCH answer %q", head)
	}
	for len(rc.pending) < n {
		if err := rc.record(); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(rc.pending[:n], body) {
		t.Fatal("FETCH brought back other bytes than the APPEND sent")
	}
	rc.pending = rc.pending[n:]
	if got := rc.tagged("e"); !strings.HasPrefix(got, "e OK") {
		t.Fatalf("FETCH: %q", got)
	}
	assertAsleep(t, h.srv, s)

	// LOGOUT: Dovecot's BYE, then imapgate's close_notify.
	rc.send([]byte("z LOGOUT\r\n"))
	if got := rc.tagged("z"); !strings.HasPrefix(got, "z OK") {
		t.Fatalf("LOGOUT: %q", got)
	}
	for {
		err := rc.record()
		if err == nil {
			continue
		}
		if err != io.EOF || len(rc.pending) != 0 {
			t.Fatalf("after LOGOUT: %v (%q left), want imapgate's close_notify", err, rc.pending)
		}
		break
	}
}

// A TLS 1.2 client, and a TLS 1.3 one with the takeover turned off, stay
// on crypto/tls and work as before.
func TestDovecotRecordsStayOnCryptoTLS(t *testing.T) {
	d := startDovecot(t)
	const user = "alice@example.org"
	for _, tc := range []struct {
		name string
		mode RecordMode
		max  uint16
	}{
		{"TLS 1.2", RecordsTakeover, tls.VersionTLS12},
		{"takeover off", RecordsCryptoTLS, tls.VersionTLS13},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, fixedRouter(dovecotBackend(d, routing.SecurityNone)), func(o *Options) { o.TLSRecords = tc.mode })
			cfg := h.clientTLS.Clone()
			cfg.MaxVersion = tc.max
			c := dialConv(t, h.tlsAddr, cfg)
			c.Expect("* OK")
			c.Send("a LOGIN " + user + " " + d.Users[user] + "\r\n")
			if last, _ := c.Tagged("a"); !strings.HasPrefix(last, "a OK") {
				t.Fatalf("login: %q", last)
			}
			s := parkedSession(t, h.srv)
			if s.rec.Load() != nil {
				t.Fatal("taken over")
			}
			selectAndLogout(t, c)
			if _, err := c.R.ReadByte(); !errors.Is(err, io.EOF) {
				t.Fatalf("after LOGOUT: %v", err)
			}
		})
	}
}

// finishedHeld is a client's socket that passes its first write (the
// ClientHello) and keeps the rest (its Finished, then anything written
// before release) from the server.
type finishedHeld struct {
	net.Conn
	writes int
	held   []byte
	hold   bool
}

func (c *finishedHeld) Write(p []byte) (int, error) {
	if c.writes++; c.hold && c.writes > 1 {
		c.held = append(c.held, p...)
		return len(p), nil
	}
	return c.Conn.Write(p)
}

// On the implicit-TLS listener the greeting comes with the server's first
// flight (greetInFlight): the client reads it while imapgate has not yet
// had its Finished, logs in after it, and the session is taken over as
// usual. (TLS 1.2 and the takeover turned off, where the greeting comes
// after the handshake: TestDovecotRecordsStayOnCryptoTLS.)
func TestDovecotGreetingInFlight(t *testing.T) {
	d := startDovecot(t)
	const user = "alice@example.org"
	h := newHarness(t, fixedRouter(dovecotBackend(d, routing.SecurityNone)), nil)
	raw, err := net.Dial("tcp", h.tlsAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	fh := &finishedHeld{Conn: raw, hold: true}
	tc := tls.Client(fh, h.clientTLS)
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	if len(fh.held) == 0 {
		t.Fatal("the client's Finished was not held")
	}
	// Held, the client's Finished cannot have reached imapgate: the
	// greeting is here only if it came with the flight.
	raw.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(tc)
	greeting, err := br.ReadString('\n')
	if err != nil {
		t.Fatalf("no greeting before the client's Finished: %v", err)
	}
	if !strings.HasPrefix(greeting, "* OK [CAPABILITY IMAP4rev1 ") || strings.Contains(greeting, "STARTTLS") || !strings.Contains(greeting, "AUTH=PLAIN") {
		t.Fatalf("greeting %q, want the capabilities of a TLS session", greeting)
	}
	raw.SetDeadline(time.Now().Add(30 * time.Second))
	fh.hold = false
	if _, err := raw.Write(fh.held); err != nil {
		t.Fatal(err)
	}
	c := &conv{T: t, C: tc, R: br}
	c.Send("a LOGIN " + user + " " + d.Users[user] + "\r\n")
	if last, _ := c.Tagged("a"); !strings.HasPrefix(last, "a OK") {
		t.Fatalf("login: %q", last)
	}
	if s := parkedSession(t, h.srv); s.rec.Load() == nil {
		t.Fatal("not taken over after a greeting with the flight")
	}
	selectAndLogout(t, c)
}

// selectAndLogout selects INBOX and logs out through c.
func selectAndLogout(t *testing.T, c *conv) {
	t.Helper()
	c.Send("b SELECT INBOX\r\n")
	if last, _ := c.Tagged("b"); !strings.HasPrefix(last, "b OK") {
		t.Fatalf("SELECT: %q", last)
	}
	c.Send("z LOGOUT\r\n")
	if last, _ := c.Tagged("z"); !strings.HasPrefix(last, "z OK") {
		t.Fatalf("LOGOUT: %q", last)
	}
}

func TestKernelTLSProbe(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{nil, true},
		{fmt.Errorf("setsockopt: %w", unix.ENOTCONN), true},
		{fmt.Errorf("setsockopt: %w", unix.ENOENT), false},
		{fmt.Errorf("setsockopt: %w", unix.ENOPROTOOPT), false},
	} {
		if got := ulpOffered(tc.err); got != tc.want {
			t.Errorf("ulpOffered(%v) = %v", tc.err, got)
		}
	}
	// Whatever this kernel offers, the line says so in words.
	if s := kernelTLSState(); s == "" {
		t.Fatal("no state")
	}
}

// A client that pipelines past its LOGIN, in records of their own, may
// leave records in crypto/tls at the splice: the hand-off is then refused
// or not, depending on timing, and the session must work either way.
func TestDovecotRecordsPipelinedLogin(t *testing.T) {
	d := startDovecot(t)
	h := newHarness(t, fixedRouter(dovecotBackend(d, routing.SecurityNone)), nil)
	const user = "alice@example.org"
	for i := range 5 {
		c := dialConv(t, h.tlsAddr, h.clientTLS)
		c.Expect("* OK")
		c.Send("a LOGIN " + user + " " + d.Users[user] + "\r\n")
		c.Send("b SELECT INBOX\r\n")
		c.Send("c NOOP\r\n")
		for _, tag := range []string{"a", "b", "c"} {
			if last, _ := c.Tagged(tag); !strings.HasPrefix(last, tag+" OK") {
				t.Fatalf("round %d: %q", i, last)
			}
		}
		c.Send("z LOGOUT\r\n")
		if last, _ := c.Tagged("z"); !strings.HasPrefix(last, "z OK") {
			t.Fatalf("round %d: LOGOUT: %q", i, last)
		}
		c.C.Close()
	}
}
