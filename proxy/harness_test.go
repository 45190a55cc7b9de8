package proxy

import (
	"bufio"
	"crypto/sha256"

	"context"
	"crypto/tls"
	"github.com/emersion/go-imap/v2/imapclient"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/imapgate/imapgate/internal/testenv"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap/zaptest"
)

// memUsers are the users of the in-process backends.
var memUsers = map[string]string{
	"alice@example.org": "alicepass",
	"bob@example.org":   "bob pass",
	"carol":             "pässwörd",
}

// startMemBackend runs go-imap's in-memory server with memUsers.
func startMemBackend(t testing.TB) string {
	t.Helper()
	return testenv.StartMemIMAP(t, memUsers)
}

// harness is an imapgate Server on two loopback listeners.
type harness struct {
	srv          *Server
	tlsAddr      string // implicit TLS
	startTLSAddr string // cleartext + STARTTLS
	clientTLS    *tls.Config
	wg           sync.WaitGroup
}

func fixedRouter(b *routing.Backend) routing.Router {
	return routing.RouterFunc(func(context.Context, string) (*routing.Backend, error) { return b, nil })
}

func newHarness(t testing.TB, router routing.Router, mod func(*Options)) *harness {
	t.Helper()
	return newHarnessListeners(t, router, mod, Listener{Mode: StartTLS})
}

func bufioReader(c net.Conn) *bufio.Reader { return bufio.NewReader(c) }

// newTestServer is a Server for router with a test CA's certificate,
// its log on the test and no failure delay, then mod's changes.
func newTestServer(t testing.TB, router routing.Router, mod func(*Options)) (*Server, *testenv.TestCA) {
	t.Helper()
	ca := testenv.NewTestCA(t)
	opts := Options{
		Router: router,
		TLS:    &tls.Config{Certificates: []tls.Certificate{ca.ServerCert}},
		Logger: zaptest.NewLogger(t),
	}
	opts.Limits.AuthFailureDelay = -1
	if mod != nil {
		mod(&opts)
	}
	srv, err := NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	return srv, ca
}

// newHarnessListeners is newHarness with the StartTLS listener's options
// given (the implicit-TLS one keeps the defaults).
func newHarnessListeners(t testing.TB, router routing.Router, mod func(*Options), st Listener) *harness {
	t.Helper()
	srv, ca := newTestServer(t, router, mod)
	// Park idle directions almost at once, so that every test also runs
	// the parked path (the riskier one), not only the 2 s wait before it.
	srv.parkAfter = 5 * time.Millisecond
	h := &harness{srv: srv, clientTLS: &tls.Config{RootCAs: ca.Pool, ServerName: "localhost"}}
	for _, l := range []Listener{{Mode: ImplicitTLS}, st} {
		addr := serveExtra(t, h, l)
		if l.Mode == ImplicitTLS {
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

// conv is a scripted client conversation (testenv.Conv).
type conv = testenv.Conv

func dialConv(t testing.TB, addr string, tlsCfg *tls.Config) *conv {
	t.Helper()
	return testenv.DialConv(t, addr, tlsCfg)
}

// appendMessage APPENDs body to INBOX (a literal of len(body) bytes).
func appendMessage(t testing.TB, cl *imapclient.Client, body []byte) {
	t.Helper()
	app := cl.Append("INBOX", int64(len(body)), nil)
	if _, err := app.Write(body); err != nil {
		t.Fatal(err)
	}
	if err := app.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := app.Wait(); err != nil {
		t.Fatalf("APPEND: %v", err)
	}
}

// checkNewest selects INBOX, fetches its newest message and checks it is
// body, byte for byte (by checksum).
func checkNewest(t testing.TB, cl *imapclient.Client, body []byte) {
	t.Helper()
	sel, err := cl.Select("INBOX", nil).Wait()
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := cl.Fetch(imap.SeqSetNum(sel.NumMessages), &imap.FetchOptions{BodySection: []*imap.FetchItemBodySection{{}}}).Collect()
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) != 1 {
		t.Fatalf("fetched %d messages", len(msgs))
	}
	var got []byte
	for _, b := range msgs[0].BodySection {
		got = b.Bytes
	}
	if sha256.Sum256(got) != sha256.Sum256(body) {
		t.Fatalf("fetched %d bytes differ from the %d appended", len(got), len(body))
	}
}

// dialWatching logs in over implicit TLS with a client that reports
// every EXISTS on the returned channel.
func dialWatching(t testing.TB, h *harness, user, pass string) (*imapclient.Client, <-chan uint32) {
	t.Helper()
	exists := make(chan uint32, 16)
	cl, err := imapclient.DialTLS(h.tlsAddr, &imapclient.Options{
		TLSConfig: h.clientTLS,
		UnilateralDataHandler: &imapclient.UnilateralDataHandler{
			Mailbox: func(m *imapclient.UnilateralDataMailbox) {
				if m.NumMessages != nil {
					exists <- *m.NumMessages
				}
			},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	if err := cl.Login(user, pass).Wait(); err != nil {
		t.Fatal(err)
	}
	return cl, exists
}

// serveExtra serves one more listener on the harness's Server.
func serveExtra(t testing.TB, h *harness, l Listener) string {
	t.Helper()
	return testenv.ServeLoopback(t, &h.wg, func(ln net.Listener) error { return h.srv.Serve(ln, l) }, ErrServerClosed)
}
