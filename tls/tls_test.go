package tls

import (
	"bufio"
	"context"
	stdtls "crypto/tls"
	"crypto/x509"
	"io"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// CertMagic keeps one rate limiter per CA and account for the life
		// of the process (a package-level map), by design.
		goleak.IgnoreAnyFunction("github.com/caddyserver/certmagic.(*RingBufferRateLimiter).loop"),
		// Its file locks are refreshed by a goroutine that notices the
		// lock is gone only when it next wakes (every 5 s).
		goleak.IgnoreAnyFunction("github.com/caddyserver/certmagic.keepLockfileFresh"),
	)
}

func newManager(t *testing.T, cfg Config) *Manager {
	t.Helper()
	m, err := New(context.Background(), cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func TestSNISelection(t *testing.T) {
	ca := newTestCA(t)
	dir := t.TempDir()
	m := newManager(t, Config{Certificates: []CertFile{
		ca.writeLeaf(t, dir, "a", "a.example.org"),
		ca.writeLeaf(t, dir, "b", "b.example.org", "imap.b.example.org"),
		ca.writeLeaf(t, dir, "w", "*.wild.example.org"),
	}})
	if m.SelfSigned() {
		t.Fatal("SelfSigned() = true with static certificates")
	}
	tests := []struct {
		sni      string
		wantLeaf string // first DNS name of the served certificate
		verify   bool   // the client verifies the chain for sni
	}{
		{"a.example.org", "a.example.org", true},
		{"b.example.org", "b.example.org", true},
		{"IMAP.B.Example.Org.", "b.example.org", false}, // case and trailing dot
		{"mx.wild.example.org", "*.wild.example.org", true},
		{"a.b.wild.example.org", "a.example.org", false}, // a wildcard covers one label only
		{"wild.example.org", "a.example.org", false},
		{"unknown.example.net", "a.example.org", false}, // default: the first
		{"", "a.example.org", false},                    // no SNI: the first
	}
	for _, tt := range tests {
		t.Run(tt.sni, func(t *testing.T) {
			client := &stdtls.Config{ServerName: tt.sni, RootCAs: ca.pool, NextProtos: []string{"imap"}}
			if !tt.verify {
				client.InsecureSkipVerify = true
			}
			st, err := handshake(t, m.ServerConfig(), client)
			if err != nil {
				t.Fatalf("handshake: %v", err)
			}
			if got := leafNames(st); len(got) == 0 || got[0] != tt.wantLeaf {
				t.Errorf("served %v, want %s", got, tt.wantLeaf)
			}
		})
	}
}

func TestSelfSignedFallback(t *testing.T) {
	m := newManager(t, Config{})
	if !m.SelfSigned() {
		t.Fatal("SelfSigned() = false with no certificate configured")
	}
	st, err := handshake(t, m.ServerConfig(), &stdtls.Config{InsecureSkipVerify: true, ServerName: "localhost"})
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	leaf := st.PeerCertificates[0]
	if !slices.Contains(leaf.DNSNames, "localhost") {
		t.Errorf("names %v lack localhost", leaf.DNSNames)
	}
	if leaf.PublicKeyAlgorithm != x509.ECDSA {
		t.Errorf("key algorithm %v, want ECDSA", leaf.PublicKeyAlgorithm)
	}
	if err := leaf.VerifyHostname("localhost"); err != nil {
		t.Error(err)
	}

	m2 := newManager(t, Config{SelfSigned: SelfSignedConfig{Names: []string{"dev.example.org"}}})
	st, err = handshake(t, m2.ServerConfig(), &stdtls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	if got := leafNames(st); !slices.Equal(got, []string{"dev.example.org"}) {
		t.Errorf("names %v, want [dev.example.org]", got)
	}

	if _, err := New(context.Background(), Config{SelfSigned: SelfSignedConfig{Disable: true}}, nil); err == nil {
		t.Error("New with no source and the fallback disabled succeeded")
	}
}

func TestALPN(t *testing.T) {
	m := newManager(t, Config{})
	tests := []struct {
		offer   []string
		wantErr bool
		want    string
	}{
		{nil, false, ""},
		{[]string{"imap"}, false, "imap"},
		{[]string{"http/1.1", "imap"}, false, "imap"},
		{[]string{"http/1.1"}, true, ""}, // ALPACA: a browser talking to an IMAP port
		{[]string{"h2", "http/1.1"}, true, ""},
		{[]string{"smtp"}, true, ""},
		{[]string{"acme-tls/1"}, true, ""}, // no ACME configured: no challenge to answer
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.offer, ","), func(t *testing.T) {
			st, err := handshake(t, m.ServerConfig(), &stdtls.Config{InsecureSkipVerify: true, NextProtos: tt.offer})
			if tt.wantErr {
				if err == nil {
					t.Fatalf("handshake offering %v succeeded (negotiated %q)", tt.offer, st.NegotiatedProtocol)
				}
				return
			}
			if err != nil {
				t.Fatalf("handshake: %v", err)
			}
			if st.NegotiatedProtocol != tt.want {
				t.Errorf("negotiated %q, want %q", st.NegotiatedProtocol, tt.want)
			}
		})
	}
}

func TestVersions(t *testing.T) {
	def := newManager(t, Config{})
	tls13 := newManager(t, Config{MinVersion: "1.3"})
	tests := []struct {
		name    string
		m       *Manager
		version uint16
		ok      bool
	}{
		{"default/1.0", def, stdtls.VersionTLS10, false},
		{"default/1.1", def, stdtls.VersionTLS11, false},
		{"default/1.2", def, stdtls.VersionTLS12, true},
		{"default/1.3", def, stdtls.VersionTLS13, true},
		{"min1.3/1.2", tls13, stdtls.VersionTLS12, false},
		{"min1.3/1.3", tls13, stdtls.VersionTLS13, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st, err := handshake(t, tt.m.ServerConfig(), &stdtls.Config{
				InsecureSkipVerify: true,
				MinVersion:         tt.version,
				MaxVersion:         tt.version,
			})
			if tt.ok && err != nil {
				t.Fatalf("handshake: %v", err)
			}
			if !tt.ok && err == nil {
				t.Fatalf("handshake at %x succeeded", st.Version)
			}
		})
	}
}

