package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-smtp"
	"github.com/imapgate/imapgate/internal/testenv"
	"github.com/imapgate/imapgate/routing"
)

// These tests deliver through imapgate's LMTP front end (lmtp.go,
// proxy/lmtp) to real Dovecots with dovecot-lmtpd, and read the mail back
// through imapgate's IMAP.

// lmtpEnv is two Dovecots (LMTP and IMAP) behind one imapgate.
type lmtpEnv struct {
	d1, d2   *testenv.Dovecot
	b1, b2   *routing.Backend
	h        *harness
	lmtpAddr string
	router   *commitRouter
}

// commitRouter records the placements the proxy commits.
type commitRouter struct {
	routing.Router
	mu       sync.Mutex
	commits  []string
	redirect map[string]*routing.Backend // users another instance placed elsewhere
}

func (c *commitRouter) Commit(_ context.Context, user string, b *routing.Backend) (*routing.Backend, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if o := c.redirect[user]; o != nil {
		return o, nil
	}
	c.commits = append(c.commits, user+"@"+b.ID)
	return b, nil
}

func (c *commitRouter) committed() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.commits...)
}

func dovecotLMTPBackend(id string, d *testenv.Dovecot) *routing.Backend {
	return &routing.Backend{ID: id, Addr: d.Addr, LMTPAddr: d.LMTPAddr, POP3Addr: d.POP3Addr, SieveAddr: d.SieveAddr}
}

// newLMTPEnv starts the Dovecots and imapgate: alice and bob live on d1,
// dave on d2.
func newLMTPEnv(t *testing.T, mod func(*Options)) *lmtpEnv {
	t.Helper()
	testenv.Need(t, "dovecot")
	opts := testenv.DovecotOptions{TrustedNetworks: "127.0.0.0/8", Protocols: []string{"lmtp"}}
	e := &lmtpEnv{d1: testenv.StartDovecot(t, opts), d2: testenv.StartDovecot(t, opts)}
	e.b1, e.b2 = dovecotLMTPBackend("d1", e.d1), dovecotLMTPBackend("d2", e.d2)
	st, err := routing.NewStatic(routing.StaticConfig{
		Backends: map[string]*routing.Backend{"d1": e.b1, "d2": e.b2},
		Users:    map[string]string{"alice@example.org": "d1", "bob@example.org": "d1", "dave@example.net": "d2"},
	})
	if err != nil {
		t.Fatal(err)
	}
	e.router = &commitRouter{Router: st}
	e.h = newHarness(t, e.router, mod)
	e.lmtpAddr = serveExtra(t, e.h, Listener{Protocol: routing.ProtocolLMTP, Mode: StartTLS})
	return e
}

// inbox logs in through imapgate and returns the subjects in INBOX.
func (e *lmtpEnv) inbox(t *testing.T, d *testenv.Dovecot, user string) []string {
	t.Helper()
	c, err := imapclient.DialTLS(e.h.tlsAddr, &imapclient.Options{TLSConfig: e.h.clientTLS})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Login(user, d.Users[user]).Wait(); err != nil {
		t.Fatalf("login %s: %v", user, err)
	}
	sel, err := c.Select("INBOX", nil).Wait()
	if err != nil {
		t.Fatal(err)
	}
	if sel.NumMessages == 0 {
		return nil
	}
	var all imap.SeqSet
	all.AddRange(1, sel.NumMessages)
	msgs, err := c.Fetch(all, &imap.FetchOptions{Envelope: true}).Collect()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range msgs {
		out = append(out, m.Envelope.Subject)
	}
	return out
}

