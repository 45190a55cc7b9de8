package proxy

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imapgate/imapgate/proxy/internal/tls13"
	"go.uber.org/zap"
)

// The record-layer hand-off (Options.TLSRecords, internal/tls13): a TLS
// 1.3 client session is carried by crypto/tls through its handshake and
// the login, and by imapgate's own record layer from the splice on. The
// traffic secrets come from a KeyLogWriter set on that connection's
// configuration alone, the sequence numbers from crypto/tls's fields
// (internal/tls13.Takeover, which refuses unless the hand-off is exact:
// any doubt leaves the session on crypto/tls, never a wrong byte).
//
// What it buys: a parked session keeps two secrets and two sequence
// numbers (no tls.Conn, no AEAD, no buffer); a direction that wakes
// rebuilds its AEAD. The backend-to-client direction reads up to eight
// records' worth of plaintext (tls13.Slots) with one readv into a buffer laid out for
// sealing in place, and writes them with one write; the client-to-backend
// direction opens records in the buffer it read them into.

// recBufs are the backend-to-client buffers: tls13.Slots records sealed in
// place (about 131 KiB), held while bytes move or the client is slow to
// read them.
var recBufs = sync.Pool{New: func() any { b := make([]byte, tls13.SealBufLen); return &b }}

// recvBufs are the client's records as they arrive: whole ones, opened in
// place, and the start of the next. Three records of the largest size a
// peer may send (about 49 KiB), not a seal buffer: a slow uploader holds
// one for as long as a record is partly read.
var recvBufs = sync.Pool{New: func() any { b := make([]byte, recvBufLen); return &b }}

const recvBufLen = 3 * (tls13.HeaderLen + tls13.MaxPlaintext + 256)

// recordConn is the client leg once taken over: its socket (the nbConn
// under the former tls.Conn) and the record layer. Writes are serialised
// by the session's wmu: Write is called with it held (the session's own
// writes, a kick's BYE), the other writers take it.
type recordConn struct {
	*nbConn
	l   *tls13.Layer
	wmu *sync.Mutex

	// The client-to-backend direction's buffer while a record is partly
	// read; carry keeps that part while the direction is parked.
	rbuf  *[]byte
	have  int
	carry []byte

	// Sealed records an event loop (evloop_linux.go) could not write yet,
	// pend[pendOff:pendEnd], under wmu: they go before anything sealed
	// later, so that sequence numbers stay in wire order. pendPlain is
	// the application data they carry, added to sent once written.
	pend             *[]byte
	pendOff, pendEnd int
	pendPlain        int
	pendNL           bool
	sent             *atomic.Int64
	// loop: an event loop carries the session, and writes to the
	// client that are not Write's never block (alerts are dropped when
	// the socket is full: the connection closes next).
	loop bool
}

var _ closeWriter = (*recordConn)(nil)

// keyLogFor returns the TLS configuration for one client handshake on
// conn: cfg itself, or, when the session may be taken over later, the
// server's handshake configuration for cfg (handshakeConfig), which logs
// the handshake's secrets into conn's KeyLog.
func (s *session) keyLogFor(conn any, cfg *tls.Config) *tls.Config {
	if s.srv.o().TLSRecords != RecordsTakeover || !tls13.Supported() {
		return cfg
	}
	if nc, ok := conn.(*nbConn); ok {
		nc.keys = new(tls13.KeyLog)
	}
	return s.srv.handshakeConfig(cfg)
}

// greetInFlight arranges for greeting to go out with the server's first
// flight of tc's handshake, sealed after its Finished (and the session
// ticket), instead of after the client's Finished: the client has it one
// round trip earlier, and may send its first command with its Finished.
// Only TLS 1.3 handshakes whose secrets conn logs do this
// (tls13.SealInFlight refuses the rest, and the greeting is then written
// after the handshake as before). It reports, after the handshake,
// through greetedInFlight.
func greetInFlight(conn net.Conn, tc *tls.Conn, greeting string) {
	if nc, ok := conn.(*nbConn); ok && nc.keys != nil && greeting != "" {
		nc.flight, nc.tc = []byte(greeting), tc
	}
}