func TestPolicyErrors(t *testing.T) {
	bad := []Config{
		{MinVersion: "1.1"},
		{MinVersion: "tls1.2"},
		{CipherSuites: []string{"TLS_RSA_WITH_RC4_128_SHA"}}, // insecure
		{CipherSuites: []string{"TLS_AES_128_GCM_SHA256"}},   // TLS 1.3
		{CipherSuites: []string{"TLS_NO_SUCH_SUITE"}},        // unknown
		{Certificates: []CertFile{{"/nonexistent.pem", "/nonexistent.key"}}},
	}
	for _, cfg := range bad {
		if m, err := New(context.Background(), cfg, nil); err == nil {
			m.Close()
			t.Errorf("New(%+v) succeeded", cfg)
		}
	}

	suite := "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"
	m := newManager(t, Config{CipherSuites: []string{suite}})
	st, err := handshake(t, m.ServerConfig(), &stdtls.Config{InsecureSkipVerify: true, MaxVersion: stdtls.VersionTLS12})
	if err != nil {
		t.Fatal(err)
	}
	if got := stdtls.CipherSuiteName(st.CipherSuite); got != suite {
		t.Errorf("negotiated %s, want %s", got, suite)
	}
}

// echoServer accepts TLS connections with cfg on a loopback port and
// echoes lines back until the connection closes.
func echoServer(t *testing.T, cfg *stdtls.Config) string {
	t.Helper()
	return echoServerAt(t, "127.0.0.1:0", cfg)
}

