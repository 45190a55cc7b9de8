package proxy

import (
	"runtime"
	"runtime/metrics"
	"unsafe"

	"golang.org/x/sys/unix"
)

// How a loop waits for its sockets (evLoop.wait).
//
// A loop's epoll_wait made like any system call (syscall.Syscall) marks
// its P as in a system call. While the process's other P runs a
// handshake or a login, the runtime's sysmon thread retakes that P after
// one of its ticks (runtime/proc.go, retake: a P in a system call is left
// alone only while another P is idle), hands it to a thread that finds
// nothing to do, and goes back to polling every 20 µs for the next
// millisecond at least. Under a login load that is most of sysmon's
// wake-ups: measured on the bench machine, 6.4 of its nanosleep(2) and
// 20 context switches a login, against 12 for HAProxy (BENCHMARKS.md,
// session 10).
//
// So while handshakes or logins are under way (busySessions) and no
// goroutine waits for a P (the runtime's runnable count), the loop waits
// with a raw system call instead: to the runtime its P is running, there
// is nothing to retake, and sysmon backs off. Such a wait is bounded by
// evRawWait, because nothing can take that P from the loop meanwhile: a
// goroutine made runnable on it waits until the other P steals it or
// the wait ends, and the next wait is then a normal one if goroutines are
// queued. A stop of the world (a collection) interrupts it with the
// preemption signal (epoll_wait is never restarted after a handler, and
// the loop's next call stops it); with asynchronous preemption turned
// off it waits for the bound. With no handshake or login under way (idle
// sessions, a fetch, NOOPs) the loop always waits the normal way: a raw
// wait there bought nothing and cost NOOP round trips 8-16% more CPU
// (session 8).

// evRawWait bounds a raw wait, in milliseconds.
const evRawWait = 2

// runnableMetric is the runtime's count of goroutines waiting for a P.
const runnableMetric = "/sched/goroutines/runnable:goroutines"

// wait is epoll_wait on the loop's set for up to timeout ms (-1: no
// limit), made raw when that is cheaper (see above).
func (l *evLoop) wait(events []unix.EpollEvent, timeout int) (int, error) {
	if timeout != 0 && busySessions.Load() > 0 && l.noneRunnable() {
		if timeout < 0 || timeout > evRawWait {
			timeout = evRawWait
		}
		l.rawWaits++
		return rawEpollWait(l.epfd, events, timeout)
	}
	return unix.EpollWait(l.epfd, events, timeout)
}

// noneRunnable reports whether no goroutine waits for a P. A Go without
// the metric gives false (waits stay normal).
func (l *evLoop) noneRunnable() bool {
	if l.runnable == nil {
		l.runnable = []metrics.Sample{{Name: runnableMetric}}
	}
	metrics.Read(l.runnable)
	v := l.runnable[0].Value
	return v.Kind() == metrics.KindUint64 && v.Uint64() == 0
}

// rawEpollWait is epoll_pwait(2) without entering the runtime's
// system-call state. Not inlined: its prologue is where a loop
// interrupted by the preemption signal stops.
//
//go:noinline
func rawEpollWait(epfd int, events []unix.EpollEvent, msec int) (int, error) {
	r, _, e := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), uintptr(msec), 0, 0)
	runtime.KeepAlive(events)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}
