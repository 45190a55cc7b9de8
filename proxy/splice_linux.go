package proxy

import (
	"syscall"

	"golang.org/x/sys/unix"
)

const canSplice = true

// waitReadable blocks until the socket has bytes queued or has reached
// EOF, without consuming anything and without holding a buffer: it peeks
// one byte and lets the runtime's poller park the goroutine on EAGAIN. It
// returns how many bytes are queued (0 at EOF).
func waitReadable(rc syscall.RawConn) (int, error) {
	var (
		one    [1]byte
		queued int
		serr   error
	)
	err := rc.Read(func(fd uintptr) bool {
		var n int
		n, _, serr = unix.Recvfrom(int(fd), one[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		if serr == unix.EAGAIN || serr == unix.EINTR {
			return false
		}
		if serr == nil && n > 0 {
			queued, serr = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
			if queued < 1 {
				queued = 1
			}
		}
		return true
	})
	if err != nil {
		return 0, err
	}
	if serr != nil {
		return 0, serr
	}
	return queued, nil
}

// peekQueued reports, without waiting and without a buffer, how many
// bytes src has queued: 0 at EOF, errIdle when none. The count is only
// asked of the kernel when count is set (splice needs it; a buffered
// copy just reads what is there).
func peekQueued(rc syscall.RawConn, count bool) (int, error) {
	var (
		one    [1]byte
		queued int
		serr   error
	)
	err := rc.Control(func(fd uintptr) {
		var n int
		for {
			n, _, serr = unix.Recvfrom(int(fd), one[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
			if serr != unix.EINTR {
				break
			}
		}
		switch {
		case serr == unix.EAGAIN:
			serr = errIdle
		case serr == nil && n > 0:
			queued = 1
			if count {
				queued, serr = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
				queued = max(queued, 1)
			}
		}
	})
	if err != nil {
		return 0, err
	}
	return queued, serr
}
