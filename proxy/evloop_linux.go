package proxy

import (
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/imapgate/imapgate/proxy/internal/tls13"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// The event-loop data path (Options.SpliceLoop): a spliced session whose
// client leg is carried by imapgate's record layer (a *recordConn) and
// whose backend leg is plain TCP is served by one of a few loop
// goroutines, each blocked in epoll_wait on an epoll
// set of its own. On readiness the loop goroutine itself reads, opens or
// seals records and writes: no goroutine is woken per message, and an
// idle session costs no goroutine either (the parker is not involved).
// There are GOMAXPROCS-1 loops (evLoopCount), none with a single P.
//
// Both sockets are registered once, by the splice's goroutine (adopt: the
// loop is not woken for it), edge-triggered, keyed by the session's loop
// key and side (never by descriptor number), for reading; EPOLLOUT is
// added to a socket's registration the first time a write there would
// block (armOut). Every read
// and write runs inside RawConn.Control, which holds a reference on the
// descriptor: one closed by another goroutine is never reused under the
// loop, and Control fails once it is closed.
//
//   - Reads: a read that returns less than it was offered means the queue
//     was empty at that moment (a later arrival raises a new edge), unless
//     the peer's end was announced (RDHUP/HUP/ERR), when reading goes on to
//     the EOF. A session gets evLoopBudget reads per direction per turn;
//     one with more queued goes on the ready list, served after the
//     others, so one large FETCH does not starve the loop's other
//     sessions.
//   - Backpressure: a write that is partial or would block keeps its
//     remainder (to the backend: at the head of the client read buffer; to
//     the client: sealed, in recordConn.pend under wmu) and the session
//     stops reading the opposite source until an EPOLLOUT edge lets the
//     remainder go. A stalled session holds one buffer per direction.
//   - Writes to the client take the session's wmu with TryLock: a kick's
//     BYE or an alert holding it makes the loop retry that session on a
//     later turn (1 ms), never wait.
//   - Ends follow the goroutine path exactly: session.directionEnded and
//     directionDone, the same EndReasons, endSession once. closeConns from
//     another goroutine (kick, drain, eviction, Shutdown, the half-close
//     timer) tells the loop through its queue and eventfd: a closed socket
//     leaves an epoll set without an event.
//   - Idle: a sweep every parkAfter/2 puts to sleep the sessions that moved
//     no bytes for parkAfter: no AEAD, no buffer (a partial record moves to
//     carry). With nothing awake, epoll_wait blocks without a timeout.
//   - A panic in one session's work ends that session (EndPanic), not the
//     loop.

// evLoopBudget is how many reads one direction of a session gets per
// turn before the loop serves the others.
const evLoopBudget = 4

// evYield is how often a loop passes through the scheduler (run).
const evYield = 5 * time.Millisecond

// evRetry is the epoll_wait timeout while a session waits for wmu.
const evRetry = time.Millisecond

// evLoops are the Server's loops; a session goes to one in turn.
type evLoops struct {
	loops []*evLoop
	next  atomic.Uint32
}

func newEvLoops(srv *Server, n int) (*evLoops, error) {
	ls := &evLoops{}
	for range n {
		l, err := newEvLoop(srv)
		if err != nil {
			ls.stop()
			return nil, err
		}
		ls.loops = append(ls.loops, l)
	}
	return ls, nil
}

func (ls *evLoops) pick() *evLoop {
	return ls.loops[int(ls.next.Add(1))%len(ls.loops)]
}

// stop ends the loops; their sessions must have ended first.
func (ls *evLoops) stop() {
	for _, l := range ls.loops {
		l.stop()
	}
}

// evLoop is one loop goroutine and its epoll set.
type evLoop struct {
	srv  *Server
	epfd int
	evfd int // written by notify and stop to wake run

	mu       sync.Mutex
	queue    []*evSession          // sessions closed from outside
	sessions map[uint64]*evSession // by key; added by adopt, read by the loop
	nextKey  uint64
	calls    []func() // run by the loop goroutine (tests look inside)
	stopping bool

	done chan struct{}

	// The loop goroutine's own.
	awake    []*evSession // holding an AEAD; swept for idleness
	ready    []*evSession // more queued than one turn served
	retry    []*evSession // waiting for wmu
	work     []*evSession
	turn     uint64
	now      time.Duration // mono() at the start of the turn
	op       *ioOp
	yieldAt  time.Duration // next pass through the scheduler (run)
	sweepAt  time.Duration
	runnable []metrics.Sample // read by wait
	rawWaits uint64           // made by wait (tests look)
	queued   uint64           // turns that took the queue (tests look)
}

// evSession is one session on a loop. Apart from closed, its fields
// belong to the loop goroutine.
type evSession struct {
	loop     *evLoop
	s        *session
	up, down *direction
	rc       *recordConn
	crw, brw syscall.RawConn // client's and backend's sockets

	closed atomic.Bool // closeConns ran: the sockets are (being) closed

	key        uint64
	cIn, bIn   bool // the last edge said readable, and no read found it empty since
	cOut, bOut bool // writable, as far as the last edge and write know
	cArmed     bool // the client's registration asks for EPOLLOUT (armOut)
	bArmed     bool
	cHup, bHup bool // the peer's end was announced: read on to the EOF
	upOn       bool // the client-to-backend direction runs
	downOn     bool
	upPend     int  // plaintext for the backend at the head of rc.rbuf
	kuOwed     bool // the client asked for a KeyUpdate not yet sent
	cPend      bool // the loop left rc.pend set (a Write under wmu may have cleared it since)
	awakeAt    int  // index in loop.awake plus one; 0: asleep
	lastData   time.Duration
	mark       uint64 // the turn it was last put on the work list
	gone       bool   // removed; written under loop.mu
}

// Key layout: the session's key shifted by one, the low bit the side.
const (
	sideClient  = 0
	sideBackend = 1
)

func newEvLoop(srv *Server) (*evLoop, error) {
	epfd, evfd, err := newEpollSet() // parker_linux.go
	if err != nil {
		return nil, err
	}
	l := &evLoop{srv: srv, epfd: epfd, evfd: evfd, done: make(chan struct{}), sessions: make(map[uint64]*evSession), op: newIOOp()}
	go l.run() // goroutine "evloop"
	return l, nil
}

// startLoop hands the splice's directions to an event loop if the
// session qualifies; false leaves them to goroutines. dirsLeft is set.
func (s *session) startLoop(up, down *direction) bool {
	rc := s.rec.Load()
	if rc == nil || up.src != net.Conn(rc) || s.srv.o().SpliceLoop == LoopOff {
		return false
	}
	bc, ok := down.src.(*net.TCPConn)
	if !ok || rc.nb.rc == nil {
		return false
	}
	if s.srv.getParker() == nil { // Timeouts.Idle, no epoll, or closing
		return false
	}
	ls := s.srv.getLoops()
	if ls == nil {
		return false
	}
	brw, err := bc.SyscallConn()
	if err != nil {
		return false
	}
	es := &evSession{s: s, up: up, down: down, rc: rc, crw: rc.nb.rc, brw: brw,
		cIn: true, bIn: true, cOut: true, bOut: true, upOn: true, downOn: true}
	s.wmu.Lock()
	rc.loop, rc.sent = true, down.counter
	s.wmu.Unlock()
	es.loop = ls.pick()
	s.ev.Store(es)
	if hook := testHookAdopt.Load(); hook != nil {
		(*hook)(s, func() { es.loop.adopt(es) })
		return true
	}
	es.loop.adopt(es)
	return true
}

// testHookAdopt, when set by a test, adopts a published session (s.ev)
// in its stead: it is to call adopt. Atomic: sessions of the test before
// may still be on their way to startLoop when it is set.
var testHookAdopt atomic.Pointer[func(s *session, adopt func())]

// loopClosed tells the session's loop, if it has one, that closeConns
// closed the sockets.
func (s *session) loopClosed() {
	if es := s.ev.Load(); es != nil {
		es.closed.Store(true)
		es.loop.notify(es)
	}
}

// notify queues es for the loop's next turn and wakes it.
func (l *evLoop) notify(es *evSession) {
	l.mu.Lock()
	l.queue = append(l.queue, es)
	l.mu.Unlock()
	var one = [8]byte{1}
	unix.Write(l.evfd, one[:])
}

// do runs f in the loop goroutine, between turns, and waits for it.
func (l *evLoop) do(f func()) {
	done := make(chan struct{})
	l.mu.Lock()
	l.calls = append(l.calls, func() { f(); close(done) })
	l.mu.Unlock()
	var one = [8]byte{1}
	unix.Write(l.evfd, one[:])
	select {
	case <-done:
	case <-l.done: // stopped: nothing left to look at
	}
}

// stop ends run and closes the epoll set.
func (l *evLoop) stop() {
	l.mu.Lock()
	l.stopping = true
	l.mu.Unlock()
	var one = [8]byte{1}
	unix.Write(l.evfd, one[:])
	<-l.done
	unix.Close(l.epfd)
	unix.Close(l.evfd)
}

// run is the loop's goroutine ("evloop"): wait, note the edges, serve
// the sessions they name, the ready and the retrying ones, sweep.
func (l *evLoop) run() {
	defer close(l.done)
	events := make([]unix.EpollEvent, 256)
	for {
		timeout := -1
		switch {
		case len(l.ready) > 0:
			timeout = 0
		case len(l.retry) > 0:
			timeout = int(evRetry / time.Millisecond)
		case len(l.awake) > 0:
			timeout = max(1, int((l.sweepAt-mono()+time.Millisecond-1)/time.Millisecond))
		}
		n, err := l.wait(events, timeout) // evwait_linux.go
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			panic("proxy: epoll_wait: " + err.Error())
		}
		l.turn++
		l.now = mono()
		if l.now >= l.yieldAt {
			// Returning from a system call is not a pass through the
			// scheduler: without one now and then, sysmon takes the loop
			// for a goroutine that has run for 10 ms, preempts it with a
			// signal and hands its P off, and then polls every 20 µs again
			// (measured: half a nanosleep and a context switch per NOOP
			// round trip, twice HAProxy's context switches in a fetch).
			runtime.Gosched()
			l.yieldAt = l.now + evYield
		}
		l.work = l.work[:0]
		queued := false
		l.mu.Lock() // for sessions
		for i := range events[:n] {
			key := eventKey(&events[i])
			if key == 0 {
				queued = true
				continue
			}
			es := l.sessions[key>>1]
			if es == nil {
				continue // ended
			}
			ev := events[i].Events
			in := ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0
			hup := ev&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0
			out := ev&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0
			if key&1 == sideClient {
				es.cIn, es.cHup, es.cOut = es.cIn || in, es.cHup || hup, es.cOut || out
			} else {
				es.bIn, es.bHup, es.bOut = es.bIn || in, es.bHup || hup, es.bOut || out
			}
			l.enqueue(es)
		}
		l.mu.Unlock()
		if queued && l.takeQueue() {
			return
		}
		// The sessions with more queued, and those waiting for wmu, after
		// the ones the edges named.
		for _, es := range l.ready {
			l.enqueue(es)
		}
		for _, es := range l.retry {
			l.enqueue(es)
		}
		clear(l.ready)
		clear(l.retry)
		l.ready, l.retry = l.ready[:0], l.retry[:0]
		for _, es := range l.work {
			if es.gone {
				continue
			}
			more, retry := l.serve(es)
			switch {
			case es.gone:
			case retry:
				l.retry = append(l.retry, es)
			case more:
				l.ready = append(l.ready, es)
			}
		}
		clear(l.work) // no ended session stays reachable from here
		if len(l.awake) > 0 && l.now >= l.sweepAt {
			l.sweep(l.srv.parkAfter)
		}
	}
}

