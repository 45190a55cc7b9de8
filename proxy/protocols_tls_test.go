package proxy

import (
	"crypto/tls"
	"encoding/base64"
	"strings"
	"testing"

	"github.com/imapgate/imapgate/internal/testenv"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap/zaptest"
)

// TestBackendTLSAllProtocols: the backend legs of POP3 (STLS and
// implicit TLS), ManageSieve (STARTTLS) and LMTP (STARTTLS) to a real
// Dovecot, each verifying Dovecot's certificate.
func TestBackendTLSAllProtocols(t *testing.T) {
	testenv.Need(t, "dovecot")
	d := testenv.StartDovecot(t, testenv.DovecotOptions{TrustedNetworks: "127.0.0.0/8", Protocols: []string{"pop3", "sieve", "lmtp"}})
	btls := &tls.Config{RootCAs: d.CA.Pool, ServerName: "localhost"}
	ca := testenv.NewTestCA(t)
	clientTLS := &tls.Config{RootCAs: ca.Pool, ServerName: "localhost"}
	plain := base64.StdEncoding.EncodeToString([]byte("\x00alice@example.org\x00" + d.Users["alice@example.org"]))
	for _, tc := range []struct {
		name string
		b    *routing.Backend
	}{
		{"starttls", &routing.Backend{ID: "d", Addr: d.Addr, POP3Addr: d.POP3Addr, SieveAddr: d.SieveAddr, LMTPAddr: d.LMTPAddr,
			Security: routing.SecurityStartTLS, LMTPSecurity: routing.SecurityStartTLS, TLS: btls}},
		{"implicit tls", &routing.Backend{ID: "d", Addr: d.TLSAddr, POP3Addr: d.POP3TLSAddr, Security: routing.SecurityTLS, TLS: btls}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, err := NewServer(Options{Router: fixedRouter(tc.b), Logger: zaptest.NewLogger(t),
				TLS: &tls.Config{Certificates: []tls.Certificate{ca.ServerCert}}, Limits: Limits{AuthFailureDelay: -1}})
			if err != nil {
				t.Fatal(err)
			}
			h := &harness{srv: srv}
			t.Cleanup(func() { srv.Close(); h.wg.Wait() })
			pop3s := serveExtra(t, h, Listener{Protocol: routing.ProtocolPOP3, Mode: ImplicitTLS})
			c := dialConv(t, pop3s, clientTLS)
			c.Expect("+OK")
			c.Send("AUTH PLAIN " + plain + "\r\nSTAT\r\n")
			c.Expect("+OK")
			c.Expect("+OK")
			if tc.b.SieveAddr != "" {
				sieves := serveExtra(t, h, Listener{Protocol: routing.ProtocolSieve, Mode: ImplicitTLS})
				s := dialConv(t, sieves, clientTLS)
				s.SieveResponse()
				s.Send("AUTHENTICATE \"PLAIN\" \"" + plain + "\"\r\nLISTSCRIPTS\r\n")
				s.Expect("OK")
				if _, st := s.SieveResponse(); !strings.HasPrefix(st, "OK") {
					t.Fatalf("LISTSCRIPTS over a STARTTLS backend: %q", st)
				}
			}
			if tc.b.LMTPAddr != "" {
				lmtpAddr := serveExtra(t, h, Listener{Protocol: routing.ProtocolLMTP, Mode: StartTLS})
				lc := testenv.LMTPDial(t, lmtpAddr, "")
				if re, de := testenv.Deliver(t, lc, strings.NewReader(testenv.Message("over starttls", "x")), "alice@example.org"); len(re)+len(de) != 0 {
					t.Fatalf("LMTP over a STARTTLS backend: %v %v", re, de)
				}
			}
		})
	}
}
