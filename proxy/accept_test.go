package proxy

import (
	"context"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/testenv"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// The accept loop against a listener that fails on cue (as go-smtp's
// server tests do): a Temporary error is retried with a growing
// backoff and the listener goes on serving, a permanent error ends
// Serve with it, and Shutdown still stops a Serve that is accepting.

// tempError is an accept error worth retrying (EMFILE and the like).
type tempError struct{}

func (tempError) Error() string   { return "too many open files (test)" }
func (tempError) Temporary() bool { return true }
func (tempError) Timeout() bool   { return false }

// scriptedListener returns its script's errors from Accept first, in
// order, then accepts on the real listener under it.
type scriptedListener struct {
	net.Listener
	mu     sync.Mutex
	script []error
	closed bool
}

func (l *scriptedListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	if len(l.script) > 0 {
		err := l.script[0]
		l.script = l.script[1:]
		l.mu.Unlock()
		return nil, err
	}
	l.mu.Unlock()
	return l.Listener.Accept()
}

func (l *scriptedListener) Close() error {
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
	return l.Listener.Close()
}

func (l *scriptedListener) isClosed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closed
}

// acceptServer is a Server whose log is observed, and a scripted
// listener on loopback for it.
func acceptServer(t *testing.T, script ...error) (*Server, *scriptedListener, *observer.ObservedLogs) {
	t.Helper()
	core, logs := observer.New(zapcore.WarnLevel)
	srv, err := NewServer(Options{
		Router: fixedRouter(&routing.Backend{ID: "none", Addr: "127.0.0.1:1"}),
		Logger: zap.New(core),
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return srv, &scriptedListener{Listener: ln, script: script}, logs
}

// retries returns the backoffs of the logged accept retries.
func retries(logs *observer.ObservedLogs) []time.Duration {
	var out []time.Duration
	for _, e := range logs.FilterMessage("accept failed, retrying").All() {
		for _, f := range e.Context {
			if f.Key == "backoff" {
				out = append(out, time.Duration(f.Integer))
			}
		}
	}
	return out
}

// TestServePermanentAcceptError: Temporary errors are retried with a
// doubling backoff; the first permanent one ends Serve with that error
// and closes the listener.
func TestServePermanentAcceptError(t *testing.T) {
	permanent := errors.New("listener broken (test)")
	srv, ln, logs := acceptServer(t, tempError{}, tempError{}, tempError{}, permanent)
	defer srv.Close()
	err := srv.Serve(ln, Listener{Mode: StartTLS})
	if !errors.Is(err, permanent) {
		t.Fatalf("Serve returned %v, want the permanent accept error", err)
	}
	got := retries(logs)
	want := []time.Duration{5 * time.Millisecond, 10 * time.Millisecond, 20 * time.Millisecond}
	if len(got) != len(want) {
		t.Fatalf("logged %d retries (%v), want %d", len(got), got, len(want))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("retry %d waited %v, want %v", i, got[i], want[i])
		}
	}
	if !ln.isClosed() {
		t.Error("Serve returned without closing its listener")
	}
}

// TestServeAfterTemporaryAcceptErrors: after Temporary errors (a net
// timeout counts as one) the listener still serves clients, and
// Shutdown ends Serve with ErrServerClosed.
func TestServeAfterTemporaryAcceptErrors(t *testing.T) {
	timeout := &net.OpError{Op: "accept", Net: "tcp", Err: &timeoutError{}}
	srv, ln, logs := acceptServer(t, tempError{}, timeout)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln, Listener{Mode: StartTLS}) }()

	c := dialConv(t, ln.Addr().String(), nil)
	c.Expect("* OK [CAPABILITY ")
	c.Send("a LOGOUT\r\n")
	c.Expect("* BYE")
	if n := len(retries(logs)); n != 2 {
		t.Errorf("logged %d retries, want 2", n)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := <-done; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve returned %v after Shutdown, want ErrServerClosed", err)
	}
	if !ln.isClosed() {
		t.Error("Shutdown left the listener open")
	}
}

// TestShutdownDuringAcceptBackoff: a Shutdown while Serve waits out a
// backoff ends Serve with ErrServerClosed, not the next accept error.
func TestShutdownDuringAcceptBackoff(t *testing.T) {
	script := make([]error, 50) // 50 retries would take over 40 s
	for i := range script {
		script[i] = tempError{}
	}
	srv, ln, logs := acceptServer(t, script...)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln, Listener{Mode: StartTLS}) }()
	testenv.WaitFor(t, func() bool { return len(retries(logs)) >= 3 })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, ErrServerClosed) {
			t.Fatalf("Serve returned %v, want ErrServerClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve still running 5 s after Shutdown")
	}
}

type timeoutError struct{}

func (*timeoutError) Error() string   { return "i/o timeout (test)" }
func (*timeoutError) Timeout() bool   { return true }
func (*timeoutError) Temporary() bool { return true }