func (l *evLoop) enqueue(es *evSession) {
	if es.mark != l.turn {
		es.mark = l.turn
		l.work = append(l.work, es)
	}
}

// takeQueue drains the eventfd, runs do's calls and takes the queued
// sessions (closed from outside). It reports true when the loop must
// stop.
func (l *evLoop) takeQueue() bool {
	l.queued++
	var b [8]byte
	unix.Read(l.evfd, b[:])
	l.mu.Lock()
	q, calls, stopping := l.queue, l.calls, l.stopping
	l.queue, l.calls = nil, nil
	l.mu.Unlock()
	if stopping {
		return true
	}
	for _, f := range calls {
		f()
	}
	for _, es := range q {
		if !es.gone {
			l.enqueue(es)
		}
	}
	return false
}

// adopt registers es's sockets with the loop's epoll set, from the
// session's goroutine: edge-triggered, for reading and the peer's end
// (EPOLLOUT is asked for once a write would block: armOut). The loop is
// not woken for it (measured on the bench machine: an eventfd write and
// read and one wake-up of the loop a login, for a session that has
// nothing to move until its client's next command). What is queued on a
// socket already raises an edge as it is added; nothing is buffered in
// the process at this point (tls13.Takeover refuses bytes crypto/tls
// read ahead, and the splice wrote the pipelined ones). Only a session
// whose sockets closed meanwhile goes through the queue, for the loop to
// end it.
func (l *evLoop) adopt(es *evSession) {
	l.mu.Lock()
	if es.gone {
		// Closed from outside since startLoop published es (loopClosed),
		// and ended by the loop already: nothing to register.
		l.mu.Unlock()
		return
	}
	l.nextKey++
	es.key = l.nextKey
	l.sessions[es.key] = es
	l.mu.Unlock()
	// Nothing below writes es's fields but closed: the loop may serve it
	// as soon as the first socket is in the set.
	closed := false
	add := func(rc syscall.RawConn, side uint64) {
		ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLET}
		setEventKey(&ev, es.key<<1|side)
		err := rc.Control(func(fd uintptr) {
			if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, int(fd), &ev); err != nil {
				panicIfNotClosed(err)
			}
			l.leaveRuntimePoller(int(fd))
		})
		if err != nil {
			closed = true
		}
	}
	add(es.crw, sideClient)
	add(es.brw, sideBackend)
	if closed {
		es.closed.Store(true) // serve ends it
		l.notify(es)
	}
}