// TestLMTPDeliveryAcrossBackends: one transaction to three recipients on
// two backends lands in each INBOX on its own backend, the client address
// reaches Dovecot through XCLIENT, and only accepted recipients are
// committed.
func TestLMTPDeliveryAcrossBackends(t *testing.T) {
	e := newLMTPEnv(t, nil)
	c := testenv.LMTPDial(t, e.lmtpAddr, "127.0.0.2")
	if size, ok := c.MaxMessageSize(); !ok || size != 64<<20 {
		t.Errorf("SIZE = %d, %v; want the 64 MiB default advertised", size, ok)
	}
	rcptErr, dataErr := testenv.Deliver(t, c, strings.NewReader(testenv.Message("three recipients", "hello")),
		"alice@example.org", "Bob@Example.org", "dave@example.net", "nobody@example.org")
	var se *smtp.SMTPError
	if err := rcptErr["nobody@example.org"]; !errors.As(err, &se) || se.Code != 550 {
		t.Errorf("unknown recipient: %v, want the backend's own 550", err)
	}
	delete(rcptErr, "nobody@example.org")
	if len(rcptErr) != 0 || len(dataErr) != 0 {
		t.Fatalf("RCPT errors %v, DATA errors %v; want none", rcptErr, dataErr)
	}
	// A second transaction on the same MTA connection reuses imapgate's
	// backend connections (one LMTP connection per backend in all).
	if re, de := testenv.Deliver(t, c, strings.NewReader(testenv.Message("second", "again")), "alice@example.org", "dave@example.net"); len(re)+len(de) != 0 {
		t.Fatalf("second transaction: %v %v", re, de)
	}
	if err := c.Quit(); err != nil {
		t.Errorf("QUIT: %v", err)
	}
	// What the deliveries committed, before the IMAP logins below commit
	// their own.
	delivered := strings.Join(e.router.committed(), " ")
	for _, u := range []struct {
		d    *testenv.Dovecot
		user string
		want string
	}{{e.d1, "alice@example.org", "three recipients second"}, {e.d1, "bob@example.org", "three recipients"}, {e.d2, "dave@example.net", "three recipients second"}} {
		if got := e.inbox(t, u.d, u.user); strings.Join(got, " ") != u.want {
			t.Errorf("%s's INBOX: %q, want %q", u.user, got, u.want)
		}
	}
	for name, d := range map[string]*testenv.Dovecot{"d1": e.d1, "d2": e.d2} {
		// testenv's readiness check, then imapgate's one connection.
		if n := strings.Count(d.Log(), "Info: Connect from"); n != 2 {
			t.Errorf("%s saw %d LMTP connections, want 2 (readiness check and imapgate's one)", name, n)
		}
	}
	// Nothing went to the wrong backend: dave has no mail on d1.
	if out := e.d1.Doveadm(t, "mailbox", "status", "-u", "dave@example.net", "messages", "INBOX"); !strings.Contains(out, "messages=0") {
		t.Errorf("dave on d1: %q, want no messages", out)
	}
	if want := "alice@example.org@d1 bob@example.org@d1 dave@example.net@d2 alice@example.org@d1 dave@example.net@d2"; delivered != want {
		t.Errorf("committed %q, want %q (never the unknown recipient)", delivered, want)
	}
	// Dovecot saw the MTA's address (127.0.0.2), not imapgate's.
	testenv.WaitFor(t, func() bool { return strings.Count(e.d1.Log(), "rip=127.0.0.2") >= 2 })
	if !strings.Contains(e.d2.Log(), "rip=127.0.0.2") {
		t.Errorf("d2's log does not show the XCLIENT address:\n%s", e.d2.Log())
	}
	// imapgate's trace field is in the delivered message.
	if out := e.d2.Doveadm(t, "fetch", "-u", "dave@example.net", "hdr", "mailbox", "INBOX"); !strings.Contains(out, "(imapgate) with LMTP") {
		t.Errorf("delivered header lacks imapgate's Received field:\n%s", out)
	}
}

