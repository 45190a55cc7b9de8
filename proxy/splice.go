package proxy

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// This file is the splice: after login, bytes flow both ways untouched.
//
// Most IMAP sessions are idle (IDLE lasts 29 minutes), so an idle
// spliced session holds no goroutine and no buffer. Each direction copies
// what its source has queued, waits on the runtime's poller for a moment
// (parkAfter: the next command of a conversation), and then parks: it
// registers the socket (one-shot) with the Server's parker, an epoll set
// of imapgate's own served by one goroutine, and its goroutine returns.
// When bytes (or EOF) arrive the parker starts the direction again on a
// fresh goroutine, which borrows a pooled buffer only while it copies.
// When both legs are plain TCP the kernel moves the bytes (splice(2)
// through net.TCPConn.ReadFrom), exactly as many as are queued, so the
// pipe it uses is also only held while bytes flow. Without a parker (not
// Linux, or Timeouts.Idle set) a direction waits on its socket in a
// goroutine instead, still without a buffer.
//
// A direction whose source is the client's TLS connection (over an
// nbConn, as the listeners make it) or a plain backend socket copied into
// TLS takes the non-blocking path of nbsplice.go: three system calls per
// wake-up, and crypto/tls's empty read buffers given back when it parks
// (tlsrelease.go). The others (both legs plain TCP; a TLS backend leg) take
// step and await below. A front end that reuses the splice gets the
// non-blocking path by wrapping its accepted connection with
// wrapForSplice before tls.Server.

// copyBufSize holds two full TLS records.
const copyBufSize = 32 << 10

var copyBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

// direction is one half of a splice.
type direction struct {
	sess      *session
	name      string          // "client" (client→backend) or "backend", for reasons
	src       net.Conn        // what to read: a *net.TCPConn or *tls.Conn
	srcRaw    syscall.RawConn // src's socket, to peek at without a buffer; nil if unknown
	srcTLS    *tls.Conn       // src when it is TLS: its buffered records are drained before waiting
	dst       net.Conn
	dstRaw    syscall.RawConn // dst's socket when dst is a *net.TCPConn: written by rawWrite
	dstWmu    *sync.Mutex     // held around writes to dst (the client side)
	boundary  *bool           // under dstWmu: the last byte written ended a line
	counter   *atomic.Int64
	idle      time.Duration
	tcpSplice bool // src and dst are both *net.TCPConn
	recSrc    bool // rec is src (client→backend), not dst

	drained bool        // the TLS source's leftovers from the login were copied
	parked  atomic.Bool // registered with the parker, no goroutine running
	parkID  uint64      // the parker's key; 0 until first parked
	fd      int         // src's descriptor, for the parker

	// The non-blocking path (nbsplice.go): set when src can be read
	// without blocking, a plain TCP socket or a tls.Conn over an nbConn.
	nb       *nbReader     // nil: the path of step and await
	nbc      *nbConn       // src's nbConn when src is TLS
	nbOwn    nbReader      // nb when src is plain TCP
	lastData time.Duration // when bytes last moved (since monoStart), for parkAfter
	armed    time.Duration // src's read deadline as last set (since monoStart)

	// rec is the client leg once the record layer carries it
	// (tlstakeover_linux.go): src when recSrc, else dst.
	rec *recordConn
}

func newDirection(name string, src, dst net.Conn, counter *atomic.Int64, idle time.Duration) *direction {
	d := &direction{name: name, src: src, dst: dst, counter: counter, idle: idle, fd: -1}
	under := src
	if tc, ok := src.(*tls.Conn); ok {
		d.srcTLS = tc
		under = tc.NetConn()
		if nc, ok := under.(*nbConn); ok {
			d.nb, d.nbc = &nc.nb, nc
		}
	}
	if rc, ok := src.(*recordConn); ok {
		d.rec, d.recSrc, under = rc, true, rc.nbConn
		d.nb, d.nbc = &rc.nb, rc.nbConn
	}
	if rc, ok := dst.(*recordConn); ok {
		d.rec = rc
	}
	if sc, ok := under.(syscall.Conn); ok {
		d.srcRaw, _ = sc.SyscallConn()
		if d.srcRaw != nil {
			d.srcRaw.Control(func(fd uintptr) { d.fd = int(fd) })
		}
	}
	_, srcTCP := src.(*net.TCPConn)
	dtc, dstTCP := dst.(*net.TCPConn)
	if dstTCP && rawIO {
		d.dstRaw, _ = dtc.SyscallConn()
	}
	d.tcpSplice = srcTCP && dstTCP && canSplice
	if srcTCP && !d.tcpSplice && d.nbOwn.init(src) {
		d.nb = &d.nbOwn
	}
	return d
}

// errIdle says a direction's source has nothing queued.
var errIdle = errors.New("nothing queued")

