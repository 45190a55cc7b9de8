package main

import (
	"context"
	"crypto/tls"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestListenDeferAccept: an implicit-TLS listener defers accept until
// the client's first bytes are there (TCP_DEFER_ACCEPT), and hands over
// a connection that sends them; a listener whose clients wait for a
// greeting (STARTTLS, LMTP, HTTP) must not, or its clients would wait
// for a greeting that never comes.
func TestListenDeferAccept(t *testing.T) {
	for _, clientFirst := range []bool{true, false} {
		ln, err := listen(context.Background(), "127.0.0.1:0", clientFirst)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		rc, err := ln.(*net.TCPListener).SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		var v int
		var gerr error
		rc.Control(func(fd uintptr) { v, gerr = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT) })
		if gerr != nil {
			t.Fatal(gerr)
		}
		if (v > 0) != clientFirst {
			t.Fatalf("clientFirst %v: TCP_DEFER_ACCEPT = %d", clientFirst, v)
		}

		accepted := make(chan net.Conn, 1)
		go func() {
			c, err := ln.Accept()
			if err == nil {
				accepted <- c
			}
		}()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if !clientFirst {
			// A greeting-first listener hands the connection over at once.
			select {
			case sc := <-accepted:
				sc.Close()
			case <-time.After(5 * time.Second):
				t.Fatal("a greeting-first listener did not accept a silent client")
			}
			continue
		}
		// A TLS client's first flight is what releases the connection.
		go tls.Client(c, &tls.Config{InsecureSkipVerify: true}).Handshake()
		select {
		case sc := <-accepted:
			buf := make([]byte, 5)
			sc.SetReadDeadline(time.Now().Add(5 * time.Second))
			if n, err := sc.Read(buf); err != nil || n == 0 || buf[0] != 0x16 {
				t.Fatalf("first read after a deferred accept: %d bytes %x, %v (want a TLS handshake record)", n, buf[:n], err)
			}
			sc.Close()
		case <-time.After(5 * time.Second):
			t.Fatal("the ClientHello did not release the connection")
		}
	}
}