// armOut adds EPOLLOUT to the registration of es's client (sideClient)
// or backend socket after a write there would block; the edge comes when
// the socket has room, or at once if it has already.
func (es *evSession) armOut(side uint64) {
	armed, rc := &es.cArmed, es.crw
	if side == sideBackend {
		armed, rc = &es.bArmed, es.brw
	}
	if *armed {
		return
	}
	*armed = true
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET}
	setEventKey(&ev, es.key<<1|side)
	rc.Control(func(fd uintptr) {
		if err := unix.EpollCtl(es.loop.epfd, unix.EPOLL_CTL_MOD, int(fd), &ev); err != nil {
			panicIfNotClosed(err)
		}
	})
}

// leaveRuntimePoller takes fd out of the Go runtime's own epoll set. The
// runtime registered every socket there, edge-triggered, when it was
// created; once a loop serves the socket, nothing waits for it on the
// runtime's poller, yet every edge would still wake the thread blocked in
// the runtime's epoll_pwait, which then finds no goroutine to run: one
// wake-up and a few epoll_pwait calls per message for nothing (measured:
// about 10 epoll_pwait per NOOP round trip with the runtime's set, 2
// without). The runtime's set is found once, in /proc/self/fdinfo: the
// eventpoll that lists fd and is not this loop's.
//
// Afterwards a blocking Write through the net.Conn (a kick's BYE, when
// the socket is full) waits for its deadline instead of a readiness the
// runtime no longer gets: every such write has a deadline, and the
// session is being closed. Close works as before (the runtime's
// EPOLL_CTL_DEL of a descriptor no longer in its set fails, unchecked).
func (l *evLoop) leaveRuntimePoller(fd int) {
	rtPoller.Lock()
	if rtPoller.fd == 0 {
		rtPoller.fd = findRuntimeEpoll(fd, l.epfd)
	}
	rtfd := rtPoller.fd
	rtPoller.Unlock()
	if rtfd < 0 {
		return
	}
	err := unix.EpollCtl(rtfd, unix.EPOLL_CTL_DEL, fd, &unix.EpollEvent{})
	if err != nil && !errors.Is(err, unix.ENOENT) {
		l.srv.log.Warn("event loop: the runtime's poller keeps its sockets", zap.Error(err))
		rtPoller.Lock()
		rtPoller.fd = -1
		rtPoller.Unlock()
	}
}

