package proxy

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"

	"github.com/imapgate/imapgate/proxy/internal/tls13"
	"golang.org/x/sys/unix"
)

// Socket reads and writes that do not enter the runtime's system-call
// state. The sockets are non-blocking (the runtime's poller owns them),
// so read(2) and write(2) return at once; made through syscall.Syscall,
// as net.Conn makes them, each one marks its P as in a system call,
// which the runtime's sysmon thread then watches, retakes and hands to
// another thread when the call spans its tick, and each one may wake
// sysmon from its deep sleep. On a loaded 2-vCPU guest that machinery,
// not the calls, was the largest cost of a NOOP round trip after the
// calls themselves (BENCHMARKS.md, session 4). Waiting still goes
// through the runtime's poller (RawConn.Read and Write), so deadlines and
// Close behave exactly as for a net.Conn.

// rawIO says rawRead and rawWrite exist here.
const rawIO = true

// tryRead is one read(2) on fd, EINTR retried.
func tryRead(fd uintptr, p []byte) (int, unix.Errno) {
	if len(p) == 0 {
		return 0, 0
	}
	for {
		r, _, e := unix.RawSyscall(unix.SYS_READ, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
		if e != unix.EINTR {
			if e != 0 {
				return 0, e
			}
			return int(r), 0
		}
	}
}

// tryWrite is one write(2) on fd, EINTR retried.
func tryWrite(fd uintptr, p []byte) (int, unix.Errno) {
	if len(p) == 0 {
		return 0, 0
	}
	for {
		r, _, e := unix.RawSyscall(unix.SYS_WRITE, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
		if e != unix.EINTR {
			if e != 0 {
				return 0, e
			}
			return int(r), 0
		}
	}
}

// rawRead reads as net.Conn.Read does: what is queued, or it waits on the
// poller for bytes, EOF, the read deadline or Close.
func rawRead(rc syscall.RawConn, p []byte) (int, error) {
	var (
		n     int
		errno unix.Errno
	)
	err := rc.Read(func(fd uintptr) bool {
		n, errno = tryRead(fd, p)
		return errno != unix.EAGAIN
	})
	switch {
	case err != nil:
		return 0, err
	case errno != 0:
		return 0, os.NewSyscallError("read", errno)
	case n == 0 && len(p) > 0:
		return 0, io.EOF
	}
	return n, nil
}

// rawWrite writes all of p as net.Conn.Write does, waiting on the poller
// while the socket's buffer is full.
func rawWrite(rc syscall.RawConn, p []byte) (int, error) {
	done := 0
	var errno unix.Errno
	err := rc.Write(func(fd uintptr) bool {
		for done < len(p) {
			var n int
			n, errno = tryWrite(fd, p[done:])
			if errno != 0 {
				return errno != unix.EAGAIN
			}
			done += n
		}
		return true
	})
	if err == nil && errno != 0 {
		err = os.NewSyscallError("write", errno)
	}
	return done, err
}

// rawTCPConn is a *net.TCPConn read and written with rawRead and rawWrite.
type rawTCPConn struct {
	*net.TCPConn
	rc syscall.RawConn
}

func (c *rawTCPConn) Read(p []byte) (int, error)  { return rawRead(c.rc, p) }
func (c *rawTCPConn) Write(p []byte) (int, error) { return rawWrite(c.rc, p) }

// rawIOConn returns c read and written as rawTCPConn when it is a
// *net.TCPConn, else c: for the backend login's exchange, which keeps
// the *net.TCPConn itself for the splice.
func rawIOConn(c net.Conn) net.Conn {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return c
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return c
	}
	return &rawTCPConn{TCPConn: tc, rc: rc}
}

// ioOp is one non-blocking system call on a socket, run inside
// RawConn.Control. An event loop keeps one, and so does a spliced
// direction's nbReader, and reuses it, with its function bound once, so
// that the data path does not allocate per call (a closure over its
// results would, for each of them).
type ioOp struct {
	kind  uint8 // opRead, opReadv, opWrite
	a     []byte
	iov   [tls13.Slots]unix.Iovec
	n     int
	errno syscall.Errno
	short bool // the last read returned less than it was offered
	run   func(fd uintptr)
}

const (
	opRead = iota
	opReadv
	opWrite
)

func newIOOp() *ioOp {
	op := new(ioOp)
	op.run = op.do
	return op
}

func (op *ioOp) do(fd uintptr) {
	op.n, op.errno = 0, 0
	switch op.kind {
	case opRead:
		op.n, op.errno = tryRead(fd, op.a)
	case opReadv:
		for {
			r, _, e := unix.RawSyscall(unix.SYS_READV, fd, uintptr(unsafe.Pointer(&op.iov[0])), uintptr(len(op.iov)))
			if e != unix.EINTR {
				op.n, op.errno = int(r), e
				if e != 0 {
					op.n = 0
				}
				return
			}
		}
	case opWrite:
		for op.n < len(op.a) {
			n, e := tryWrite(fd, op.a[op.n:])
			if e != 0 {
				op.errno = e
				return
			}
			op.n += n
		}
	}
}

// read reads what is queued: again when nothing was, io.EOF at the end.
func (op *ioOp) read(c syscall.RawConn, p []byte) (n int, again bool, err error) {
	op.kind, op.a = opRead, p
	cerr := c.Control(op.run)
	op.a = nil
	return op.result(cerr, "read", len(p))
}

// readv is read into the slots in order, with one system call.
func (op *ioOp) readv(c syscall.RawConn, slots *[tls13.Slots][]byte) (n int, again bool, err error) {
	op.kind = opReadv
	offered := 0
	for i, b := range slots {
		op.iov[i].Base = &b[0]
		op.iov[i].SetLen(len(b))
		offered += len(b)
	}
	cerr := c.Control(op.run)
	for i := range op.iov {
		op.iov[i].Base = nil
	}
	return op.result(cerr, "readv", offered)
}

func (op *ioOp) result(cerr error, call string, offered int) (n int, again bool, err error) {
	op.short = op.n < offered
	switch {
	case cerr != nil:
		return 0, false, cerr
	case op.errno == unix.EAGAIN:
		return 0, true, nil
	case op.errno != 0:
		return 0, false, os.NewSyscallError(call, op.errno)
	case op.n == 0 && offered > 0:
		return 0, false, io.EOF
	}
	return op.n, false, nil
}

// write writes p without blocking: blocked when the socket took less
// than all of it (n says how much it took).
func (op *ioOp) write(c syscall.RawConn, p []byte) (n int, blocked bool, err error) {
	op.kind, op.a = opWrite, p
	cerr := c.Control(op.run)
	op.a = nil
	switch {
	case cerr != nil:
		return op.n, false, cerr
	case op.errno == unix.EAGAIN:
		return op.n, true, nil
	case op.errno != 0:
		return op.n, false, os.NewSyscallError("write", op.errno)
	}
	return op.n, false, nil
}
