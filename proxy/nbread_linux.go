package proxy

import (
	"crypto/tls"
	"net"
	"syscall"
	"unsafe"

	"github.com/imapgate/imapgate/proxy/internal/tls13"
	"golang.org/x/sys/unix"
)

// nbReader reads a socket without ever blocking, for a spliced direction
// that does its own waiting. Per wake-up it makes the read and the write
// a copy needs, and one peek before the goroutine parks again:
//
//   - a read that returns less than it was offered means the socket's
//     queue was empty at that moment, so the next read is not tried
//     (drained): the direction goes to wait, whose one-byte peek is the
//     only other system call before the goroutine parks;
//   - nothing is peeked before a read, no SIOCINQ is asked, and no
//     buffer is held while waiting.
//
// Only the goroutine that runs the direction uses it.
type nbReader struct {
	rc      syscall.RawConn
	op      *ioOp   // rawio_linux.go; nil until the first read
	drained bool    // the last read emptied the socket's queue
	one     [1]byte // wait's peek, here so that it does not escape per call
}

// errWouldBlock is what a non-blocking read returns when nothing is
// queued. crypto/tls treats it as temporary (it keeps a partial record and
// does not make the error sticky), so a tls.Conn over an nbConn can be
// read without blocking too.
var errWouldBlock error = wouldBlock{}

type wouldBlock struct{}

func (wouldBlock) Error() string   { return "read would block" }
func (wouldBlock) Timeout() bool   { return true }
func (wouldBlock) Temporary() bool { return true }

var _ net.Error = wouldBlock{}

// initNB sets r up to read c; false if c has no socket to read.
func (r *nbReader) init(c net.Conn) bool {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	r.rc = rc
	return true
}

// read reads what is queued, errWouldBlock if nothing is, io.EOF at the end.
func (r *nbReader) read(p []byte) (int, error) {
	if r.drained {
		return 0, errWouldBlock
	}
	return r.done(r.ioOp().read(r.rc, p))
}

// readv is read into the slots in order, with one system call.
func (r *nbReader) readv(slots *[tls13.Slots][]byte) (int, error) {
	if r.drained {
		return 0, errWouldBlock
	}
	return r.done(r.ioOp().readv(r.rc, slots))
}

// ioOp is the reader's reusable system call, made at its first read: a
// session carried by an event loop never reads through its nbReader.
func (r *nbReader) ioOp() *ioOp {
	if r.op == nil {
		r.op = newIOOp()
	}
	return r.op
}

// done marks the reader drained after a read that found nothing queued,
// or less than it was offered.
func (r *nbReader) done(n int, again bool, err error) (int, error) {
	switch {
	case again:
		r.drained = true
		return 0, errWouldBlock
	case err != nil:
		return 0, err
	}
	if r.op.short {
		r.drained = true
	}
	return n, nil
}

// wait blocks on the runtime's poller until the socket is readable (or
// its read deadline passes, or it is closed).
//
// RawConn.Read clears the poller's readiness before it calls its
// function (as every Read does before its read(2)), so bytes that arrived
// since this reader's last read would wake nobody: the function's first
// call looks for them with a one-byte MSG_PEEK, the one system call a
// wait costs. Only when that finds nothing does the goroutine park.
func (r *nbReader) wait() error {
	looked := false
	err := r.rc.Read(func(fd uintptr) bool {
		if looked {
			return true // woken by the poller
		}
		looked = true
		for {
			_, _, errno := unix.RawSyscall6(unix.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&r.one[0])), 1, unix.MSG_PEEK|unix.MSG_DONTWAIT, 0, 0)
			switch errno {
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				return false // nothing queued: park until the poller says
			}
			return true // bytes, EOF or an error: the next read sees which
		}
	})
	r.drained = false
	return err
}

// nbConn is the client's TCP connection under its tls.Conn. Until the
// splice it reads as a *net.TCPConn does; once a direction switches it to
// non-blocking, tls.Conn.Read returns errWouldBlock instead of waiting.
type nbConn struct {
	*net.TCPConn
	nb       nbReader
	nonblock bool          // set once, by the splice, before its direction reads
	keys     *tls13.KeyLog // the handshake's secrets, until the splice (tlstakeover_linux.go)

	// The greeting sent with the server's first flight (greetInFlight,
	// tlstakeover_linux.go): flight is its plaintext until the flight is
	// written, tc the tls.Conn over this conn meanwhile; flightSent
	// reports that it went.
	flight     []byte
	tc         *tls.Conn
	flightSent bool
}

// wrapForSplice returns c wrapped so that the splice can read the TLS
// connection over it without blocking, or c itself if it is not TCP.
func wrapForSplice(c net.Conn) net.Conn {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return c
	}
	nc := &nbConn{TCPConn: tc}
	if !nc.nb.init(tc) {
		return c
	}
	return nc
}

func (c *nbConn) Read(p []byte) (int, error) {
	if c.nonblock {
		return c.nb.read(p)
	}
	return rawRead(c.nb.rc, p)
}

// Write writes p as TCPConn.Write does, without entering the runtime's
// system-call state (rawio_linux.go).
func (c *nbConn) Write(p []byte) (int, error) {
	if c.flight != nil && c.keys.HasServerSecret() {
		return c.writeFlight(p)
	}
	return rawWrite(c.nb.rc, p)
}