// TestLMTPBackendDown: with one backend down its recipients get 4xx and
// the others are delivered; the MTA's retry succeeds once it is back.
func TestLMTPBackendDown(t *testing.T) {
	e := newLMTPEnv(t, nil)
	e.d2.Stop(t)
	c := testenv.LMTPDial(t, e.lmtpAddr, "")
	rcptErr, dataErr := testenv.Deliver(t, c, strings.NewReader(testenv.Message("while d2 is down", "x")), "alice@example.org", "dave@example.net")
	var se *smtp.SMTPError
	if err := rcptErr["dave@example.net"]; !errors.As(err, &se) || se.Code/100 != 4 {
		t.Fatalf("dave (backend down): %v, want a 4xx", err)
	}
	if rcptErr["alice@example.org"] != nil || dataErr["alice@example.org"] != nil {
		t.Fatalf("alice: %v %v, want delivered", rcptErr["alice@example.org"], dataErr["alice@example.org"])
	}
	e.d2.Start(t)
	rcptErr, dataErr = testenv.Deliver(t, c, strings.NewReader(testenv.Message("while d2 is down", "x")), "dave@example.net")
	if len(rcptErr)+len(dataErr) != 0 {
		t.Fatalf("retry: %v %v, want delivered", rcptErr, dataErr)
	}
	if got := e.inbox(t, e.d2, "dave@example.net"); len(got) != 1 {
		t.Errorf("dave's INBOX after the retry: %q, want one message", got)
	}
	if got := e.inbox(t, e.d1, "alice@example.org"); len(got) != 1 {
		t.Errorf("alice's INBOX: %q, want one message (not two)", got)
	}
}

// cutForwarder forwards to addr and cuts each connection once more than
// limit bytes went towards addr: a backend dying in the middle of DATA.
func cutForwarder(t *testing.T, addr string, limit int64) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b, err := net.Dial("tcp", addr)
			if err != nil {
				c.Close()
				continue
			}
			wg.Go(func() { io.CopyN(b, c, limit); b.Close(); c.Close() })
			wg.Go(func() { io.Copy(c, b); c.Close() })
		}
	})
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return ln.Addr().String()
}

// TestLMTPBackendDiesMidData: the recipients of a backend whose
// connection dies during the message get 4xx, the others 250, and the
// cut message is delivered nowhere.
func TestLMTPBackendDiesMidData(t *testing.T) {
	e := newLMTPEnv(t, nil)
	e.b2.LMTPAddr = cutForwarder(t, e.d2.LMTPAddr, 64<<10)
	c := testenv.LMTPDial(t, e.lmtpAddr, "")
	body := strings.Repeat("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\r\n", 4096) // 256 KiB
	rcptErr, dataErr := testenv.Deliver(t, c, strings.NewReader(testenv.Message("cut", body)), "alice@example.org", "dave@example.net")
	if len(rcptErr) != 0 {
		t.Fatalf("RCPT: %v", rcptErr)
	}
	if se := dataErr["dave@example.net"]; se == nil || se.Code/100 != 4 {
		t.Errorf("dave (backend died mid-DATA): %v, want a 4xx", se)
	}
	if se := dataErr["alice@example.org"]; se != nil {
		t.Errorf("alice: %v, want delivered", se)
	}
	if out := e.d2.Doveadm(t, "mailbox", "status", "-u", "dave@example.net", "messages", "INBOX"); !strings.Contains(out, "messages=0") {
		t.Errorf("dave's INBOX on d2: %q, want nothing from the cut transaction", out)
	}
}

// TestLMTPLargeMessageStreams: a 20 MiB message to two backends goes
// through with imapgate allocating a small fraction of it (it is
// streamed, never held whole).
func TestLMTPLargeMessageStreams(t *testing.T) {
	e := newLMTPEnv(t, nil)
	c := testenv.LMTPDial(t, e.lmtpAddr, "")
	const size = 20 << 20
	line := strings.Repeat("x", 998) + "\r\n"
	body := io.MultiReader(strings.NewReader(testenv.Message("big", "")), io.LimitReader(repeatReader(line), size))
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	rcptErr, dataErr := testenv.Deliver(t, c, body, "alice@example.org", "dave@example.net")
	runtime.ReadMemStats(&after)
	if len(rcptErr)+len(dataErr) != 0 {
		t.Fatalf("RCPT %v, DATA %v", rcptErr, dataErr)
	}
	// The whole process (imapgate and the test's client) allocated this
	// much while 2 x 20 MiB went through; holding the message once would
	// be 20 MiB.
	alloc := after.TotalAlloc - before.TotalAlloc
	t.Logf("allocated %d KiB for a %d MiB message to two backends", alloc>>10, size>>20)
	if alloc > 4<<20 {
		t.Errorf("allocated %d MiB while delivering a 20 MiB message: it is buffered, not streamed", alloc>>20)
	}
	for _, d := range []struct {
		d    *testenv.Dovecot
		user string
	}{{e.d1, "alice@example.org"}, {e.d2, "dave@example.net"}} {
		out := d.d.Doveadm(t, "fetch", "-u", d.user, "size.virtual", "mailbox", "INBOX")
		var n int
		fmt.Sscanf(strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(out), "size.virtual:")), "%d", &n)
		if n < size {
			t.Errorf("%s's message is %d bytes, want over %d (%q)", d.user, n, size, out)
		}
	}
}