// echoServerAt is echoServer on a given address.
func echoServerAt(t *testing.T, addr string, cfg *stdtls.Config) string {
	t.Helper()
	ln, err := stdtls.Listen("tcp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

func servedSerial(t *testing.T, addr, sni string, roots *x509.CertPool) string {
	t.Helper()
	c, err := stdtls.Dial("tcp", addr, &stdtls.Config{ServerName: sni, RootCAs: roots})
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0].SerialNumber.String()
}

func TestReloadOnFileChange(t *testing.T) {
	ca := newTestCA(t)
	dir := t.TempDir()
	cf := ca.writeLeaf(t, dir, "mail", "mail.example.org")
	m := newManager(t, Config{Certificates: []CertFile{cf}, ReloadInterval: 20 * time.Millisecond})
	addr := echoServer(t, m.ServerConfig())

	// An established session, as a spliced IMAP session would be.
	live, err := stdtls.Dial("tcp", addr, &stdtls.Config{ServerName: "mail.example.org", RootCAs: ca.pool})
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	oldSerial := live.ConnectionState().PeerCertificates[0].SerialNumber.String()
	r := bufio.NewReader(live)
	roundTrip := func(msg string) {
		t.Helper()
		if _, err := io.WriteString(live, msg+"\n"); err != nil {
			t.Fatalf("write on the live connection: %v", err)
		}
		got, err := r.ReadString('\n')
		if err != nil || got != msg+"\n" {
			t.Fatalf("read on the live connection: %q, %v", got, err)
		}
	}
	roundTrip("a1 NOOP")

	ca.writeLeaf(t, dir, "mail", "mail.example.org") // same paths, new certificate
	deadline := time.Now().Add(5 * time.Second)
	for servedSerial(t, addr, "mail.example.org", ca.pool) == oldSerial {
		if time.Now().After(deadline) {
			t.Fatal("a new handshake still sees the old certificate 5 s after the files changed")
		}
		time.Sleep(10 * time.Millisecond)
	}
	roundTrip("a2 NOOP")
	if got := live.ConnectionState().PeerCertificates[0].SerialNumber.String(); got != oldSerial {
		t.Errorf("the live connection's certificate changed")
	}
}

func TestReloadBrokenKeepsOld(t *testing.T) {
	ca := newTestCA(t)
	dir := t.TempDir()
	cf := ca.writeLeaf(t, dir, "mail", "mail.example.org")
	m := newManager(t, Config{Certificates: []CertFile{cf}, ReloadInterval: -1})
	addr := echoServer(t, m.ServerConfig())
	before := servedSerial(t, addr, "mail.example.org", ca.pool)

	writeFileAtomic(t, cf.CertFile, []byte("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n"))
	if err := m.Reload(); err == nil {
		t.Fatal("Reload of a broken certificate file succeeded")
	}
	if got := servedSerial(t, addr, "mail.example.org", ca.pool); got != before {
		t.Errorf("after a failed reload the served certificate changed")
	}

	// A key that does not match the certificate is broken too.
	other := ca.writeLeaf(t, dir, "other", "mail.example.org")
	data, _ := os.ReadFile(other.CertFile)
	writeFileAtomic(t, cf.CertFile, data)
	if err := m.Reload(); err == nil {
		t.Fatal("Reload of a certificate with a foreign key succeeded")
	}

	// Repaired: the next reload takes it.
	ca.writeLeaf(t, dir, "mail", "mail.example.org")
	if err := m.Reload(); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	if got := servedSerial(t, addr, "mail.example.org", ca.pool); got == before {
		t.Errorf("after a good reload the old certificate is still served")
	}
}

func TestWatcherBrokenFileKeepsOld(t *testing.T) {
	ca := newTestCA(t)
	dir := t.TempDir()
	cf := ca.writeLeaf(t, dir, "mail", "mail.example.org")
	m := newManager(t, Config{Certificates: []CertFile{cf}, ReloadInterval: 10 * time.Millisecond})
	addr := echoServer(t, m.ServerConfig())
	before := servedSerial(t, addr, "mail.example.org", ca.pool)
	writeFileAtomic(t, cf.KeyFile, []byte("not a key"))
	time.Sleep(100 * time.Millisecond) // several polls
	if got := servedSerial(t, addr, "mail.example.org", ca.pool); got != before {
		t.Errorf("the watcher replaced the certificate with a broken one")
	}
}

func TestServerConfigIsACopy(t *testing.T) {
	m := newManager(t, Config{})
	a := m.ServerConfig()
	a.NextProtos = append(a.NextProtos, "http/1.1")
	if b := m.ServerConfig(); slices.Contains(b.NextProtos, "http/1.1") {
		t.Error("changing one ServerConfig changed the next")
	}
}
