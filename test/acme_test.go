package test

// Certificates from the tls package's Manager on the proxy's listeners:
// ACME against a real Pebble (HTTP-01, and TLS-ALPN-01 answered by the
// proxy's own implicit-TLS listener), renewal and file replacement under a
// spliced session, and the TLS policy as a client meets it.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"github.com/imapgate/imapgate/proxy"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/testenv"
	"github.com/imapgate/imapgate/routing"
	igtls "github.com/imapgate/imapgate/tls"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"
)

// acmeName is the name the ACME tests obtain a certificate for;
// pebble-challtestsrv resolves every name to 127.0.0.1.
const acmeName = "imap.test.example"

// certProxy is a proxy.Server in front of an in-process backend on an
// implicit-TLS listener and a STARTTLS one, with what it logged.
type certProxy struct {
	*harness
	logs *observer.ObservedLogs
}

// serveCertProxy serves tlsCfg on implicit (already bound: it may be the
// port a CA validates TLS-ALPN-01 on) and on a new STARTTLS listener.
func serveCertProxy(t *testing.T, tlsCfg *tls.Config, implicit net.Listener) *certProxy {
	t.Helper()
	backend := startMemBackend(t)
	log, logs := observedLogger(t)
	opts := proxy.Options{
		Router: fixedRouter(&routing.Backend{ID: "mem1", Addr: backend}),
		TLS:    tlsCfg,
		Logger: log,
	}
	opts.Limits.AuthFailureDelay = -1
	srv, err := proxy.NewServer(opts)
	if err != nil {
		implicit.Close()
		t.Fatal(err)
	}
	st, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		implicit.Close()
		t.Fatal(err)
	}
	h := &harness{srv: srv, tlsAddr: implicit.Addr().String(), startTLSAddr: st.Addr().String()}
	for _, s := range []struct {
		ln net.Listener
		l  proxy.Listener
	}{{implicit, proxy.Listener{Mode: proxy.ImplicitTLS}}, {st, proxy.Listener{Mode: proxy.StartTLS}}} {
		h.wg.Add(1)
		go func() {
			defer h.wg.Done()
			if err := srv.Serve(s.ln, s.l); !errors.Is(err, proxy.ErrServerClosed) {
				t.Errorf("Serve: %v", err)
			}
		}()
	}
	t.Cleanup(func() {
		srv.Close()
		h.wg.Wait()
	})
	return &certProxy{harness: h, logs: logs}
}

// observedLogger logs to the test and records what it logged.
func observedLogger(t *testing.T) (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(zapcore.InfoLevel)
	return zap.New(zapcore.NewTee(zaptest.NewLogger(t, zaptest.Level(zapcore.InfoLevel)).Core(), core)), logs
}

// sessionEnds counts the proxy's session summary lines that ended so.
func (p *certProxy) sessionEnds(end string) int {
	n := 0
	for _, e := range p.logs.FilterMessage("session end").All() {
		if e.ContextMap()["end"] == end {
			n++
		}
	}
	return n
}

// startPebble starts Pebble. CertMagic's process-wide goroutines (a
// rate limiter per CA account, a lock refresher) outlive the Managers by
// design; TestMain tells goleak about them.
func startPebble(t *testing.T, opts testenv.PebbleOptions) *testenv.Pebble {
	t.Helper()
	return testenv.StartPebble(t, opts)
}

