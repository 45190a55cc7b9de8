//go:build linux

package proxy

import (
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"
)

// rawWaitsOf reads a loop's count of raw waits on its goroutine.
func rawWaitsOf(l *evLoop) uint64 {
	var n uint64
	l.do(func() { n = l.rawWaits })
	return n
}

// While a handshake or a login is under way, a loop waits raw (outside
// the runtime's system-call state), and stops doing so once none is;
// collections still stop the world promptly, the raw wait being
// interrupted by the preemption signal (or, without it, bounded), and the
// spliced session is served throughout.
func TestLoopRawWaitWhileBusy(t *testing.T) {
	h, _ := loopHarness(t, nil)
	c, s := loginLoop(t, h)
	l := s.ev.Load().loop
	for busySessions.Load() != 0 { // the login's own count ends just after its OK
		time.Sleep(time.Millisecond)
	}
	idle := rawWaitsOf(l)
	c.Send("b NOOP\r\n")
	c.Expect("b OK")
	if n := rawWaitsOf(l); n != idle {
		t.Fatalf("%d raw waits with no handshake or login under way", n-idle)
	}

	done := busy()
	before := rawWaitsOf(l)
	deadline := time.Now().Add(10 * time.Second)
	for rawWaitsOf(l) == before {
		if time.Now().After(deadline) {
			done()
			t.Fatal("no raw wait within 10s while a login was under way")
		}
		time.Sleep(time.Millisecond)
	}
	for i := range 5 {
		gc := make(chan struct{})
		go func() { runtime.GC(); close(gc) }()
		select {
		case <-gc:
		case <-time.After(10 * time.Second):
			t.Fatalf("collection %d did not finish within 10s of raw waits", i)
		}
		c.Send("c NOOP\r\n")
		c.Expect("c OK")
	}
	done()

	after := rawWaitsOf(l)
	c.Send("d NOOP\r\n")
	c.Expect("d OK")
	if n := rawWaitsOf(l); n != after {
		t.Fatalf("%d raw waits after the login ended", n-after)
	}
}

// The same with asynchronous preemption off, where nothing interrupts a
// raw wait: a collection then waits for its bound, not for ever.
func TestLoopRawWaitNoAsyncPreempt(t *testing.T) {
	if os.Getenv("IMAPGATE_RAWWAIT_CHILD") == "1" {
		t.Skip("the child runs TestLoopRawWaitWhileBusy only")
	}
	cmd := exec.Command(os.Args[0], "-test.run", "^TestLoopRawWaitWhileBusy$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), "GODEBUG=asyncpreemptoff=1", "IMAPGATE_RAWWAIT_CHILD=1")
	done := make(chan struct{})
	var out []byte
	var err error
	go func() { out, err = cmd.CombinedOutput(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		cmd.Process.Kill()
		<-done
		t.Fatalf("the child did not finish within 2 min:\n%s", out)
	}
	if err != nil || !strings.Contains(string(out), "--- PASS: TestLoopRawWaitWhileBusy") {
		t.Fatalf("child: %v\n%s", err, out)
	}
}