// greetedInFlight reports whether the greeting went with the flight, and
// forgets the arrangement.
func greetedInFlight(conn net.Conn) bool {
	nc, ok := conn.(*nbConn)
	if !ok {
		return false
	}
	sent := nc.flightSent
	nc.flight, nc.tc, nc.flightSent = nil, nil, false
	return sent
}

// writeFlight writes the server's first flight p with the greeting
// sealed after it, in one write, or p alone when the greeting may not go
// yet (tls13.SealInFlight says why).
func (c *nbConn) writeFlight(p []byte) (int, error) {
	rec, err := tls13.SealInFlight(c.tc, c.keys, c.flight)
	c.flight, c.tc = nil, nil
	if err != nil {
		return rawWrite(c.nb.rc, p)
	}
	c.flightSent = true
	buf := make([]byte, 0, len(p)+len(rec))
	buf = append(append(buf, p...), rec...)
	n, err := rawWrite(c.nb.rc, buf)
	return min(n, len(p)), err
}

// handshakeConfig is the configuration every client handshake on cfg
// starts from while records may be taken over: one per cfg, kept until
// the options bring another. Its GetConfigForClient settles on cfg (or
// what cfg's own GetConfigForClient returns), copied per handshake so that
// the ticket keys are the ones set now, with the KeyLogWriter of the
// connection's KeyLog: crypto/tls reads the KeyLogWriter from the
// configuration it settles on.
//
// It must be one per cfg, not a copy per handshake: without ticket keys
// set by the caller, crypto/tls makes its own automatic ones on the
// configuration given to tls.Server, and a fresh copy each time would
// make every ticket one no later handshake can open (TestDovecotResumedLogin
// caught it).
func (srv *Server) handshakeConfig(cfg *tls.Config) *tls.Config {
	if hc := srv.hsConfig.Load(); hc != nil && hc.base == cfg {
		return hc.outer
	}
	outer := cfg.Clone()
	outer.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		c := cfg
		if cfg.GetConfigForClient != nil {
			got, err := cfg.GetConfigForClient(hello)
			if err != nil {
				return nil, err
			}
			if got != nil {
				c = got
			}
		}
		c = c.Clone()
		if nc, ok := hello.Conn.(*nbConn); ok {
			if nc.keys != nil && slices.Contains(hello.SupportedVersions, tls.VersionTLS13) {
				nc.keys.Next, c.KeyLogWriter = c.KeyLogWriter, nc.keys
			}
			if slices.Contains(hello.SupportedProtos, "acme-tls/1") {
				nc.flight, nc.tc = nil, nil // a CA's challenge: the handshake is all it wants
			}
		}
		return c, nil
	}
	srv.hsConfig.Store(&handshakeConfig{base: cfg, outer: outer})
	return outer
}

// takeOverRecords hands the client leg to the record layer if it can be
// handed over exactly; otherwise the session stays on crypto/tls. It runs
// in the session's goroutine as the splice starts, before any direction.
func (s *session) takeOverRecords() {
	tc, ok := s.client.(*tls.Conn)
	if !ok {
		return
	}
	nc, ok := tc.NetConn().(*nbConn)
	if !ok || nc.keys == nil {
		return
	}
	keys := nc.keys
	nc.keys = nil
	defer keys.Forget()
	s.wmu.Lock()
	defer s.wmu.Unlock()
	l, err := tls13.Takeover(tc, keys)
	if err != nil {
		var nt *tls13.ErrNotTaken
		if !errors.As(err, &nt) || nt.Reason != "not TLS 1.3" {
			s.logger().Debug("tls records stay on crypto/tls", zap.Error(err))
		}
		return
	}
	rc := &recordConn{nbConn: nc, l: l, wmu: &s.wmu}
	s.client = rc
	s.rec.Store(rc)
	s.srv.kernelTLSOnce.Do(func() {
		s.srv.log.Info("tls records: TLS 1.3 sessions are carried by imapgate's record layer after login",
			zap.String("kernel_tls", kernelTLSState()))
	})
}