// newACMEManager builds a Manager that obtains acmeName from p, with file
// storage in a temporary directory; mod picks the challenges.
func newACMEManager(t *testing.T, p *testenv.Pebble, mod func(*igtls.ACMEConfig)) (*igtls.Manager, *observer.ObservedLogs) {
	t.Helper()
	cfg := igtls.ACMEConfig{
		Names:               []string{acmeName},
		DirectoryURL:        p.DirectoryURL,
		CARootFile:          p.CAFile,
		Email:               "postmaster@test.example",
		HTTP01:              igtls.HTTP01Config{Disable: true},
		TLSALPN01:           igtls.TLSALPN01Config{Disable: true},
		Storage:             igtls.StorageConfig{Dir: t.TempDir()},
		DisableOCSPStapling: true, // Pebble has no OCSP responder
	}
	mod(&cfg)
	log, logs := observedLogger(t)
	m, err := igtls.New(context.Background(), igtls.Config{ACME: cfg}, log.Named("tls"))
	if err != nil {
		t.Fatalf("tls.New: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	return m, logs
}

// waitACMECert waits until m serves an ACME certificate for name whose
// NotAfter is not skip, and returns its expiry.
func waitACMECert(t *testing.T, m *igtls.Manager, name string, skip time.Time) igtls.CertExpiry {
	t.Helper()
	deadline := time.Now().Add(45 * time.Second)
	for {
		for _, e := range m.Expiry() {
			if e.Name == name && e.Source == igtls.SourceACME && !e.NotAfter.Equal(skip) {
				return e
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new ACME certificate for %s within 45 s; have %+v", name, m.Expiry())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// challengesServed counts the challenge answers CertMagic logged, by type.
func challengesServed(logs *observer.ObservedLogs, typ string) int {
	n := 0
	for _, e := range logs.FilterMessageSnippet("served key authentication").All() {
		if e.ContextMap()["challenge"] == typ {
			n++
		}
	}
	return n
}

// clientFor is what a mail client trusting roots uses for name.
func clientFor(name string, roots *x509.CertPool) *tls.Config {
	return &tls.Config{ServerName: name, RootCAs: roots, NextProtos: []string{"imap"}}
}

// leaf returns the certificate a conversation's TLS connection verified,
// failing the test if it did not verify a chain.
func leaf(c *conv) *x509.Certificate {
	c.T.Helper()
	tc, ok := c.C.(*tls.Conn)
	if !ok {
		c.T.Fatal("not a TLS connection")
	}
	st := tc.ConnectionState()
	if len(st.VerifiedChains) == 0 {
		c.T.Fatal("no verified chain")
	}
	if st.NegotiatedProtocol != "imap" {
		c.T.Errorf("negotiated ALPN %q, want imap", st.NegotiatedProtocol)
	}
	return st.PeerCertificates[0]
}

// refresh gives a long-lived conversation another 20 s before its deadline.
func refresh(c *conv) { c.C.SetDeadline(time.Now().Add(20 * time.Second)) }

// implicitSession connects with implicit TLS, checks the greeting and
// returns the conversation and the certificate it verified.
func implicitSession(t *testing.T, addr string, cfg *tls.Config) (*conv, *x509.Certificate) {
	t.Helper()
	c := dialConv(t, addr, cfg)
	leaf := leaf(c)
	g := c.Expect("* OK [CAPABILITY ")
	if !strings.Contains(g, " AUTH=PLAIN") || strings.Contains(g, "STARTTLS") {
		t.Errorf("implicit-TLS greeting %q", g)
	}
	return c, leaf
}

// startTLSSession connects in cleartext, upgrades with STARTTLS and checks
// the capabilities over TLS.
func startTLSSession(t *testing.T, addr string, cfg *tls.Config) (*conv, *x509.Certificate) {
	t.Helper()
	c := dialConv(t, addr, nil)
	if g := c.Expect("* OK [CAPABILITY "); !strings.Contains(g, " STARTTLS") || !strings.Contains(g, " LOGINDISABLED") {
		t.Errorf("cleartext greeting %q", g)
	}
	c.StartTLS(cfg)
	leaf := leaf(c)
	c.Send("c CAPABILITY\r\n")
	l, un := c.Tagged("c")
	if !strings.HasPrefix(l, "c OK") || len(un) != 1 || !strings.Contains(un[0], " AUTH=PLAIN") || strings.Contains(un[0], "STARTTLS") {
		t.Errorf("CAPABILITY after STARTTLS: %q %q", un, l)
	}
	return c, leaf
}

// loginAndSelect logs in as alice and selects INBOX: the session is then
// spliced to the backend.
func loginAndSelect(c *conv) {
	c.T.Helper()
	c.Send("a LOGIN alice@example.org alicepass\r\n")
	c.Expect("a OK")
	c.Send("s SELECT INBOX\r\n")
	if l, _ := c.Tagged("s"); !strings.HasPrefix(l, "s OK") {
		c.T.Fatalf("SELECT: %q", l)
	}
}

// stillSpliced checks a spliced session still carries traffic both ways:
// a NOOP, then an APPEND whose message the backend reports.
func stillSpliced(c *conv, tag string) {
	c.T.Helper()
	refresh(c)
	c.Send(tag + "n NOOP\r\n")
	if l, _ := c.Tagged(tag + "n"); !strings.HasPrefix(l, tag+"n OK") {
		c.T.Fatalf("NOOP on the spliced session: %q", l)
	}
	msg := "Subject: " + tag + "\r\n\r\nstill here\r\n"
	c.Send(fmt.Sprintf("%sa APPEND INBOX {%d}\r\n", tag, len(msg)))
	c.Expect("+")
	c.Send(msg + "\r\n")
	if l, _ := c.Tagged(tag + "a"); !strings.HasPrefix(l, tag+"a OK") {
		c.T.Fatalf("APPEND on the spliced session: %q", l)
	}
}

// TestACMEProxyListeners obtains a certificate from Pebble for acmeName,
// by HTTP-01 and by TLS-ALPN-01 (validated through the proxy's own
// implicit-TLS listener), and connects as a mail client trusting only
// Pebble's roots: with implicit TLS and with STARTTLS, a login on each.
// With ACME on, foreign ALPN and TLS 1.0/1.1 are still refused on both
// listeners.
func TestACMEProxyListeners(t *testing.T) {
	for _, challenge := range []string{"http-01", "tls-alpn-01"} {
		t.Run(challenge, func(t *testing.T) {
			// The implicit-TLS listener is bound before the Manager starts
			// ordering, so a TLS-ALPN-01 validation always meets the proxy
			// (and CertMagic never binds the port itself).
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			opts := testenv.PebbleOptions{}
			if challenge == "tls-alpn-01" {
				opts.TLSPort = ln.Addr().(*net.TCPAddr).Port
			}
			p := startPebble(t, opts)
			start := time.Now()
			m, tlsLogs := newACMEManager(t, p, func(c *igtls.ACMEConfig) {
				if challenge == "http-01" {
					c.HTTP01 = igtls.HTTP01Config{Addr: fmt.Sprintf("127.0.0.1:%d", p.HTTPPort)}
				} else {
					c.TLSALPN01 = igtls.TLSALPN01Config{Port: p.TLSPort}
				}
			})
			px := serveCertProxy(t, m.ServerConfig(), ln)
			waitACMECert(t, m, acmeName, time.Time{})
			t.Logf("%s issuance took %v", challenge, time.Since(start).Round(time.Millisecond))

			if n := challengesServed(tlsLogs, challenge); n == 0 {
				t.Errorf("no %s challenge answered", challenge)
			}
			if challenge == "tls-alpn-01" {
				// The validation handshakes were the proxy's connections,
				// closed after the handshake without a word of IMAP.
				if n := px.sessionEnds("acme_challenge"); n == 0 {
					t.Errorf("the proxy saw no TLS-ALPN-01 validation")
				}
			}
			if got := p.Issued(); got != 1 {
				t.Errorf("Pebble issued %d certificates, want 1", got)
			}

			cfg := clientFor(acmeName, p.IssuerPool(t))
			ic, il := implicitSession(t, px.tlsAddr, cfg)
			sc, sl := startTLSSession(t, px.startTLSAddr, cfg)
			for _, leaf := range []*x509.Certificate{il, sl} {
				if !slices.Equal(leaf.DNSNames, []string{acmeName}) {
					t.Errorf("served a certificate for %v", leaf.DNSNames)
				}
			}
			if !il.Equal(sl) {
				t.Errorf("implicit TLS and STARTTLS serve different certificates (serials %x, %x)", il.SerialNumber, sl.SerialNumber)
			}
			loginAndSelect(ic)
			loginAndSelect(sc)
			stillSpliced(ic, "i")
			stillSpliced(sc, "s")

			refusedHandshakes(t, px, cfg)
		})
	}
}

// refusedHandshakes checks that both listeners refuse a foreign ALPN,
// acme-tls/1 with no challenge pending, and TLS 1.0 and 1.1: the proxy
// sends an alert and ends the session at the handshake.
func refusedHandshakes(t *testing.T, px *certProxy, good *tls.Config) {
	t.Helper()
	bad := map[string]func(*tls.Config){
		"http/1.1":              func(c *tls.Config) { c.NextProtos = []string{"http/1.1"} },
		"h2 and http/1.1":       func(c *tls.Config) { c.NextProtos = []string{"h2", "http/1.1"} },
		"acme-tls/1, not asked": func(c *tls.Config) { c.NextProtos = []string{igtls.ALPNACMETLS} },
		"TLS 1.0":               func(c *tls.Config) { c.MinVersion, c.MaxVersion = tls.VersionTLS10, tls.VersionTLS10 },
		"TLS 1.1":               func(c *tls.Config) { c.MinVersion, c.MaxVersion = tls.VersionTLS11, tls.VersionTLS11 },
	}
	before := px.sessionEnds("tls_handshake")
	refused := 0
	for what, mod := range bad {
		cfg := good.Clone()
		mod(cfg)
		for _, mode := range []proxy.ListenMode{proxy.ImplicitTLS, proxy.StartTLS} {
			var err error
			if mode == proxy.ImplicitTLS {
				var c *tls.Conn
				c, err = tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", px.tlsAddr, cfg)
				if err == nil {
					c.Close()
				}
			} else {
				c := dialConv(t, px.startTLSAddr, nil)
				c.Expect("* OK")
				c.Send("st STARTTLS\r\n")
				c.Expect("st OK")
				err = tls.Client(c.C, cfg).Handshake()
			}
			// A refusal is the server's alert ("remote error"), not the
			// client giving up on its own.
			var oe *net.OpError
			if err == nil || !errors.As(err, &oe) || oe.Op != "remote error" {
				t.Errorf("%s on the %s listener: handshake error %v, want an alert from the proxy", what, mode, err)
				continue
			}
			refused++
		}
	}
	// Each refusal is a session that ended in its handshake.
	testenv.WaitFor(t, func() bool { return px.sessionEnds("tls_handshake")-before == refused })
	// The policy leaves the good client alone.
	c, _ := implicitSession(t, px.tlsAddr, good)
	c.Send("l LOGOUT\r\n")
	c.Expect("* BYE")
}

// TestACMEProxyRenewal has Pebble issue 30 s certificates renewed at half
// their life, validated by TLS-ALPN-01 through the proxy's listener. A
// session spliced under the first certificate carries on through the
// renewal while new handshakes, implicit and STARTTLS, get the new one.
func TestACMEProxyRenewal(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := startPebble(t, testenv.PebbleOptions{TLSPort: ln.Addr().(*net.TCPAddr).Port, Validity: 30 * time.Second})
	m, _ := newACMEManager(t, p, func(c *igtls.ACMEConfig) {
		c.TLSALPN01 = igtls.TLSALPN01Config{Port: p.TLSPort}
		c.RenewalWindowRatio = 0.5
		c.RenewCheckInterval = time.Second
	})
	px := serveCertProxy(t, m.ServerConfig(), ln)
	first := waitACMECert(t, m, acmeName, time.Time{})
	cfg := clientFor(acmeName, p.IssuerPool(t))

	live, firstLeaf := implicitSession(t, px.tlsAddr, cfg)
	if !firstLeaf.NotAfter.Equal(first.NotAfter) {
		// A renewal may already have happened (ARI windows this short are
		// the whole life); then the live session is under that one.
		t.Logf("the live session's certificate expires %v, the first %v", firstLeaf.NotAfter, first.NotAfter)
	}
	loginAndSelect(live)
	stillSpliced(live, "a")
	challengesBefore := px.sessionEnds("acme_challenge")

	// Pebble reuses a valid authorization for about one order in a hundred
	// even with PEBBLE_AUTHZREUSE=0 (wfe.makeAuthorizations creates a new
	// one when rand.Intn(100) > percent, which is false when it draws 0):
	// such a renewal is issued without any challenge. The next renewal
	// (every 15 s here) is validated anew; three in a row without a
	// challenge through the proxy is a failure.
	var renewed igtls.CertExpiry
	after, validated := firstLeaf.NotAfter, false
	for i := 0; i < 3 && !validated; i++ {
		start := time.Now()
		renewed = waitACMECert(t, m, acmeName, after)
		validated = px.sessionEnds("acme_challenge") > challengesBefore
		t.Logf("renewal %d after %v, validated through the proxy: %v", i+1, time.Since(start).Round(time.Millisecond), validated)
		after = renewed.NotAfter
	}
	if !validated {
		t.Errorf("three renewals, none validated through the proxy's listener")
	}
	for name, dial := range map[string]func(*testing.T, string, *tls.Config) (*conv, *x509.Certificate){
		"implicit TLS": implicitSession, "STARTTLS": startTLSSession,
	} {
		addr := px.tlsAddr
		if name == "STARTTLS" {
			addr = px.startTLSAddr
		}
		_, leaf := dial(t, addr, cfg)
		if leaf.Equal(firstLeaf) || leaf.NotAfter.Before(renewed.NotAfter) {
			t.Errorf("%s: a new handshake got the certificate expiring %v (serial %x), want the renewed one (%v or later)",
				name, leaf.NotAfter, leaf.SerialNumber, renewed.NotAfter)
		}
	}
	stillSpliced(live, "b")
	if got := p.Issued(); got < 2 {
		t.Errorf("Pebble issued %d certificates, want at least 2", got)
	}
}

// TestFileCertReplacedThroughProxy replaces the certificate and key files
// on disk (by rename, as certbot does): new handshakes through the proxy,
// implicit and STARTTLS, see the new certificate without a reload signal,
// and sessions spliced under the old one keep working.
func TestFileCertReplacedThroughProxy(t *testing.T) {
	oldCA, newCA := testenv.NewTestCA(t), testenv.NewTestCA(t)
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "imap.pem"), filepath.Join(dir, "imap.key")
	install := func(ca *testenv.TestCA) {
		t.Helper()
		for src, dst := range map[string]string{ca.ServerCertFile: certFile, ca.ServerKeyFile: keyFile} {
			b, err := os.ReadFile(src)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(dst+".tmp", b, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(dst+".tmp", dst); err != nil {
				t.Fatal(err)
			}
		}
	}
	install(oldCA)
	m, err := igtls.New(context.Background(), igtls.Config{
		Certificates:   []igtls.CertFile{{CertFile: certFile, KeyFile: keyFile}},
		ReloadInterval: 50 * time.Millisecond,
	}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	px := serveCertProxy(t, m.ServerConfig(), ln)

	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(oldCA.CertPEM)
	roots.AppendCertsFromPEM(newCA.CertPEM)
	cfg := clientFor("localhost", roots)
	oldLeaf, newLeaf := oldCA.ServerCert.Leaf, newCA.ServerCert.Leaf

	ic, leaf := implicitSession(t, px.tlsAddr, cfg)
	if !leaf.Equal(oldLeaf) {
		t.Fatalf("serving serial %x, not the installed certificate's %x", leaf.SerialNumber, oldLeaf.SerialNumber)
	}
	sc, _ := startTLSSession(t, px.startTLSAddr, cfg)
	loginAndSelect(ic)
	loginAndSelect(sc)

	install(newCA)
	// The watcher polls; wait for a handshake that sees the new file.
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, leaf := implicitSession(t, px.tlsAddr, cfg)
		c.C.Close()
		if leaf.Equal(newLeaf) {
			break
		}
		if !leaf.Equal(oldLeaf) {
			t.Fatalf("served serial %x, neither the old nor the new certificate", leaf.SerialNumber)
		}
		if time.Now().After(deadline) {
			t.Fatal("the replaced certificate was not served within 10 s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, leaf := startTLSSession(t, px.startTLSAddr, cfg); !leaf.Equal(newLeaf) {
		t.Errorf("STARTTLS after the replacement got serial %x, want %x", leaf.SerialNumber, newLeaf.SerialNumber)
	}
	stillSpliced(ic, "i")
	stillSpliced(sc, "s")
	// Nothing was cut: both sessions log out normally.
	for _, c := range []*conv{ic, sc} {
		c.Send("z LOGOUT\r\n")
		if l, _ := c.Tagged("z"); !strings.HasPrefix(l, "z OK") {
			t.Errorf("LOGOUT: %q", l)
		}
	}
}
