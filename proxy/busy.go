package proxy

import "sync/atomic"

// busySessions counts the handshakes and logins under way in this
// process: the work the sessions' goroutines do between the accept and the
// splice. The event loops read it to choose how they wait
// (evloop_linux.go, evLoop.wait): while it is above zero the runtime's
// other threads are busy with that work.
var busySessions atomic.Int32

// busy counts one handshake or login until the function it returns is
// called:
//
//	defer busy()()
func busy() (done func()) {
	busySessions.Add(1)
	return busyDone
}

func busyDone() { busySessions.Add(-1) }
