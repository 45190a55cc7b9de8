package testenv

import (
	"net"
	"testing"
)

// Accept serves ln until the test ends: every connection gets its own
// goroutine running handle, and is closed when handle returns. ln is
// closed at cleanup, which ends the loop. It is the accept loop of the
// tests' hand-made servers (scripted backends no real server can imitate).
func Accept(t testing.TB, ln net.Listener, handle func(net.Conn)) {
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
}