// rtPoller is the runtime's epoll set (one a process), as
// leaveRuntimePoller found it: 0 not looked for yet, -1 none found.
var rtPoller struct {
	sync.Mutex
	fd int
}

// findRuntimeEpoll returns the eventpoll descriptor other than ours that
// has fd in its set, or -1.
func findRuntimeEpoll(fd, ours int) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	want := "tfd: " + strconv.Itoa(fd) + " "
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil || n == ours {
			continue
		}
		if t, err := os.Readlink("/proc/self/fd/" + e.Name()); err != nil || t != "anon_inode:[eventpoll]" {
			continue
		}
		info, err := os.ReadFile("/proc/self/fdinfo/" + e.Name())
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(info), "\n") {
			if strings.HasPrefix(strings.Join(strings.Fields(line), " ")+" ", want) {
				return n
			}
		}
	}
	return -1
}

// serve does what es's edges allow: flush what waits, move bytes both
// ways within the budget, end what ended. more: bytes may still be
// queued; retry: wmu was held.
func (l *evLoop) serve(es *evSession) (more, retry bool) {
	s := es.s
	defer func() {
		if p := recover(); p != nil {
			s.logger().Error("splice panic", zap.Any("panic", p), zap.ByteString("stack", debug.Stack()))
			s.setEnd(EndPanic)
			s.closeConns()
			l.endAll(es, net.ErrClosed)
			l.remove(es)
			more, retry = false, false
		}
	}()
	if !es.closed.Load() {
		more, retry = es.step()
	}
	if es.closed.Load() && (es.upOn || es.downOn) {
		l.endAll(es, net.ErrClosed)
	}
	if !es.upOn && !es.downOn {
		l.remove(es)
		return false, false
	}
	return more, retry
}