// Write seals p as application data and writes it; wmu is held.
func (rc *recordConn) Write(p []byte) (int, error) {
	if rc.pend != nil {
		// What an event loop sealed before goes first (a kick's BYE
		// waits for it, within the kick's write deadline).
		if _, err := rc.TCPConn.Write((*rc.pend)[rc.pendOff:rc.pendEnd]); err != nil {
			return 0, err
		}
		rc.pendDone()
	}
	var out []byte
	written := 0
	for len(p) > 0 {
		m := min(len(p), tls13.MaxPlaintext)
		var err error
		if out, err = rc.l.SealRecord(out[:0], p[:m]); err != nil {
			return written, err
		}
		if _, err := rc.nbConn.Write(out); err != nil {
			return written, err
		}
		written += m
		p = p[m:]
	}
	return written, nil
}

// Read is never used: the splice reads the socket itself.
func (rc *recordConn) Read([]byte) (int, error) {
	return 0, errors.New("proxy: recordConn is read by its direction only")
}

// CloseWrite sends close_notify, as tls.Conn.CloseWrite does.
func (rc *recordConn) CloseWrite() error {
	rc.wmu.Lock()
	defer rc.wmu.Unlock()
	return rc.alertLocked(tls13.CloseNotify)
}

// closeNotify ends the client's stream as the session closes.
func (rc *recordConn) closeNotify() { rc.sendAlert(tls13.CloseNotify) }

// sendAlert sends a fatal alert or close_notify unless a write to the
// client is under way (a slow client): the connection closes next anyway.
func (rc *recordConn) sendAlert(a tls13.Alert) {
	if !rc.wmu.TryLock() {
		return
	}
	defer rc.wmu.Unlock()
	rc.alertLocked(a)
}

func (rc *recordConn) alertLocked(a tls13.Alert) error {
	if rc.l.WriteClosed() {
		return nil
	}
	if rc.pend != nil && !rc.flushPend() {
		// Records sealed before it are still unsent: an alert after them
		// cannot go first, and the connection closes next anyway.
		return nil
	}
	var b [32]byte
	rec, err := rc.l.SealAlert(b[:0], a)
	if err != nil {
		return err
	}
	if rc.loop {
		_, _, err := writeNB(rc.nb.rc, rec)
		return err
	}
	rc.TCPConn.SetWriteDeadline(time.Now().Add(time.Second))
	_, err = rc.nbConn.Write(rec)
	return err
}

// sleep drops what a direction's side holds while it is parked: the
// read side's AEAD and buffer (a partial record moves to carry), or the
// write side's AEAD.
func (rc *recordConn) sleep(read bool) {
	if !read {
		rc.wmu.Lock()
		rc.l.SleepWrite()
		rc.wmu.Unlock()
		return
	}
	rc.l.SleepRead()
	if rc.rbuf != nil {
		if rc.have > 0 {
			rc.carry = append([]byte(nil), (*rc.rbuf)[:rc.have]...)
		}
		recvBufs.Put(rc.rbuf)
		rc.rbuf, rc.have = nil, 0
	}
}

// copyRecordsIn is copyNB for the client-to-backend direction of a
// taken-over session: it reads records, opens them in place and writes
// their application data to the backend, until the client would block.
func (d *direction) copyRecordsIn() error {
	rc := d.rec
	if rc.rbuf == nil {
		rc.rbuf = recvBufs.Get().(*[]byte)
		rc.have = copy(*rc.rbuf, rc.carry)
		rc.carry = nil
	}
	buf := *rc.rbuf
	defer func() {
		if rc.have == 0 && rc.rbuf != nil {
			recvBufs.Put(rc.rbuf)
			rc.rbuf = nil
		}
	}()
	for {
		n, rerr := d.nb.read(buf[rc.have:])
		rc.have += n
		w, off, upd, err := openRecords(rc.l, buf, rc.have)
		if err == nil && upd {
			err = rc.sendKeyUpdate()
		}
		if w > 0 {
			if werr := d.write(buf[:w]); werr != nil && err == nil {
				err = werr
			}
		}
		if err != nil {
			rc.have = 0
			if a, ok := tls13.AlertOf(err); ok {
				rc.sendAlert(a)
			}
			return err
		}
		rc.have = copy(buf, buf[off:rc.have])
		if rerr != nil {
			if errors.Is(rerr, io.EOF) && rc.have > 0 {
				rerr = io.ErrUnexpectedEOF // the client stopped inside a record
			}
			return rerr
		}
	}
}

