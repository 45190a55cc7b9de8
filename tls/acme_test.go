package tls

import (
	"bufio"
	"context"
	stdtls "crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/libdns/libdns"
	"github.com/miekg/dns"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imapgate/imapgate/internal/testenv"
)

// acmeTestConfig is an ACME configuration against p with file storage in a
// temporary directory and HTTP-01 on the port Pebble validates.
func acmeTestConfig(t *testing.T, p *testenv.Pebble, names ...string) ACMEConfig {
	return ACMEConfig{
		Names:               names,
		DirectoryURL:        p.DirectoryURL,
		CARootFile:          p.CAFile,
		Email:               "postmaster@test.example",
		HTTP01:              HTTP01Config{Addr: fmt.Sprintf("127.0.0.1:%d", p.HTTPPort)},
		TLSALPN01:           TLSALPN01Config{Disable: true},
		Storage:             StorageConfig{Dir: t.TempDir()},
		DisableOCSPStapling: true, // Pebble has no OCSP responder
	}
}

// testLogger logs to the test at info level and records what it logged.
func testLogger(t *testing.T) (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(zap.InfoLevel)
	tl := zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel))
	return zap.New(zapcore.NewTee(tl.Core(), core)), logs
}

func newACMEManager(t *testing.T, cfg Config) *Manager {
	t.Helper()
	m, _ := newACMEManagerLogs(t, cfg)
	return m
}