// loop copies until the source is empty and then parks (the goroutine
// returns), or until the direction ends. It is the body of every
// goroutine a direction runs on.
func (d *direction) loop() {
	defer func() {
		if p := recover(); p != nil {
			d.sess.logger().Error("splice panic", zap.Any("panic", p), zap.ByteString("stack", debug.Stack()))
			d.sess.setEnd(EndPanic)
			d.sess.closeConns()
			d.sess.directionDone()
		}
	}()
	if d.nb != nil {
		d.loopNB()
		return
	}
	d.run(d.step, errIdle, d.await)
}

// run copies with step until it fails: on idle (nothing to read) it
// waits with wait, and returns without ending the direction if wait
// parked it; any other error ends the direction.
func (d *direction) run(step func() error, idle error, wait func() error) {
	for {
		err := step()
		if errors.Is(err, idle) {
			err = wait()
			if errors.Is(err, errParked) {
				return
			}
		}
		if err != nil {
			d.sess.directionEnded(d, err)
			d.sess.directionDone()
			return
		}
	}
}

// parkAfter is how long a direction waits for its next bytes in its own
// goroutine before it parks. A conversation (a command, its answer, the
// next command) stays on the runtime's poller, which wakes a goroutine
// faster and cheaper than the parker's hand-off; a session that has been
// quiet this long is likely idle for minutes (IDLE), and parks.
const parkAfter = 2 * time.Second

var errParked = errors.New("parked")

// await waits for the source to become readable: in this goroutine for up
// to parkAfter, then parked (errParked: the goroutine must return).
func (d *direction) await() error {
	p := d.sess.srv.parker.Load()
	if p == nil || d.srcRaw == nil {
		return d.wait()
	}
	d.src.SetReadDeadline(time.Now().Add(d.sess.srv.parkAfter))
	_, err := waitReadable(d.srcRaw)
	// Cleared before any Read: a deadline could cut a TLS record in half.
	d.src.SetReadDeadline(time.Time{})
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		return err
	}
	if p.park(d) {
		return errParked
	}
	return d.wait()
}

// wait blocks until the source is readable, for when there is no parker.
func (d *direction) wait() error {
	if d.idle > 0 {
		d.src.SetReadDeadline(time.Now().Add(d.idle))
	}
	if d.srcRaw == nil {
		return nil // copyReady will block in Read instead
	}
	_, err := waitReadable(d.srcRaw)
	return err
}

// step copies what the source has queued now. It returns errIdle when
// there is nothing, io.EOF at the end.
func (d *direction) step() error {
	if d.srcTLS != nil && !d.drained {
		// The login exchange may have left decrypted bytes in tls.Conn
		// that no socket readiness will announce.
		d.drained = true
		bp := copyBufs.Get().(*[]byte)
		err := d.drainTLS(*bp)
		copyBufs.Put(bp)
		if err != nil {
			return err
		}
	}
	if d.srcRaw == nil {
		bp := copyBufs.Get().(*[]byte)
		err := d.copyReady(*bp)
		copyBufs.Put(bp)
		return err
	}
	queued, err := peekQueued(d.srcRaw, d.tcpSplice)
	if err != nil {
		return err
	}
	if d.tcpSplice {
		if queued == 0 {
			return io.EOF
		}
		return d.spliceQueued(int64(queued))
	}
	bp := copyBufs.Get().(*[]byte)
	err = d.copyReady(*bp)
	copyBufs.Put(bp)
	return err
}

// copyReady copies what src has ready into dst through buf.
func (d *direction) copyReady(buf []byte) error {
	for {
		n, err := d.src.Read(buf)
		if n > 0 {
			if werr := d.write(buf[:n]); werr != nil {
				return werr
			}
		}
		if err != nil {
			return err
		}
		if d.srcTLS != nil {
			return d.drainTLS(buf)
		}
		if n < len(buf) || d.srcRaw == nil {
			// The socket is drained (or, without a poller handle, keep
			// the buffer only for this read).
			return nil
		}
	}
}

