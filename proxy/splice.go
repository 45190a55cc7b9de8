package proxy

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// This file is the splice: after login, bytes flow both ways untouched.
//
// Most IMAP sessions are idle (IDLE lasts 29 minutes), so a session holds
// no copy buffer while nothing flows: each direction waits for its socket
// to become readable (waitReadable, a MSG_PEEK through the runtime's
// poller), then borrows a pooled buffer, copies what is ready and gives
// the buffer back. When both legs are plain TCP the kernel moves the
// bytes itself (splice(2) through net.TCPConn.ReadFrom), exactly as many
// as are queued, so the pipe it uses is also only held while bytes flow.

// copyBufSize holds two full TLS records.
const copyBufSize = 32 << 10

var copyBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

// direction is one half of a splice.
type direction struct {
	name      string          // "up" (client→backend) or "down", for reasons
	src       net.Conn        // what to read: a *net.TCPConn or *tls.Conn
	srcRaw    syscall.RawConn // src's socket, to wait on without a buffer; nil if unknown
	srcTLS    *tls.Conn       // src when it is TLS: its buffered records are drained before waiting
	dst       net.Conn
	dstWmu    *sync.Mutex // held around writes to dst (the client side)
	boundary  *bool       // under dstWmu: the last byte written ended a line
	counter   *atomic.Int64
	idle      time.Duration
	tcpSplice bool // src and dst are both *net.TCPConn
}

func newDirection(name string, src, dst net.Conn, counter *atomic.Int64, idle time.Duration) *direction {
	d := &direction{name: name, src: src, dst: dst, counter: counter, idle: idle}
	under := src
	if tc, ok := src.(*tls.Conn); ok {
		d.srcTLS = tc
		under = tc.NetConn()
	}
	if sc, ok := under.(syscall.Conn); ok {
		d.srcRaw, _ = sc.SyscallConn()
	}
	_, srcTCP := src.(*net.TCPConn)
	_, dstTCP := dst.(*net.TCPConn)
	d.tcpSplice = srcTCP && dstTCP && canSplice
	return d
}

// run copies until EOF (returned as io.EOF) or an error.
func (d *direction) run() error {
	if d.srcTLS != nil {
		// The login exchange may have left decrypted bytes in tls.Conn
		// that no socket readiness will announce.
		bp := copyBufs.Get().(*[]byte)
		err := d.drainTLS(*bp)
		copyBufs.Put(bp)
		if err != nil {
			return err
		}
	}
	for {
		if d.idle > 0 {
			d.src.SetReadDeadline(time.Now().Add(d.idle))
		}
		if d.srcRaw != nil {
			queued, err := waitReadable(d.srcRaw)
			if err != nil {
				return err
			}
			if d.tcpSplice {
				if queued == 0 {
					return io.EOF
				}
				if err := d.spliceQueued(int64(queued)); err != nil {
					return err
				}
				continue
			}
		}
		bp := copyBufs.Get().(*[]byte)
		err := d.copyReady(*bp)
		copyBufs.Put(bp)
		if err != nil {
			return err
		}
	}
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
	n, err := d.dst.Write(b)
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

// splice runs the Authenticated state: it forwards what each side sent
// early, then copies both ways until both have ended.
func (s *session) splice(bl *backendLogin) {
	var early []byte
	if n := s.r.br.Buffered(); n > 0 {
		b, _ := s.r.br.Peek(n)
		early = append([]byte(nil), b...)
	}
	s.r = nil // the pre-auth buffer goes back to the heap
	s.setState(stateSpliced)
	if len(early) > 0 {
		// Commands the client pipelined after its login: the backend must
		// see them before anything else the client sends.
		n, err := bl.conn.Write(early)
		s.in.Add(int64(n))
		if err != nil {
			s.setReason("backend_write_error")
			return
		}
	}
	if len(bl.pending) > 0 {
		n := len(bl.pending)
		if !s.write(bl.pending) {
			return
		}
		s.out.Add(int64(n))
	}

	idle := s.srv.opts.Timeouts.Idle
	up := newDirection("client", s.client, bl.conn, &s.in, idle)
	down := newDirection("backend", bl.conn, s.client, &s.out, idle)
	down.dstWmu, down.boundary = &s.wmu, &s.atBoundary

	upDone := make(chan struct{})
	go s.pumpClientToBackend(up, upDone)
	s.directionEnded(down, down.run())
	<-upDone
	s.mu.Lock()
	if s.halfClose != nil {
		s.halfClose.Stop()
	}
	s.mu.Unlock()
}

// pumpClientToBackend is the second goroutine of a spliced session.
func (s *session) pumpClientToBackend(d *direction, done chan<- struct{}) {
	defer close(done)
	s.directionEnded(d, d.run())
}

// directionEnded reacts to one direction's end: after a clean EOF the
// other side is told by a half-close and given Timeouts.HalfClose to
// finish; after an error both connections close at once.
func (s *session) directionEnded(d *direction, err error) {
	if errors.Is(err, io.EOF) {
		s.setReason(d.name + "_closed")
		if cw, ok := d.dst.(closeWriter); ok {
			cw.CloseWrite()
		}
		s.mu.Lock()
		if s.halfClose == nil && !s.closed {
			s.halfClose = time.AfterFunc(s.srv.opts.Timeouts.HalfClose, s.closeConns)
		}
		s.mu.Unlock()
		return
	}
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		s.setReason("idle")
	case errors.Is(err, net.ErrClosed):
		s.setReason("closed")
	default:
		s.setReason(d.name + "_error")
	}
	s.closeConns()
}

// closeConns closes both legs, which ends both directions.
func (s *session) closeConns() {
	s.mu.Lock()
	bc := s.bconn
	s.mu.Unlock()
	s.raw.Close()
	if bc != nil {
		bc.Close()
	}
}