// step is serve's work on a session whose sockets are open.
func (es *evSession) step() (more, retry bool) {
	// 1. The backend's remainder, then the client's records.
	if es.upOn && es.upPend > 0 && es.bOut {
		if err := es.flushUp(); err != nil {
			es.end(es.up, err)
			return false, false
		}
	}
	if es.upOn && es.cIn && es.upPend == 0 {
		m, err := es.readClient()
		if err != nil {
			es.end(es.up, err)
			if es.closed.Load() {
				return false, false
			}
		}
		more = more || m
	}
	// 2. The client's side: what waits for it, then the backend's bytes.
	if (es.cPend && es.cOut) || es.kuOwed || (es.downOn && es.bIn && !es.cPend) {
		if !es.rc.wmu.TryLock() {
			return more, true
		}
		m, eof, upErr, err := es.clientSideLocked()
		switch {
		case upErr != nil:
			es.end(es.up, upErr)
		case eof:
			// As directionEnded on the backend's EOF: close_notify (sent
			// by clientSide) and both legs closed.
			es.downOn = false
			es.s.setEnd(es.down.endReason(io.EOF))
			es.s.closeConns()
			es.s.directionDone()
		case err != nil:
			es.end(es.down, err)
		}
		more = more || m
	}
	return more, false
}