type repeatReader string

func (r repeatReader) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		n += copy(p[n:], r)
	}
	return n, nil
}

// TestLMTPSizeLimit: a message over the advertised SIZE gets 552 and is
// delivered nowhere; a MAIL with a SIZE over it is refused at once.
func TestLMTPSizeLimit(t *testing.T) {
	e := newLMTPEnv(t, func(o *Options) { o.LMTP.MaxMessageBytes = 100 << 10 })
	c := testenv.LMTPDial(t, e.lmtpAddr, "")
	body := strings.Repeat(strings.Repeat("y", 998)+"\r\n", 200)
	_, dataErr := testenv.Deliver(t, c, strings.NewReader(testenv.Message("too big", body)), "alice@example.org")
	if se := dataErr["alice@example.org"]; se == nil || se.Code != 552 {
		t.Errorf("over SIZE: %v, want 552", se)
	}
	if err := c.Mail("s@example.com", &smtp.MailOptions{Size: 1 << 20}); err == nil {
		t.Errorf("MAIL SIZE=1MiB accepted over a 100 KiB limit")
	}
	c.Reset()
	_, dataErr = testenv.Deliver(t, c, strings.NewReader(testenv.Message("long line", strings.Repeat("z", 70<<10))), "alice@example.org")
	if se := dataErr["alice@example.org"]; se == nil || se.Code != 554 {
		t.Errorf("a 70 KiB line: %v, want 554", se)
	}
	if got := e.inbox(t, e.d1, "alice@example.org"); len(got) != 0 {
		t.Errorf("INBOX after refused messages: %q", got)
	}
}

// TestLMTPLoops: a backend whose LMTP address is imapgate itself is
// refused at once (4.4.6, no storm of connections), and a message that
// already went through too many hops gets 5.4.6.
func TestLMTPLoops(t *testing.T) {
	e := newLMTPEnv(t, nil)
	e.b2.LMTPAddr = e.lmtpAddr
	c := testenv.LMTPDial(t, e.lmtpAddr, "")
	rcptErr, _ := testenv.Deliver(t, c, strings.NewReader(testenv.Message("loop", "x")), "dave@example.net")
	var se *smtp.SMTPError
	if err := rcptErr["dave@example.net"]; !errors.As(err, &se) || se.Code != 451 || se.EnhancedCode != (smtp.EnhancedCode{4, 4, 6}) {
		t.Errorf("looping backend: %v, want 451 4.4.6", err)
	}
	var hdr strings.Builder
	for i := range 30 {
		fmt.Fprintf(&hdr, "Received: from hop%d by hop%d; Tue, 1 Dec 2026 12:00:00 +0000\r\n", i, i+1)
	}
	_, dataErr := testenv.Deliver(t, c, strings.NewReader(hdr.String()+testenv.Message("hops", "x")), "alice@example.org")
	if se := dataErr["alice@example.org"]; se == nil || se.Code != 554 || se.EnhancedCode != (smtp.EnhancedCode{5, 4, 6}) {
		t.Errorf("30 Received fields: %v, want 554 5.4.6", se)
	}
}

// TestLMTPAllowFrom: an MTA outside allow_from is refused with 554.
func TestLMTPAllowFrom(t *testing.T) {
	e := newLMTPEnv(t, nil)
	addr := serveExtra(t, e.h, Listener{Protocol: routing.ProtocolLMTP, Mode: StartTLS,
		AllowFrom: mustPrefixes(t, "127.0.0.2/32")})
	c := dialConv(t, addr, nil)
	c.Expect("554 5.7.1")
	c.ExpectClosed("* BYE")
	ok := testenv.LMTPDial(t, addr, "127.0.0.2")
	if err := ok.Noop(); err != nil {
		t.Errorf("NOOP from an allowed address: %v", err)
	}
}

