package test

import (
	"context"
	"crypto/tls"
	"net"
	"sync"
	"testing"

	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/imapgate/imapgate/internal/testenv"
	"github.com/imapgate/imapgate/proxy"
	"github.com/imapgate/imapgate/routing"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// CertMagic (the ACME tests) keeps a rate limiter per CA account
		// for the life of the process, and refreshes file locks on a
		// goroutine that notices their release only when it next wakes.
		goleak.IgnoreAnyFunction("github.com/caddyserver/certmagic.(*RingBufferRateLimiter).loop"),
		goleak.IgnoreAnyFunction("github.com/caddyserver/certmagic.keepLockfileFresh"),
		// A test backend's go-imap v2 (beta.8) connection can stay blocked
		// on its own response lock after its client hung up in the middle
		// of a response (see proxy's TestMain).
		goleak.IgnoreAnyFunction("github.com/emersion/go-imap/v2/imapserver.newResponseEncoder"),
	)
}

// conv is a scripted client conversation.
type conv = testenv.Conv

func dialConv(t testing.TB, addr string, tlsCfg *tls.Config) *conv {
	t.Helper()
	return testenv.DialConv(t, addr, tlsCfg)
}

// memUsers are the users of the in-process backend.
var memUsers = map[string]string{
	"alice@example.org": "alicepass",
	"bob@example.org":   "bob pass",
}

// startMemBackend runs go-imap's in-memory server with memUsers.
func startMemBackend(t testing.TB) string {
	t.Helper()
	return testenv.StartMemIMAP(t, memUsers)
}

func fixedRouter(b *routing.Backend) routing.Router {
	return routing.RouterFunc(func(context.Context, string) (*routing.Backend, error) { return b, nil })
}

// harness is an imapgate Server on two loopback listeners, implicit TLS
// and st (cleartext with STARTTLS).
type harness struct {
	srv          *proxy.Server
	tlsAddr      string // implicit TLS
	startTLSAddr string // cleartext + STARTTLS
	clientTLS    *tls.Config
	wg           sync.WaitGroup
}

func newHarnessListeners(t testing.TB, router routing.Router, mod func(*proxy.Options), st proxy.Listener) *harness {
	t.Helper()
	ca := testenv.NewTestCA(t)
	opts := proxy.Options{
		Router: router,
		TLS:    &tls.Config{Certificates: []tls.Certificate{ca.ServerCert}},
		Logger: zaptest.NewLogger(t),
	}
	opts.Limits.AuthFailureDelay = -1
	if mod != nil {
		mod(&opts)
	}
	srv, err := proxy.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{srv: srv, clientTLS: &tls.Config{RootCAs: ca.Pool, ServerName: "localhost"}}
	for _, l := range []proxy.Listener{{Mode: proxy.ImplicitTLS}, st} {
		addr := serveExtra(t, h, l)
		if l.Mode == proxy.ImplicitTLS {
			h.tlsAddr = addr
		} else {
			h.startTLSAddr = addr
		}
	}
	t.Cleanup(func() {
		srv.Close()
		h.wg.Wait()
	})
	return h
}

// serveExtra serves one more listener on the harness's Server.
func serveExtra(t testing.TB, h *harness, l proxy.Listener) string {
	t.Helper()
	return testenv.ServeLoopback(t, &h.wg, func(ln net.Listener) error { return h.srv.Serve(ln, l) }, proxy.ErrServerClosed)
}