// end ends direction d with err, as a goroutine's direction ends.
func (es *evSession) end(d *direction, err error) {
	if d == es.up {
		if !es.upOn {
			return
		}
		es.upOn = false
		es.releaseRead()
	} else {
		if !es.downOn {
			return
		}
		es.downOn = false
	}
	es.s.directionEnded(d, err)
	es.s.directionDone()
}

// endAll ends the directions still running once the sockets are closed.
func (l *evLoop) endAll(es *evSession, err error) {
	for _, d := range []*direction{es.up, es.down} {
		es.end(d, err)
	}
}

// remove forgets an ended session.
func (l *evLoop) remove(es *evSession) {
	if es.gone {
		return
	}
	l.mu.Lock()
	es.gone = true // under mu for adopt, which may not have run yet
	delete(l.sessions, es.key)
	l.mu.Unlock()
	l.setAsleep(es)
	es.releaseRead()
	if es.rc.wmu.TryLock() {
		if es.rc.pend != nil {
			recBufs.Put(es.rc.pend)
			es.rc.pend = nil
		}
		es.rc.wmu.Unlock()
	}
}

func (es *evSession) releaseRead() {
	rc := es.rc
	if rc.rbuf != nil {
		recvBufs.Put(rc.rbuf)
		rc.rbuf, rc.have = nil, 0
	}
	es.upPend = 0
}

// touch notes that es moved bytes: it is awake until a sweep finds it
// quiet.
func (es *evSession) touch() {
	es.lastData = es.loop.now
	if es.awakeAt == 0 {
		l := es.loop
		if len(l.awake) == 0 {
			l.sweepAt = l.now + l.srv.parkAfter/2
		}
		l.awake = append(l.awake, es)
		es.awakeAt = len(l.awake)
	}
}

func (l *evLoop) setAsleep(es *evSession) {
	if es.awakeAt == 0 {
		return
	}
	i := es.awakeAt - 1
	last := l.awake[len(l.awake)-1]
	l.awake[i], last.awakeAt = last, i+1
	l.awake[len(l.awake)-1] = nil
	l.awake = l.awake[:len(l.awake)-1]
	es.awakeAt = 0
}

// sweep puts the sessions quiet for after to sleep, as a parked
// direction sleeps: no AEAD, no buffer.
func (l *evLoop) sweep(after time.Duration) {
	for i := 0; i < len(l.awake); {
		es := l.awake[i]
		if l.now-es.lastData < after || es.upPend > 0 || es.kuOwed || es.cPend || !es.rc.wmu.TryLock() {
			i++
			continue
		}
		if es.rc.pend != nil {
			es.rc.wmu.Unlock()
			i++
			continue
		}
		es.rc.l.SleepWrite()
		es.rc.wmu.Unlock()
		es.rc.sleep(true)
		l.setAsleep(es) // moves the last one to i
	}
	l.sweepAt = l.now + after/2
}