// TestLMTPSwaks delivers with swaks, a real LMTP client.
func TestLMTPSwaks(t *testing.T) {
	testenv.Need(t, "swaks")
	e := newLMTPEnv(t, nil)
	out, err := exec.Command(testenv.Bin("swaks"), "--protocol", "LMTP", "--server", e.lmtpAddr,
		"--from", "s@example.com", "--to", "alice@example.org,dave@example.net",
		"--header", "Subject: from swaks", "--body", "hello").CombinedOutput()
	if err != nil {
		t.Fatalf("swaks: %v\n%s", err, out)
	}
	if n := strings.Count(string(out), "<-  250 2.0.0 <"); n < 2 {
		t.Errorf("swaks saw %d per-recipient 250s, want 2:\n%s", n, out)
	}
	if got := e.inbox(t, e.d2, "dave@example.net"); len(got) != 1 || got[0] != "from swaks" {
		t.Errorf("dave's INBOX: %q", got)
	}
}

func mustPrefixes(t *testing.T, ss ...string) []netip.Prefix {
	t.Helper()
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

// TestLMTPPostfix: Postfix, a real MTA, delivers to imapgate over LMTP
// (default_transport = lmtp:inet:...) and each recipient's mail lands on
// their own backend.
func TestLMTPPostfix(t *testing.T) {
	e := newLMTPEnv(t, nil)
	pf := testenv.StartPostfix(t, testenv.PostfixOptions{Transport: "lmtp:inet:" + e.lmtpAddr})
	pf.Sendmail(t, "sender@example.com", testenv.Message("via postfix", "hello"), "alice@example.org", "dave@example.net", "nobody@example.net")
	deadline := time.Now().Add(30 * time.Second)
	for strings.Count(pf.Log(), "status=sent") < 2 || !strings.Contains(pf.Log(), "nobody@example.net") {
		if time.Now().After(deadline) {
			t.Fatalf("Postfix did not deliver:\n%s", pf.Log())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if log := pf.Log(); !strings.Contains(log, "to=<nobody@example.net>") || !strings.Contains(log, "status=bounced") {
		t.Errorf("the unknown recipient was not bounced with the backend's 5xx:\n%s", log)
	}
	for _, u := range []struct {
		d    *testenv.Dovecot
		user string
	}{{e.d1, "alice@example.org"}, {e.d2, "dave@example.net"}} {
		if got := e.inbox(t, u.d, u.user); len(got) != 1 || got[0] != "via postfix" {
			t.Errorf("%s's INBOX: %q", u.user, got)
		}
	}
}

// TestLMTPShutdown: Shutdown tells an idle MTA connection 421 at once,
// lets a transaction under way finish with its replies, then returns.
func TestLMTPShutdown(t *testing.T) {
	e := newLMTPEnv(t, nil)
	idle := dialConv(t, e.lmtpAddr, nil)
	idle.Expect("220 ")
	idle.Send("LHLO mta\r\n")
	for !strings.HasPrefix(idle.Line(), "250 ") {
	}
	busy := testenv.LMTPDial(t, e.lmtpAddr, "")
	if err := busy.Mail("s@example.com", nil); err != nil {
		t.Fatal(err)
	}
	if err := busy.Rcpt("alice@example.org", nil); err != nil {
		t.Fatal(err)
	}
	w, err := busy.Data()
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(w, "Subject: during shutdown\r\n\r\nfirst half\r\n")
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		done <- e.h.srv.Shutdown(ctx)
	}()
	idle.Expect("421 4.3.2")
	idle.ExpectClosed("")
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned (%v) while a transaction was under way", err)
	case <-time.After(100 * time.Millisecond):
	}
	io.WriteString(w, "second half\r\n")
	if _, err := w.CloseWithLMTPResponse(); err != nil {
		t.Fatalf("the transaction under way: %v, want delivered", err)
	}
	if err := <-done; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	if out := e.d1.Doveadm(t, "mailbox", "status", "-u", "alice@example.org", "messages", "INBOX"); !strings.Contains(out, "messages=1") {
		t.Errorf("alice's INBOX: %q", out)
	}
}

// TestLMTPClientGoneMidData: an MTA that disconnects in the middle of
// the message gets nothing delivered anywhere.
func TestLMTPClientGoneMidData(t *testing.T) {
	e := newLMTPEnv(t, nil)
	c := dialConv(t, e.lmtpAddr, nil)
	c.Expect("220 ")
	c.Send("LHLO mta\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<dave@example.net>\r\nDATA\r\n")
	for !strings.HasPrefix(c.Line(), "354") {
	}
	c.Send("Subject: cut\r\n\r\n" + strings.Repeat("partial line of the body\r\n", 5000))
	c.C.Close()
	// The backends' transactions end without the final dot: wait until
	// both Dovecots saw their LMTP connection close, then look.
	testenv.WaitFor(t, func() bool {
		return strings.Count(e.d1.Log(), "lmtp(") >= 4 && strings.Count(e.d1.Log(), "Disconnect from") >= 2 &&
			strings.Count(e.d2.Log(), "Disconnect from") >= 2
	})
	for _, d := range []struct {
		d    *testenv.Dovecot
		user string
	}{{e.d1, "alice@example.org"}, {e.d2, "dave@example.net"}} {
		if out := d.d.Doveadm(t, "mailbox", "status", "-u", d.user, "messages", "INBOX"); !strings.Contains(out, "messages=0") {
			t.Errorf("%s got a message the MTA never finished: %q", d.user, out)
		}
	}
}

// TestLMTPTLS: implicit TLS and STARTTLS from the MTA.
func TestLMTPTLS(t *testing.T) {
	e := newLMTPEnv(t, nil)
	addr := serveExtra(t, e.h, Listener{Protocol: routing.ProtocolLMTP, Mode: ImplicitTLS})
	conn, err := tls.Dial("tcp", addr, e.h.clientTLS)
	if err != nil {
		t.Fatal(err)
	}
	c := smtp.NewClientLMTP(conn)
	defer c.Close()
	if re, de := testenv.Deliver(t, c, strings.NewReader(testenv.Message("over tls", "x")), "alice@example.org"); len(re)+len(de) != 0 {
		t.Fatalf("implicit TLS: %v %v", re, de)
	}
	// STARTTLS, with a command pipelined behind it in cleartext: it must
	// be dropped, not answered (CVE-2011-0411).
	cv := dialConv(t, e.lmtpAddr, nil)
	cv.Expect("220 ")
	cv.Send("LHLO mta\r\n")
	var caps []string
	for l := cv.Line(); ; l = cv.Line() {
		caps = append(caps, l)
		if strings.HasPrefix(l, "250 ") {
			break
		}
	}
	if !strings.Contains(strings.Join(caps, " "), "STARTTLS") {
		t.Fatalf("no STARTTLS offered: %q", caps)
	}
	cv.Send("STARTTLS\r\nMAIL FROM:<injected@example.com>\r\n")
	cv.Expect("220 ")
	cv.Handshake(e.h.clientTLS)
	cv.Send("LHLO mta\r\n")
	for l := cv.Line(); !strings.HasPrefix(l, "250 "); l = cv.Line() {
		if strings.Contains(l, "STARTTLS") {
			t.Errorf("STARTTLS still offered over TLS")
		}
	}
	cv.Send("RCPT TO:<alice@example.org>\r\n")
	cv.Expect("502") // no MAIL: the injected one was dropped
}

// TestLMTPBadInput: the bad-input classes on the LMTP front end end with
// a clear reply and a close, never a hang.
func TestLMTPBadInput(t *testing.T) {
	e := newLMTPEnv(t, nil)
	for _, tc := range []struct {
		name, send string
		want       []string
	}{
		{"long line", strings.Repeat("A", 70<<10) + "\r\n", []string{"500 5.4.0"}},
		{"IMAP", "a1 LOGIN alice pw\r\na2 LOGIN alice pw\r\na3 LOGIN alice pw\r\na4 LOGIN alice pw\r\n",
			[]string{"50", "50", "50", "50", "500 5.5.1 Too many errors"}},
		{"SMTP instead of LMTP", "EHLO mta\r\nHELO mta\r\n", []string{"500 5.5.1 This is a LMTP server", "500 5.5.1"}},
		{"RCPT before MAIL", "LHLO mta\r\nRCPT TO:<alice@example.org>\r\n", []string{"250", "502"}},
		{"NUL in LHLO", "LHLO m\x00ta\r\nMAIL FROM:<a@example.com>\r\n", []string{"501 5.5.2", "502"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dialConv(t, e.lmtpAddr, nil)
			c.Expect("220 ")
			c.Send(tc.send)
			for _, w := range tc.want {
				l := c.Line()
				for strings.HasPrefix(l, "250-") {
					l = c.Line()
				}
				if !strings.HasPrefix(l, w) {
					t.Fatalf("got %q, want %q", l, w)
				}
			}
			if tc.name == "long line" || tc.name == "IMAP" {
				c.ExpectClosed("")
			}
		})
	}
	if n := len(e.router.committed()); n != 0 {
		t.Errorf("bad input committed %d placements", n)
	}
}

// TestLMTPLostPlacementRace: a recipient whose placement went to another
// backend meanwhile gets 4xx and nothing on the backend that accepted
// its RCPT; the other recipients of that backend are still delivered.
func TestLMTPLostPlacementRace(t *testing.T) {
	e := newLMTPEnv(t, nil)
	e.router.mu.Lock()
	e.router.redirect = map[string]*routing.Backend{"bob@example.org": e.b2}
	e.router.mu.Unlock()
	c := testenv.LMTPDial(t, e.lmtpAddr, "")
	rcptErr, dataErr := testenv.Deliver(t, c, strings.NewReader(testenv.Message("race", "x")), "alice@example.org", "bob@example.org", "dave@example.net")
	var se *smtp.SMTPError
	if err := rcptErr["bob@example.org"]; !errors.As(err, &se) || se.Code != 451 {
		t.Errorf("bob (placed elsewhere meanwhile): %v, want 451", err)
	}
	if rcptErr["alice@example.org"] != nil || dataErr["alice@example.org"] != nil || rcptErr["dave@example.net"] != nil || dataErr["dave@example.net"] != nil {
		t.Errorf("alice and dave: %v %v, want delivered", rcptErr, dataErr)
	}
	for _, u := range []struct {
		d    *testenv.Dovecot
		user string
		want string
	}{{e.d1, "alice@example.org", "messages=1"}, {e.d1, "bob@example.org", "messages=0"}, {e.d2, "dave@example.net", "messages=1"}} {
		if out := u.d.Doveadm(t, "mailbox", "status", "-u", u.user, "messages", "INBOX"); !strings.Contains(out, u.want) {
			t.Errorf("%s: %q, want %s", u.user, out, u.want)
		}
	}
}

// TestLMTPBDAT: CHUNKING (BDAT) from the MTA is streamed the same way and
// answered per recipient.
func TestLMTPBDAT(t *testing.T) {
	e := newLMTPEnv(t, nil)
	c := dialConv(t, e.lmtpAddr, nil)
	c.Expect("220 ")
	c.Send("LHLO mta\r\n")
	for l := c.Line(); !strings.HasPrefix(l, "250 "); l = c.Line() {
	}
	msg := testenv.Message("chunked", "in two chunks")
	half := len(msg) / 2
	c.Send("MAIL FROM:<s@example.com>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<dave@example.net>\r\n")
	c.Expect("250")
	c.Expect("250")
	c.Expect("250")
	c.Send(fmt.Sprintf("BDAT %d\r\n%s", half, msg[:half]))
	c.Expect("250")
	c.Send(fmt.Sprintf("BDAT %d LAST\r\n%s", len(msg)-half, msg[half:]))
	c.Expect("250 2.0.0 <alice@example.org>")
	c.Expect("250 2.0.0 <dave@example.net>")
	if got := e.inbox(t, e.d2, "dave@example.net"); len(got) != 1 || got[0] != "chunked" {
		t.Errorf("dave's INBOX: %q", got)
	}
}