func newACMEManagerLogs(t *testing.T, cfg Config) (*Manager, *observer.ObservedLogs) {
	t.Helper()
	log, logs := testLogger(t)
	m, err := New(context.Background(), cfg, log)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	return m, logs
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

// waitACME waits until m has an ACME certificate for name whose NotAfter
// differs from the one in skip (zero: any), and returns its expiry.
func waitACME(t *testing.T, m *Manager, name string, skip time.Time, timeout time.Duration) CertExpiry {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		for _, e := range m.Expiry() {
			if e.Name == name && e.Source == SourceACME && !e.NotAfter.Equal(skip) {
				return e
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no ACME certificate for %s after %v; have %+v", name, timeout, m.Expiry())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// dialVerified connects to addr with SNI name, verifying against roots,
// and returns the connection.
func dialVerified(t *testing.T, addr, name string, roots *x509.CertPool) *stdtls.Conn {
	t.Helper()
	d := &net.Dialer{Timeout: 30 * time.Second}
	c, err := stdtls.DialWithDialer(d, "tcp", addr, &stdtls.Config{
		ServerName: name,
		RootCAs:    roots,
		NextProtos: []string{ALPNIMAP},
	})
	if err != nil {
		t.Fatalf("TLS to %s as %s: %v", addr, name, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func leafOf(c *stdtls.Conn) *x509.Certificate { return c.ConnectionState().PeerCertificates[0] }

func TestACMEHTTP01(t *testing.T) {
	p := testenv.StartPebble(t, testenv.PebbleOptions{})
	start := time.Now()
	m, logs := newACMEManagerLogs(t, Config{ACME: acmeTestConfig(t, p, "mail.test.example")})
	waitACME(t, m, "mail.test.example", time.Time{}, 60*time.Second)
	t.Logf("HTTP-01 issuance took %v", time.Since(start).Round(time.Millisecond))

	addr := echoServer(t, m.ServerConfig())
	roots := p.IssuerPool(t)
	c := dialVerified(t, addr, "mail.test.example", roots)
	if c.ConnectionState().NegotiatedProtocol != ALPNIMAP {
		t.Errorf("negotiated %q", c.ConnectionState().NegotiatedProtocol)
	}
	if got := p.Issued(); got != 1 {
		t.Errorf("Pebble issued %d certificates, want 1", got)
	}
	if !strings.Contains(p.Log(), "Attempting to validate w/ HTTP") || challengesServed(logs, "http-01") == 0 {
		t.Errorf("no http-01 validation seen")
	}

	// No SNI: the ACME certificate is the default (the self-signed one is
	// only for when there is nothing better).
	st, err := handshake(t, m.ServerConfig(), &stdtls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := leafNames(st); !slices.Equal(got, []string{"mail.test.example"}) {
		t.Errorf("no-SNI client got %v", got)
	}
	if !m.SelfSigned() {
		t.Error("no static file is configured, so a self-signed fallback should exist")
	}

	// A foreign ALPN is still refused with ACME on.
	if _, err := handshake(t, m.ServerConfig(), &stdtls.Config{ServerName: "mail.test.example", RootCAs: roots, NextProtos: []string{"http/1.1"}}); err == nil {
		t.Error("http/1.1 accepted")
	}
}

func TestACMETLSALPN01(t *testing.T) {
	p := testenv.StartPebble(t, testenv.PebbleOptions{})
	cfg := acmeTestConfig(t, p, "imap.test.example")
	cfg.HTTP01 = HTTP01Config{Disable: true}
	cfg.TLSALPN01 = TLSALPN01Config{Port: p.TLSPort}
	start := time.Now()
	m, logs := newACMEManagerLogs(t, Config{ACME: cfg})
	// The implicit-TLS listener, on the port Pebble validates: the
	// challenge is answered through ServerConfig, nothing else.
	addr := echoServerAt(t, fmt.Sprintf("127.0.0.1:%d", p.TLSPort), m.ServerConfig())
	waitACME(t, m, "imap.test.example", time.Time{}, 60*time.Second)
	t.Logf("TLS-ALPN-01 issuance took %v", time.Since(start).Round(time.Millisecond))
	if m.HTTP01Addr() != "" {
		t.Errorf("HTTP-01 server on %s though disabled", m.HTTP01Addr())
	}
	if n := challengesServed(logs, "tls-alpn-01"); n == 0 || challengesServed(logs, "http-01") != 0 {
		t.Errorf("tls-alpn-01 answered %d times, http-01 %d times", n, challengesServed(logs, "http-01"))
	}

	c := dialVerified(t, addr, "imap.test.example", p.IssuerPool(t))
	if names := leafOf(c).DNSNames; !slices.Equal(names, []string{"imap.test.example"}) {
		t.Errorf("served %v", names)
	}

	// With no challenge pending, acme-tls/1 is refused like any foreign ALPN.
	_, err := stdtls.Dial("tcp", addr, &stdtls.Config{ServerName: "imap.test.example", InsecureSkipVerify: true, NextProtos: []string{ALPNACMETLS}})
	if err == nil {
		t.Error("acme-tls/1 accepted with no challenge pending")
	}
}

func TestACMERenewal(t *testing.T) {
	// Pebble issues 30 s certificates; renewal starts with half left.
	p := testenv.StartPebble(t, testenv.PebbleOptions{Validity: 30 * time.Second})
	cfg := acmeTestConfig(t, p, "renew.test.example")
	cfg.RenewalWindowRatio = 0.5
	cfg.RenewCheckInterval = time.Second
	m := newACMEManager(t, Config{ACME: cfg})
	first := waitACME(t, m, "renew.test.example", time.Time{}, 60*time.Second)

	addr := echoServer(t, m.ServerConfig())
	roots := p.IssuerPool(t)
	live := dialVerified(t, addr, "renew.test.example", roots)
	r := bufio.NewReader(live)
	roundTrip := func(msg string) {
		t.Helper()
		if _, err := io.WriteString(live, msg+"\n"); err != nil {
			t.Fatalf("write on the live connection: %v", err)
		}
		if got, err := r.ReadString('\n'); err != nil || got != msg+"\n" {
			t.Fatalf("read on the live connection: %q, %v", got, err)
		}
	}
	roundTrip("a1 NOOP")

	start := time.Now()
	second := waitACME(t, m, "renew.test.example", first.NotAfter, 60*time.Second)
	// Pebble's renewal information (ARI) for so short a certificate puts
	// the window over its whole life, so CertMagic renews at a random
	// moment of it; the ratio would have it renew at 15 s left.
	t.Logf("renewed %v after the first certificate was issued (waited %v)",
		second.NotBefore.Sub(first.NotBefore).Round(time.Second), time.Since(start).Round(time.Second))
	if !second.NotAfter.After(first.NotAfter) {
		t.Errorf("renewed certificate expires %v, not after the first's %v", second.NotAfter, first.NotAfter)
	}
	c := dialVerified(t, addr, "renew.test.example", roots)
	// Not necessarily second: with ARI windows this short, CertMagic may
	// already have renewed again.
	if got := leafOf(c).NotAfter; got.Before(second.NotAfter) {
		t.Errorf("a new handshake got the certificate expiring %v, want the renewed one (%v or later)", got, second.NotAfter)
	}
	roundTrip("a2 NOOP")
	if got := p.Issued(); got < 2 {
		t.Errorf("Pebble issued %d certificates, want at least 2", got)
	}
}

func TestACMEOnDemand(t *testing.T) {
	p := testenv.StartPebble(t, testenv.PebbleOptions{})
	cfg := acmeTestConfig(t, p)
	cfg.OnDemand = &OnDemandConfig{
		Allow: []string{"*.ondemand.test.example"},
		Decide: func(_ context.Context, name string) error {
			if name == "decided.test.example" {
				return nil
			}
			return fmt.Errorf("%s: no", name)
		},
	}
	m := newACMEManager(t, Config{ACME: cfg})
	addr := echoServer(t, m.ServerConfig())
	roots := p.IssuerPool(t)

	for _, name := range []string{"a.ondemand.test.example", "decided.test.example"} {
		start := time.Now()
		c := dialVerified(t, addr, name, roots) // issued during this handshake
		t.Logf("on-demand issuance for %s took %v", name, time.Since(start).Round(time.Millisecond))
		if got := leafOf(c).DNSNames; !slices.Equal(got, []string{name}) {
			t.Errorf("served %v for %s", got, name)
		}
	}
	issued := p.Issued()
	if issued != 2 {
		t.Errorf("Pebble issued %d, want 2", issued)
	}

	// Names neither listed nor decided get the default certificate, and
	// the CA hears nothing of them.
	for _, name := range []string{"evil.test.example", "a.b.ondemand.test.example"} {
		c, err := stdtls.Dial("tcp", addr, &stdtls.Config{ServerName: name, RootCAs: roots})
		if err == nil {
			c.Close()
			t.Errorf("%s got a certificate that verifies", name)
		}
	}
	if got := p.Issued(); got != issued {
		t.Errorf("Pebble issued %d after refused names, want %d", got, issued)
	}
	var names []string
	for _, e := range m.Expiry() {
		if e.Source == SourceACME {
			names = append(names, e.Name)
		}
	}
	if !slices.Equal(names, []string{"a.ondemand.test.example", "decided.test.example"}) {
		t.Errorf("Expiry lists ACME names %v", names)
	}
}

// challtestsrvDNS is a libdns provider on pebble-challtestsrv's TXT records.
type challtestsrvDNS struct{ p *testenv.Pebble }

func (d challtestsrvDNS) AppendRecords(_ context.Context, zone string, recs []libdns.Record) ([]libdns.Record, error) {
	for _, r := range recs {
		rr := r.RR()
		if err := d.p.SetTXT(libdns.AbsoluteName(rr.Name, zone), rr.Data); err != nil {
			return nil, err
		}
	}
	return recs, nil
}

func (d challtestsrvDNS) DeleteRecords(_ context.Context, zone string, recs []libdns.Record) ([]libdns.Record, error) {
	for _, r := range recs {
		if err := d.p.ClearTXT(libdns.AbsoluteName(r.RR().Name, zone)); err != nil {
			return nil, err
		}
	}
	return recs, nil
}

// soaServer answers SOA queries for zone, and NXDOMAIN for anything else,
// on a loopback UDP port whose address it returns.
func soaServer(t *testing.T, zone string) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		r := new(dns.Msg)
		r.SetReply(q)
		if len(q.Question) == 1 && q.Question[0].Qtype == dns.TypeSOA && strings.EqualFold(q.Question[0].Name, zone) {
			r.Answer = append(r.Answer, &dns.SOA{
				Hdr: dns.RR_Header{Name: zone, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: 60},
				Ns:  "ns." + zone, Mbox: "hostmaster." + zone,
				Serial: 1, Refresh: 60, Retry: 60, Expire: 600, Minttl: 60,
			})
		} else {
			r.Rcode = dns.RcodeNameError
		}
		_ = w.WriteMsg(r)
	})}
	started := make(chan struct{})
	srv.NotifyStartedFunc = func() { close(started) }
	go func() { _ = srv.ActivateAndServe() }()
	<-started
	t.Cleanup(func() { _ = srv.Shutdown() })
	return pc.LocalAddr().String()
}

func TestACMEDNS01Wildcard(t *testing.T) {
	p := testenv.StartPebble(t, testenv.PebbleOptions{})
	cfg := acmeTestConfig(t, p, "*.wild.test.example")
	cfg.DNS01 = &DNS01Config{
		Provider: challtestsrvDNS{p},
		// CertMagic finds the zone by asking for SOA records, which
		// challtestsrv does not implement; a tiny server plays the zone's
		// nameserver. Records are visible at once (no propagation wait).
		Resolvers:          []string{soaServer(t, "test.example.")},
		PropagationTimeout: -1,
	}
	start := time.Now()
	m := newACMEManager(t, Config{ACME: cfg})
	waitACME(t, m, "*.wild.test.example", time.Time{}, 60*time.Second)
	t.Logf("DNS-01 wildcard issuance took %v", time.Since(start).Round(time.Millisecond))
	if m.HTTP01Addr() != "" {
		t.Errorf("HTTP-01 server running with DNS-01")
	}
	addr := echoServer(t, m.ServerConfig())
	c := dialVerified(t, addr, "mx1.wild.test.example", p.IssuerPool(t))
	if got := leafOf(c).DNSNames; !slices.Equal(got, []string{"*.wild.test.example"}) {
		t.Errorf("served %v", got)
	}
}

func TestACMEMixedSources(t *testing.T) {
	p := testenv.StartPebble(t, testenv.PebbleOptions{})
	ca := newTestCA(t)
	dir := t.TempDir()
	static := ca.writeLeaf(t, dir, "static", "static.test.example")
	m := newACMEManager(t, Config{
		Certificates: []CertFile{static},
		ACME:         acmeTestConfig(t, p, "acme.test.example"),
	})
	waitACME(t, m, "acme.test.example", time.Time{}, 60*time.Second)
	addr := echoServer(t, m.ServerConfig())

	dialVerified(t, addr, "acme.test.example", p.IssuerPool(t))
	dialVerified(t, addr, "static.test.example", ca.pool)
	// With a static file, it is the default and there is no self-signed.
	st, err := handshake(t, m.ServerConfig(), &stdtls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := leafNames(st); !slices.Equal(got, []string{"static.test.example"}) {
		t.Errorf("no-SNI client got %v", got)
	}
	if m.SelfSigned() {
		t.Error("self-signed generated although a static file is configured")
	}
	var sources []string
	for _, e := range m.Expiry() {
		sources = append(sources, e.Name+"/"+e.Source.String())
	}
	if want := []string{"acme.test.example/acme", "static.test.example/file"}; !slices.Equal(sources, want) {
		t.Errorf("Expiry: %v, want %v", sources, want)
	}
}

func TestACMEConfigErrors(t *testing.T) {
	bad := map[string]ACMEConfig{
		"wildcard without DNS-01": {Names: []string{"*.example.org"}},
		"unbounded on-demand":     {OnDemand: &OnDemandConfig{}},
		"no challenge":            {Names: []string{"a.example.org"}, HTTP01: HTTP01Config{Disable: true}, TLSALPN01: TLSALPN01Config{Disable: true}},
		"DNS-01 without provider": {Names: []string{"a.example.org"}, DNS01: &DNS01Config{}},
		"bad ratio":               {Names: []string{"a.example.org"}, RenewalWindowRatio: 1.5},
		"bad name":                {Names: []string{"a example.org"}},
		"missing CA root file":    {Names: []string{"a.example.org"}, CARootFile: "/nonexistent.pem", HTTP01: HTTP01Config{Addr: "127.0.0.1:0"}},
	}
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	bad["http-01 port taken"] = ACMEConfig{Names: []string{"a.example.org"}, HTTP01: HTTP01Config{Addr: busy.Addr().String()}}
	for name, cfg := range bad {
		t.Run(name, func(t *testing.T) {
			cfg.Storage.Dir = t.TempDir()
			if m, err := New(context.Background(), Config{ACME: cfg}, nil); err == nil {
				m.Close()
				t.Errorf("New succeeded")
			}
		})
	}
}
