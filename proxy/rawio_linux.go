package proxy

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"

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