// openRecords opens the whole records at the start of buf[:have] in
// place and gathers their application data at buf[:w] (each record's
// data moves down over its own header, never past what is still to be
// opened). off is where the first record not yet whole starts; keyUpdate
// says the client asked for a KeyUpdate in return (several asks get one
// answer, as RFC 8446, section 4.6.3, allows). On an error, buf[:w] is
// the data of the records before the one that failed; its alert is
// AlertOf(err). Both data paths use it: copyRecordsIn and the event loop.
func openRecords(l *tls13.Layer, buf []byte, have int) (w, off int, keyUpdate bool, err error) {
	for {
		rl, err := l.RecordLen(buf[off:have])
		if err != nil {
			return w, off, keyUpdate, err
		}
		if rl == 0 {
			return w, off, keyUpdate, nil // more bytes needed
		}
		data, upd, err := l.Open(buf[off : off+rl])
		if err != nil {
			return w, off, keyUpdate, err
		}
		off += rl
		keyUpdate = keyUpdate || upd
		w += copy(buf[w:], data)
	}
}

// sendKeyUpdate answers the client's KeyUpdate with update_requested
// before any more application data goes to it.
func (rc *recordConn) sendKeyUpdate() error {
	rc.wmu.Lock()
	defer rc.wmu.Unlock()
	var b [32]byte
	rec, err := rc.l.SealKeyUpdate(b[:0], false)
	if err != nil {
		return err
	}
	_, err = rc.nbConn.Write(rec)
	return err
}

// copyRecordsOut is copyNB for the backend-to-client direction of a
// taken-over session: up to tls13.Slots records' worth of plaintext per readv,
// sealed in place, one write.
func (d *direction) copyRecordsOut() error {
	bp := recBufs.Get().(*[]byte)
	defer recBufs.Put(bp)
	buf := *bp
	var slots [tls13.Slots][]byte
	for i := range slots {
		slots[i] = tls13.Slot(buf, i)
	}
	for {
		n, err := d.nb.readv(&slots)
		if n > 0 {
			if werr := d.writeRecords(buf, n); werr != nil {
				return werr
			}
		}
		if err != nil {
			return err
		}
	}
}

func (d *direction) writeRecords(buf []byte, n int) error {
	d.dstWmu.Lock()
	defer d.dstWmu.Unlock()
	wire, last, err := sealSlots(d.rec.l, buf, n)
	if err != nil {
		return err
	}
	w, err := d.rec.nbConn.Write(wire)
	done := err == nil && w == len(wire)
	if done {
		d.counter.Add(int64(n))
	}
	*d.boundary = done && last == '\n'
	return err
}

// sealSlots seals n bytes of plaintext laid out in buf's slots (Slot) in
// place; last is the plaintext's last byte, for the line boundary. The
// caller holds wmu. Both data paths use it: writeRecords and the event
// loop.
func sealSlots(l *tls13.Layer, buf []byte, n int) (wire []byte, last byte, err error) {
	i := (n - 1) / tls13.MaxPlaintext
	last = tls13.Slot(buf, i)[n-1-i*tls13.MaxPlaintext]
	wire, err = l.Seal(buf, n)
	return wire, last, err
}

// flushPend writes what an event loop left sealed but unsent, without
// blocking; wmu is held. It reports whether nothing is left.
func (rc *recordConn) flushPend() bool {
	if rc.pend == nil {
		return true
	}
	n, _, err := writeNB(rc.nb.rc, (*rc.pend)[rc.pendOff:rc.pendEnd])
	rc.pendOff += n
	if err != nil || rc.pendOff < rc.pendEnd {
		return false
	}
	rc.pendDone()
	return true
}

// pendDone gives the written pending records' buffer back and counts
// their application data; wmu is held.
func (rc *recordConn) pendDone() {
	recBufs.Put(rc.pend)
	rc.pend, rc.pendOff, rc.pendEnd = nil, 0, 0
	if rc.sent != nil {
		rc.sent.Add(int64(rc.pendPlain))
	}
	rc.pendPlain = 0
}
