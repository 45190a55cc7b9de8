package proxy

import (
	"errors"
	"sync"

	"golang.org/x/sys/unix"
)

// parker holds the directions of idle spliced sessions: their sockets sit
// in one epoll set (one-shot, level-triggered), and one goroutine waits on
// it and starts a direction again when its socket turns readable. An idle
// session so costs no goroutine, and no goroutine stack.
//
// The Go runtime's own poller watches the same sockets; epoll allows any
// number of sets per socket, and the runtime's registration does not see
// ours.
type parker struct {
	epfd int
	evfd int // written by stop to wake run

	mu   sync.Mutex
	dirs map[uint64]*direction // by parkID; kept until the session ends
	next uint64

	done chan struct{}
}

// newEpollSet makes an epoll set with an eventfd in it under key 0, to
// wake its waiter; the parker's directions and a loop's sessions get
// keys from 1.
func newEpollSet() (epfd, evfd int, err error) {
	epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return -1, -1, err
	}
	evfd, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return -1, -1, err
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, evfd, &ev); err != nil {
		unix.Close(epfd)
		unix.Close(evfd)
		return -1, -1, err
	}
	return epfd, evfd, nil
}

func newParker() (*parker, error) {
	epfd, evfd, err := newEpollSet()
	if err != nil {
		return nil, err
	}
	p := &parker{epfd: epfd, evfd: evfd, dirs: make(map[uint64]*direction), done: make(chan struct{})}
	go p.run()
	return p, nil
}

// park registers d's socket and marks d parked. It returns true if the
// calling goroutine must now return (d will be started again), false if
// d could not be parked and the caller must go on with it.
func (p *parker) park(d *direction) bool {
	if d.fd < 0 {
		return false
	}
	p.mu.Lock()
	op := unix.EPOLL_CTL_MOD
	if d.parkID == 0 {
		p.next++
		d.parkID = p.next
		p.dirs[d.parkID] = d
		op = unix.EPOLL_CTL_ADD
	}
	p.mu.Unlock()
	// Parked before armed: an event that fires at once must find it so.
	d.parked.Store(true)
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT}
	setEventKey(&ev, d.parkID)
	err := d.srcRaw.Control(func(fd uintptr) {
		err := unix.EpollCtl(p.epfd, op, int(fd), &ev)
		if errors.Is(err, unix.ENOENT) && op == unix.EPOLL_CTL_MOD {
			// The kernel dropped it (the descriptor was closed and reused
			// is impossible while Control holds it; it was re-created).
			err = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, int(fd), &ev)
		}
		if err != nil {
			panicIfNotClosed(err)
		}
	})
	if err != nil {
		// The socket is closed. Whoever wins this swap runs d on.
		return !d.parked.CompareAndSwap(true, false)
	}
	return true
}

// panicIfNotClosed: EpollCtl on a live socket fails only by our bug.
func panicIfNotClosed(err error) {
	if !errors.Is(err, unix.EBADF) {
		panic("proxy: epoll_ctl: " + err.Error())
	}
}

// forget drops d when its session ends; the kernel drops the socket from
// the set when it is closed.
func (p *parker) forget(d *direction) {
	if d == nil || d.parkID == 0 {
		return
	}
	p.mu.Lock()
	delete(p.dirs, d.parkID)
	p.mu.Unlock()
}

// run is the parker's goroutine: it waits for readable sockets and starts
// their directions.
func (p *parker) run() {
	defer close(p.done)
	events := make([]unix.EpollEvent, 128)
	for {
		n, err := unix.EpollWait(p.epfd, events, -1)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			panic("proxy: epoll_wait: " + err.Error())
		}
		for i := range events[:n] {
			key := eventKey(&events[i])
			if key == 0 {
				return // stop
			}
			p.mu.Lock()
			d := p.dirs[key]
			p.mu.Unlock()
			if d != nil && d.parked.CompareAndSwap(true, false) {
				go d.loop()
			}
		}
	}
}

// stop ends run and closes the epoll set. Parked directions are not
// started again: their sessions must have been closed first.
func (p *parker) stop() {
	var one = [8]byte{1}
	unix.Write(p.evfd, one[:])
	<-p.done
	unix.Close(p.epfd)
	unix.Close(p.evfd)
}

// The event's 64-bit user data carries the key.
func setEventKey(ev *unix.EpollEvent, key uint64) {
	ev.Fd = int32(uint32(key))
	ev.Pad = int32(uint32(key >> 32))
}

func eventKey(ev *unix.EpollEvent) uint64 {
	return uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
}
