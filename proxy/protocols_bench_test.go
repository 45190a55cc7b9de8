package proxy

import (
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/imapgate/imapgate/internal/testenv"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

// BenchmarkLMTPDelivery delivers a 4 KiB message to one recipient, over
// one MTA connection, straight to Dovecot's LMTP and through imapgate.
// cpu-us/delivery is this process's CPU (the client, plus imapgate when
// it is in the path): the difference between the two is imapgate's cost.
//
//	go test -run '^$' -bench 'LMTPDelivery|POP3Login' -benchtime 2000x ./proxy/
func BenchmarkLMTPDelivery(b *testing.B) {
	testenv.Need(b, "dovecot")
	d := testenv.StartDovecot(b, testenv.DovecotOptions{TrustedNetworks: "127.0.0.0/8", Protocols: []string{"lmtp"},
		Extra: "mail_fsync = never\nlog_path = /dev/null"})
	be := dovecotLMTPBackend("d1", d)
	srv, err := NewServer(Options{Router: fixedRouter(be), Logger: zap.NewNop()})
	if err != nil {
		b.Fatal(err)
	}
	h := &harness{srv: srv}
	b.Cleanup(func() { srv.Close(); h.wg.Wait() })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	h.wg.Go(func() { srv.Serve(ln, Listener{Protocol: routing.ProtocolLMTP, Mode: StartTLS}) })
	msg := testenv.Message("bench", strings.Repeat(strings.Repeat("b", 62)+"\r\n", 64))
	for _, target := range []struct{ name, addr string }{{"direct", d.LMTPAddr}, {"imapgate", ln.Addr().String()}} {
		b.Run(target.name, func(b *testing.B) {
			conn, err := net.Dial("tcp", target.addr)
			if err != nil {
				b.Fatal(err)
			}
			c := smtp.NewClientLMTP(conn)
			defer c.Close()
			if err := c.Hello("bench"); err != nil {
				b.Fatal(err)
			}
			cpu0, start := testenv.SelfCPU(b), time.Now()
			for b.Loop() {
				if err := c.SendMail("s@example.com", []string{"alice@example.org"}, strings.NewReader(msg)); err != nil {
					b.Fatal(err)
				}
			}
			elapsed, cpu := time.Since(start), testenv.SelfCPU(b)-cpu0
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "deliveries/s")
			b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-us/delivery")
		})
	}
}

// BenchmarkPOP3Login logs in and out over implicit TLS (AUTH PLAIN,
// QUIT/LOGOUT), with POP3 and IMAP, straight to Dovecot and through
// imapgate. cpu-us/login is this process's CPU, as above.
func BenchmarkPOP3Login(b *testing.B) {
	testenv.Need(b, "dovecot")
	d := testenv.StartDovecot(b, testenv.DovecotOptions{TrustedNetworks: "127.0.0.0/8", Protocols: []string{"pop3"},
		Extra: "log_path = /dev/null"})
	be := dovecotLMTPBackend("d1", d)
	ca := testenv.NewTestCA(b)
	srv, err := NewServer(Options{Router: fixedRouter(be), Logger: zap.NewNop(),
		TLS: &tls.Config{Certificates: []tls.Certificate{ca.ServerCert}}})
	if err != nil {
		b.Fatal(err)
	}
	h := &harness{srv: srv}
	b.Cleanup(func() { srv.Close(); h.wg.Wait() })
	addrs := map[string]string{}
	for _, p := range []routing.Protocol{routing.ProtocolIMAP, routing.ProtocolPOP3} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		addrs[p.String()] = ln.Addr().String()
		h.wg.Go(func() { srv.Serve(ln, Listener{Protocol: p, Mode: ImplicitTLS}) })
	}
	addrs["pop3-direct"], addrs["imap-direct"] = d.POP3TLSAddr, d.TLSAddr
	clientTLS := &tls.Config{RootCAs: ca.Pool, ServerName: "localhost", ClientSessionCache: tls.NewLRUClientSessionCache(64)}
	directTLS := &tls.Config{RootCAs: d.CA.Pool, ServerName: "localhost", ClientSessionCache: tls.NewLRUClientSessionCache(64)}
	const user = "alice@example.org"
	pass := d.Users[user]
	plain := base64.StdEncoding.EncodeToString([]byte("\x00" + user + "\x00" + pass))
	pop3 := func(addr string, cfg *tls.Config) func() error {
		return func() error {
			c := dialConvB(addr, cfg)
			if c == nil {
				return fmt.Errorf("dial")
			}
			defer c.c.Close()
			return c.script("+OK", "AUTH PLAIN "+plain+"\r\n", "+OK", "QUIT\r\n", "+OK")
		}
	}
	imap := func(addr string, cfg *tls.Config) func() error {
		return func() error {
			c := dialConvB(addr, cfg)
			if c == nil {
				return fmt.Errorf("dial")
			}
			defer c.c.Close()
			return c.script("* OK", "a AUTHENTICATE PLAIN "+plain+"\r\n", "a OK", "b LOGOUT\r\n", "* BYE")
		}
	}
	once := map[string]func() error{
		"imap": imap(addrs["imap"], clientTLS), "imap-direct": imap(addrs["imap-direct"], directTLS),
		"pop3": pop3(addrs["pop3"], clientTLS), "pop3-direct": pop3(addrs["pop3-direct"], directTLS),
	}
	for _, name := range []string{"imap-direct", "imap", "pop3-direct", "pop3"} {
		b.Run(name, func(b *testing.B) {
			var fails atomic.Int64
			cpu0, start := testenv.SelfCPU(b), time.Now()
			for b.Loop() {
				if err := once[name](); err != nil {
					fails.Add(1)
					b.Fatal(err)
				}
			}
			elapsed, cpu := time.Since(start), testenv.SelfCPU(b)-cpu0
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "logins/s")
			b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-us/login")
		})
	}
}

// rawConv is a scripted conversation without a testing.T.
type rawConv struct {
	c  net.Conn
	br interface{ ReadString(byte) (string, error) }
}

func dialConvB(addr string, cfg *tls.Config) *rawConv {
	c, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		return nil
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return &rawConv{c: c, br: bufioReader(c)}
}

// script alternates expected line prefixes and lines to send, starting
// with an expectation.
func (c *rawConv) script(steps ...string) error {
	for i, s := range steps {
		if i%2 == 1 {
			if _, err := c.c.Write([]byte(s)); err != nil {
				return err
			}
			continue
		}
		for {
			l, err := c.br.ReadString('\n')
			if err != nil {
				return fmt.Errorf("waiting for %q: %w", s, err)
			}
			if strings.HasPrefix(l, s) {
				break
			}
			if !strings.HasPrefix(l, "* ") {
				return fmt.Errorf("got %q, want %q", l, s)
			}
		}
	}
	return nil
}
