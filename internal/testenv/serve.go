package testenv

import (
	"errors"
	"net"
	"sync"
	"testing"

	"github.com/imapgate/imapgate/internal/memimap"
)

// StartMemIMAP runs go-imap's in-memory server on loopback with users
// (name: password) and returns its address: a real IMAP server
// in-process, for fast tests that need no Dovecot. Cleanup stops it.
func StartMemIMAP(t testing.TB, users map[string]string) string {
	t.Helper()
	srv, err := memimap.Start("", users)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv.Addr
}

// ServeLoopback listens on a loopback port and runs serve on the
// listener in a goroutine that wg tracks. serve must return closed (a
// server's ErrServerClosed) once the test stops the server; anything
// else fails the test. It returns the address.
func ServeLoopback(t testing.TB, wg *sync.WaitGroup, serve func(net.Listener) error, closed error) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := serve(ln); !errors.Is(err, closed) {
			t.Errorf("Serve: %v", err)
		}
	}()
	return ln.Addr().String()
}
