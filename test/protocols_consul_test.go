package test

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/imapgate/imapgate/proxy"

	"github.com/imapgate/imapgate/routing/consul"

	"github.com/hashicorp/consul/api"
	"github.com/imapgate/imapgate/internal/testenv"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap/zaptest"
)

// TestConsulMoveAllProtocols: backends declare their POP3, ManageSieve
// and LMTP ports in Consul service Meta; a user's every protocol follows
// the one placement, and a move closes their POP3 and ManageSieve
// sessions and sends the next delivery to the new backend.
func TestConsulMoveAllProtocols(t *testing.T) {
	testenv.Need(t, "dovecot", "consul")
	cs := testenv.StartConsul(t)
	cfg := api.DefaultConfig()
	cfg.Address = cs.HTTPAddr
	client, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cfg.Transport.CloseIdleConnections)
	dopts := testenv.DovecotOptions{TrustedNetworks: "127.0.0.0/8", Protocols: []string{"pop3", "lmtp", "sieve"}}
	dovecots := map[string]*testenv.Dovecot{"p1": testenv.StartDovecot(t, dopts), "p2": testenv.StartDovecot(t, dopts)}
	port := func(addr string) string { _, p, _ := net.SplitHostPort(addr); return p }
	for id, d := range dovecots {
		host, p, _ := net.SplitHostPort(d.Addr)
		pn, _ := strconv.Atoi(p)
		err := client.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: id, Name: "imap", Address: host, Port: pn,
			Meta: map[string]string{
				consul.MetaPOP3Port:  port(d.POP3Addr),
				consul.MetaSievePort: port(d.SieveAddr),
				consul.MetaLMTPPort:  port(d.LMTPAddr),
			},
			Check: &api.AgentServiceCheck{TCP: d.Addr, Interval: "1s", Timeout: "500ms"},
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	const hold = 800 * time.Millisecond
	ev := &proxy.LateEvictor{}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := consul.NewConsul(ctx, consul.ConsulConfig{
		Address: cs.HTTPAddr, Service: "imap", Evictor: ev, MoveHold: hold,
		RetryMax: 500 * time.Millisecond, Logger: zaptest.NewLogger(t).Named("router"),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	consulWaitUntil(t, 15*time.Second, "both backends placeable", func() bool {
		n := 0
		for _, b := range r.States() {
			if b.Placeable {
				n++
			}
		}
		return n == 2
	})

	ca := testenv.NewTestCA(t)
	srv, err := proxy.NewServer(proxy.Options{Router: r, TLS: &tls.Config{Certificates: []tls.Certificate{ca.ServerCert}},
		Logger: zaptest.NewLogger(t), Limits: proxy.Limits{AuthFailureDelay: -1}})
	if err != nil {
		t.Fatal(err)
	}
	ev.Set(srv)
	h := &harness{srv: srv}
	t.Cleanup(func() { srv.Close(); h.wg.Wait() })
	clientTLS := &tls.Config{RootCAs: ca.Pool, ServerName: "localhost"}
	pop3s := serveExtra(t, h, proxy.Listener{Protocol: routing.ProtocolPOP3, Mode: proxy.ImplicitTLS})
	sieves := serveExtra(t, h, proxy.Listener{Protocol: routing.ProtocolSieve, Mode: proxy.ImplicitTLS})
	lmtpAddr := serveExtra(t, h, proxy.Listener{Protocol: routing.ProtocolLMTP, Mode: proxy.StartTLS})

	const user = "alice@example.org"
	if err := r.Pin(ctx, user, "p1"); err != nil {
		t.Fatal(err)
	}
	consulWaitUntil(t, 5*time.Second, "the pin in the router's view", func() bool {
		b, err := r.Route(ctx, user)
		return err == nil && b.ID == "p1"
	})
	plain := base64.StdEncoding.EncodeToString([]byte("\x00" + user + "\x00" + dovecots["p1"].Users[user]))
	pop := dialConv(t, pop3s, clientTLS)
	pop.Expect("+OK")
	pop.Send("AUTH PLAIN " + plain + "\r\n")
	pop.Expect("+OK")
	sv := dialConv(t, sieves, clientTLS)
	sv.SieveResponse()
	sv.Send("AUTHENTICATE \"PLAIN\" \"" + plain + "\"\r\n")
	sv.Expect("OK")
	if got := len(srv.Sessions(user, "p1")); got != 2 {
		t.Fatalf("%d sessions of %s on p1, want POP3 and ManageSieve", got, user)
	}
	c := testenv.LMTPDial(t, lmtpAddr, "")
	if re, de := testenv.Deliver(t, c, strings.NewReader(testenv.Message("before the move", "x")), user); len(re)+len(de) != 0 {
		t.Fatalf("delivery: %v %v", re, de)
	}

	if err := r.Pin(ctx, user, "p2"); err != nil {
		t.Fatal(err)
	}
	pop.Expect("-ERR [SYS/TEMP] Your mailbox moved")
	evicted := time.Now()
	pop.ExpectClosed("")
	sv.Expect(`BYE (TRYLATER) "Your mailbox moved`)
	sv.ExpectClosed("")

	// The delivery waits for the move's hold, as a login does.
	if re, de := testenv.Deliver(t, c, strings.NewReader(testenv.Message("after the move", "x")), user); len(re)+len(de) != 0 {
		t.Fatalf("delivery after the move: %v %v", re, de)
	}
	if d := time.Since(evicted); d < hold-200*time.Millisecond {
		t.Errorf("delivered %v after the move, before its %v hold ended", d, hold)
	}
	count := func(id string) string {
		return strings.TrimSpace(dovecots[id].Doveadm(t, "mailbox", "status", "-u", user, "messages", "INBOX"))
	}
	if a, b := count("p1"), count("p2"); !strings.HasSuffix(a, "messages=1") || !strings.HasSuffix(b, "messages=1") {
		t.Errorf("p1 has %s, p2 has %s; want one message each (before and after the move)", a, b)
	}
	// The next POP3 login lands on the new backend and sees the new mail.
	pop = dialConv(t, pop3s, clientTLS)
	pop.Expect("+OK")
	pop.Send("AUTH PLAIN " + plain + "\r\nSTAT\r\n")
	pop.Expect("+OK")
	pop.Expect("+OK 1 ")
	if got := len(srv.Sessions(user, "p2")); got != 1 {
		t.Errorf("%d sessions on p2 after the move, want 1", got)
	}
}
