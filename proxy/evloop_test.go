//go:build linux

package proxy

import (
	"testing"
	"time"
)

// loopAsleep reports, from inside its loop, whether es is registered and
// asleep (swept: no AEAD, no buffer).
func loopAsleep(es *evSession) bool {
	var asleep bool
	es.loop.do(func() { asleep = es.key != 0 && !es.gone && es.awakeAt == 0 })
	return asleep
}

// assertLoopAsleep waits until the loop has put es to sleep and checks
// what it then holds, looking from inside the loop goroutine (nothing of
// the session moves meanwhile).
func assertLoopAsleep(t *testing.T, es *evSession) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		var (
			asleep, awake, buf, keys, pend bool
		)
		es.loop.do(func() {
			asleep = es.key != 0 && !es.gone && es.awakeAt == 0
			if !asleep {
				return
			}
			es.rc.wmu.Lock()
			awake, pend = es.rc.l.Awake(), es.rc.pend != nil
			es.rc.wmu.Unlock()
			buf, keys = es.rc.rbuf != nil, es.rc.nbConn.keys != nil
		})
		if !asleep {
			continue
		}
		if awake || buf || keys || pend {
			t.Fatalf("idle loop session holds: AEAD %v, buffer %v, keys %v, pending records %v", awake, buf, keys, pend)
		}
		return
	}
	t.Fatal("the loop did not put the session to sleep within 10s")
}