// drainTLS copies records the TLS layer has already read off the socket:
// the socket may be empty while whole records wait in tls.Conn, and
// waiting on the socket then would stall the session. A read deadline in
// the past makes tls.Conn serve what it holds without touching the
// network; the timeout that ends it is not sticky.
func (d *direction) drainTLS(buf []byte) error {
	d.src.SetReadDeadline(time.Unix(1, 0))
	defer d.src.SetReadDeadline(time.Time{})
	for {
		n, err := d.srcTLS.Read(buf)
		if n > 0 {
			if werr := d.write(buf[:n]); werr != nil {
				return werr
			}
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func (d *direction) write(b []byte) error {
	if d.dstWmu != nil {
		d.dstWmu.Lock()
		defer d.dstWmu.Unlock()
	}
	var (
		n   int
		err error
	)
	if d.dstRaw != nil {
		n, err = rawWrite(d.dstRaw, b) // rawio_linux.go
	} else {
		n, err = d.dst.Write(b)
	}
	d.counter.Add(int64(n))
	if d.boundary != nil {
		*d.boundary = n == len(b) && b[len(b)-1] == '\n'
	}
	return err
}

// spliceQueued moves exactly n queued bytes from src to dst in the kernel.
func (d *direction) spliceQueued(n int64) error {
	if d.dstWmu != nil {
		d.dstWmu.Lock()
		defer d.dstWmu.Unlock()
		// The bytes are never seen: a BYE could land inside a literal.
		*d.boundary = false
	}
	w, err := d.dst.(*net.TCPConn).ReadFrom(&io.LimitedReader{R: d.src, N: n})
	d.counter.Add(w)
	if err == nil && w == 0 {
		return io.EOF
	}
	return err
}

// closeWriter is the half-close both *net.TCPConn and *tls.Conn offer.
type closeWriter interface{ CloseWrite() error }

var (
	_ closeWriter = (*net.TCPConn)(nil)
	_ closeWriter = (*tls.Conn)(nil)
)

// splice starts the Authenticated state: it forwards what each side sent
// early, then starts both directions, which end the session between them.
// It reports false if the session ended before that.
func (s *session) splice(bl *backendLogin) bool {
	var early []byte
	if n := s.r.br.Buffered(); n > 0 {
		b, _ := s.r.br.Peek(n)
		early = append([]byte(nil), b...)
	}
	s.dropReader() // the pre-auth buffer goes back to its pool
	s.setState(StateSpliced)
	if len(early) > 0 {
		// Commands the client pipelined after its login: the backend must
		// see them before anything else the client sends.
		n, err := bl.conn.Write(early)
		s.in.Add(int64(n))
		if err != nil {
			s.setEnd(EndBackendWriteError)
			return false
		}
	}
	if len(bl.pending) > 0 {
		n := len(bl.pending)
		if !s.write(bl.pending) {
			return false
		}
		s.out.Add(int64(n))
	}

	// After the last write through crypto/tls, before the directions.
	s.takeOverRecords()
	idle := s.srv.o().Timeouts.Idle
	up := newDirection("client", s.client, bl.conn, &s.in, idle)
	down := newDirection("backend", bl.conn, s.client, &s.out, idle)
	up.sess, down.sess = s, s
	down.dstWmu, down.boundary = &s.wmu, &s.atBoundary
	s.mu.Lock()
	s.up, s.down = up, down
	s.mu.Unlock()
	s.srv.getParker()
	s.dirsLeft.Store(2)
	if s.startLoop(up, down) { // evloop_linux.go
		return true
	}
	go up.loop()
	go down.loop()
	return true
}

// directionDone is called once by each direction as it ends; the last one
// ends the session.
func (s *session) directionDone() {
	if s.dirsLeft.Add(-1) != 0 {
		return
	}
	s.mu.Lock()
	if s.halfClose != nil {
		s.halfClose.Stop()
	}
	up, down := s.up, s.down
	s.mu.Unlock()
	if p := s.srv.parker.Load(); p != nil {
		p.forget(up)
		p.forget(down)
	}
	s.srv.endSession(s)
}

// ended is the reason for d's end: client's if d reads from the client,
// else backend's.
func (d *direction) ended(client, backend EndReason) EndReason {
	if d.name == "backend" {
		return backend
	}
	return client
}

// directionEnded reacts to one direction's end: after the client's clean
// EOF the backend is told by a half-close and given Timeouts.HalfClose to
// answer; after the backend's EOF, or an error, both connections close at
// once.
func (s *session) directionEnded(d *direction, err error) {
	s.setEnd(d.endReason(err))
	if errors.Is(err, io.EOF) {
		if cw, ok := d.dst.(closeWriter); ok {
			cw.CloseWrite()
		}
		if d.name == "backend" {
			// The backend is done (its BYE is written): nothing the client
			// still sends has anywhere to go, and a client that does not
			// close by itself must not hold the session.
			s.closeConns()
			return
		}
		s.mu.Lock()
		if s.halfClose == nil && !s.closed {
			s.halfClose = time.AfterFunc(s.srv.o().Timeouts.HalfClose, s.closeConns)
		}
		s.mu.Unlock()
		return
	}
	s.closeConns()
}

// endReason is how the session ended if d ended it with err.
func (d *direction) endReason(err error) EndReason {
	switch {
	case errors.Is(err, io.EOF):
		return d.ended(EndClientClosed, EndBackendClosed)
	case errors.Is(err, os.ErrDeadlineExceeded):
		return EndIdle
	case errors.Is(err, net.ErrClosed):
		return EndClosed
	}
	return d.ended(EndClientError, EndBackendError)
}

// closeConns closes both legs, which ends both directions: a parked one
// is started again to find its socket closed (a closed socket leaves an
// epoll set without an event).
func (s *session) closeConns() {
	s.mu.Lock()
	bc, up, down := s.bconn, s.up, s.down
	s.mu.Unlock()
	if rc := s.rec.Load(); rc != nil {
		rc.closeNotify()
	}
	s.raw.Close()
	if bc != nil {
		bc.Close()
	}
	s.loopClosed() // evloop_linux.go
	for _, d := range []*direction{up, down} {
		if d != nil && d.parked.CompareAndSwap(true, false) {
			go d.loop()
		}
	}
}