// readClient reads records from the client, opens them and writes their
// data to the backend, within the budget.
func (es *evSession) readClient() (more bool, err error) {
	rc := es.rc
	defer func() {
		if rc.have == 0 && rc.rbuf != nil {
			recvBufs.Put(rc.rbuf)
			rc.rbuf = nil
		}
	}()
	for range evLoopBudget {
		if rc.rbuf == nil {
			rc.rbuf = recvBufs.Get().(*[]byte)
			rc.have = copy(*rc.rbuf, rc.carry)
			rc.carry = nil
		}
		buf := *rc.rbuf
		room := len(buf) - rc.have
		n, again, rerr := es.loop.op.read(es.crw, buf[rc.have:])
		if again || (n < room && !es.cHup) {
			es.cIn = false
		}
		if n == 0 && rerr == nil {
			return false, nil
		}
		es.touch()
		rc.have += n
		w, off, upd, oerr := openRecords(rc.l, buf, rc.have)
		if upd {
			es.kuOwed = true
		}
		if w > 0 {
			wn, blocked, werr := es.loop.op.write(es.brw, buf[:w])
			es.up.counter.Add(int64(wn))
			if werr != nil {
				return false, werr
			}
			if blocked {
				// Keep the remainder at the head, the partial record after it.
				es.bOut = false
				es.armOut(sideBackend)
				es.upPend = copy(buf, buf[wn:w])
				rc.have = es.upPend + copy(buf[es.upPend:], buf[off:rc.have])
			} else {
				rc.have = copy(buf, buf[off:rc.have])
			}
		} else {
			rc.have = copy(buf, buf[off:rc.have])
		}
		if oerr != nil {
			if a, ok := tls13.AlertOf(oerr); ok {
				rc.sendAlert(a)
			}
			return false, oerr
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) && rc.have > 0 {
				rerr = io.ErrUnexpectedEOF // the client stopped inside a record
			}
			return false, rerr
		}
		if !es.cIn || es.upPend > 0 {
			return false, nil
		}
	}
	return es.cIn, nil
}

// flushUp writes the backend's remainder: rbuf holds it at its head,
// the start of a record not yet whole after it.
func (es *evSession) flushUp() error {
	rc := es.rc
	buf := *rc.rbuf
	wn, blocked, err := es.loop.op.write(es.brw, buf[:es.upPend])
	es.up.counter.Add(int64(wn))
	if err != nil {
		return err
	}
	if blocked {
		es.bOut = false
		es.armOut(sideBackend)
		es.upPend -= wn
		rc.have = copy(buf, buf[wn:rc.have])
		return nil
	}
	rc.have = copy(buf, buf[es.upPend:rc.have])
	es.upPend = 0
	if rc.have == 0 {
		recvBufs.Put(rc.rbuf)
		rc.rbuf = nil
	}
	return nil
}

// clientSideLocked is clientSide, then wmu unlocked (a panic included).
func (es *evSession) clientSideLocked() (more, eof bool, upErr, err error) {
	defer es.rc.wmu.Unlock()
	defer func() { es.cPend = es.rc.pend != nil }()
	return es.clientSide()
}

// clientSide runs under wmu: the client's pending records, an owed
// KeyUpdate, then the backend's bytes sealed, within the budget. eof: the
// backend ended and close_notify went out; upErr fails the
// client-to-backend direction (its KeyUpdate), err the other.
func (es *evSession) clientSide() (more, eof bool, upErr, err error) {
	rc := es.rc
	if rc.pend != nil {
		if !es.cOut {
			return false, false, nil, nil
		}
		if !es.flushPendNB() {
			return false, false, nil, nil
		}
	}
	if es.kuOwed {
		es.kuOwed = false
		var b [32]byte
		rec, err := rc.l.SealKeyUpdate(b[:0], false)
		if err != nil {
			return false, false, err, nil
		}
		if err := es.writeClient(rec, nil, 0, false); err != nil {
			return false, false, nil, err
		}
		if rc.pend != nil {
			return false, false, nil, nil
		}
	}
	if !es.downOn {
		return false, false, nil, nil
	}
	for range evLoopBudget {
		if !es.bIn {
			return false, false, nil, nil
		}
		bp := recBufs.Get().(*[]byte)
		buf := *bp
		var slots [tls13.Slots][]byte
		for i := range slots {
			slots[i] = tls13.Slot(buf, i)
		}
		n, again, rerr := es.loop.op.readv(es.brw, &slots)
		if again || (n < tls13.Slots*tls13.MaxPlaintext && !es.bHup) {
			es.bIn = false
		}
		if n > 0 {
			es.touch()
			wire, last, serr := sealSlots(rc.l, buf, n)
			if serr != nil {
				recBufs.Put(bp)
				return false, false, nil, serr
			}
			if werr := es.writeClient(wire, bp, n, last == '\n'); werr != nil {
				return false, false, nil, werr
			}
		} else {
			recBufs.Put(bp)
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				rc.alertLocked(tls13.CloseNotify)
				return false, true, nil, nil
			}
			return false, false, nil, rerr
		}
		if rc.pend != nil {
			return false, false, nil, nil
		}
	}
	return es.bIn, false, nil, nil
}

// writeClient writes sealed records carrying n bytes of plaintext to the
// client without blocking; wmu is held. A remainder stays in rc.pend: in
// bp itself when the records are in it (bp is then the session's), else
// in a pooled copy. bp, when given and not kept, goes back to the pool.
func (es *evSession) writeClient(wire []byte, bp *[]byte, n int, nl bool) error {
	rc := es.rc
	wn, blocked, err := es.loop.op.write(es.crw, wire)
	if !blocked && err == nil {
		es.down.counter.Add(int64(n))
		if n > 0 {
			es.s.atBoundary = nl
		}
		if bp != nil {
			recBufs.Put(bp)
		}
		return nil
	}
	if err != nil {
		if bp != nil {
			recBufs.Put(bp)
		}
		return err
	}
	es.cOut = false
	es.armOut(sideClient)
	if n == 0 {
		nl = es.s.atBoundary // a KeyUpdate alone changes no line
	}
	es.s.atBoundary = false
	if bp == nil {
		bp = recBufs.Get().(*[]byte)
		end := copy(*bp, wire[wn:])
		rc.pend, rc.pendOff, rc.pendEnd = bp, 0, end
	} else {
		// Seal laid the records out from the start of bp.
		rc.pend, rc.pendOff, rc.pendEnd = bp, wn, len(wire)
	}
	rc.pendPlain, rc.pendNL = n, nl
	return nil
}

// flushPendNB writes rc.pend; it reports whether nothing is left.
func (es *evSession) flushPendNB() bool {
	rc := es.rc
	nl := rc.pendNL
	if rc.flushPend() {
		es.s.atBoundary = nl
		return true
	}
	es.cOut = false
	es.armOut(sideClient)
	return false
}

// writeNB is ioOp.write for the rare writes outside a loop's data path
// (an alert, a flush under a kick's wmu): a fresh op each.
func writeNB(c syscall.RawConn, p []byte) (n int, blocked bool, err error) {
	return newIOOp().write(c, p)
}

// getLoops returns the event loops, starting them the first time; nil
// means sessions run in goroutines.
func (srv *Server) getLoops() *evLoops {
	srv.loopsOnce.Do(func() {
		if srv.o().SpliceLoop == LoopOff || srv.closing.Load() {
			return
		}
		n := evLoopCount(runtime.GOMAXPROCS(0))
		if n == 0 {
			return
		}
		ls, err := newEvLoops(srv, n)
		if err != nil {
			srv.log.Warn("no event loops for spliced sessions; they run in goroutines", zap.Error(err))
			return
		}
		srv.loops.Store(ls)
	})
	return srv.loops.Load()
}

// evLoopCount is how many loops a process with procs Ps runs: one P is
// always left without a loop. A loop blocked in epoll_wait keeps its P
// (the runtime's sysmon hands it off only later, after up to 10 ms when
// its poll has backed off), so loops on every P delayed every other
// goroutine, logins and handshakes, until sysmon came round (measured:
// login p50 33 ms instead of 7 ms with two loops on two Ps). With a
// single P there is no loop at all.
func evLoopCount(procs int) int {
	return procs - 1
}

// stopLoops ends the loops once no session needs them.
func (srv *Server) stopLoops() {
	srv.loopsOnce.Do(func() {}) // none may start from now on
	if ls := srv.loops.Load(); ls != nil {
		ls.stop()
	}
}
