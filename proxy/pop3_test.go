package proxy

import (
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/testenv"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap/zaptest"
)

// These tests run imapgate's POP3 front end (pop3.go) in front of a real
// Dovecot with dovecot-pop3d, with real clients: Python's poplib and
// fetchmail.

// protoEnv is imapgate with listeners of several protocols in front of
// Dovecots.
type protoEnv struct {
	srv       *Server
	ca        *testenv.TestCA
	clientTLS *tls.Config
	d         *testenv.Dovecot
	addrs     map[string]string // "imap", "pop3" (STLS), "pop3s", "sieve"
	h         *harness          // for serveExtra's WaitGroup
}

func newProtoEnv(t *testing.T, protocols []string, mod func(*Options)) *protoEnv {
	t.Helper()
	return newProtoEnvExtra(t, protocols, "", mod)
}

// newProtoEnvExtra is newProtoEnv with DovecotOptions.Extra.
func newProtoEnvExtra(t *testing.T, protocols []string, extra string, mod func(*Options)) *protoEnv {
	t.Helper()
	testenv.Need(t, "dovecot")
	d := testenv.StartDovecot(t, testenv.DovecotOptions{TrustedNetworks: "127.0.0.0/8", Protocols: protocols, Extra: extra})
	b := dovecotLMTPBackend("d1", d)
	srv, ca := newTestServer(t, fixedRouter(b), mod)
	e := &protoEnv{srv: srv, ca: ca, d: d, addrs: map[string]string{},
		clientTLS: &tls.Config{RootCAs: ca.Pool, ServerName: "localhost"}, h: &harness{srv: srv}}
	t.Cleanup(func() { srv.Close(); e.h.wg.Wait() })
	e.addrs["imap"] = serveExtra(t, e.h, Listener{Mode: ImplicitTLS})
	for _, p := range protocols {
		switch p {
		case "pop3":
			e.addrs["pop3"] = serveExtra(t, e.h, Listener{Protocol: routing.ProtocolPOP3, Mode: StartTLS})
			e.addrs["pop3s"] = serveExtra(t, e.h, Listener{Protocol: routing.ProtocolPOP3, Mode: ImplicitTLS})
		case "sieve":
			e.addrs["sieve"] = serveExtra(t, e.h, Listener{Protocol: routing.ProtocolSieve, Mode: StartTLS})
		}
	}
	return e
}

// poplibScript logs in with Python's poplib, lists and retrieves, and
// prints what it found.
const poplibScript = `
import poplib, ssl, sys
host, port, mode, cafile, user, pw = sys.argv[1:7]
ctx = ssl.create_default_context(cafile=cafile)
if mode == "tls":
    p = poplib.POP3_SSL(host, int(port), context=ctx, timeout=10)
else:
    p = poplib.POP3(host, int(port), timeout=10)
    caps = p.capa()
    assert "STLS" in caps, caps
    assert "USER" not in caps, caps
    p.stls(context=ctx)
caps = p.capa()
assert "USER" in caps and "STLS" not in caps, caps
p.user(user)
p.pass_(pw)
n, size = p.stat()
print("count", n)
for i in range(1, n + 1):
    resp, lines, octets = p.retr(i)
    print("subject", [l.decode() for l in lines if l.lower().startswith(b"subject:")][0])
p.quit()
`

func runPoplib(t *testing.T, e *protoEnv, mode, user string) string {
	t.Helper()
	testenv.Need(t, "python3")
	addr := e.addrs["pop3"]
	if mode == "tls" {
		addr = e.addrs["pop3s"]
	}
	host, port, _ := net.SplitHostPort(addr)
	cmd := exec.Command(testenv.Bin("python3"), "-c", poplibScript, host, port, mode, e.ca.CAFile, user, e.d.Users[user])
	// Python checks the certificate against the name it dialled.
	cmd.Args[3] = "localhost"
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("poplib (%s): %v\n%s", mode, err, out)
	}
	return string(out)
}

// TestPOP3Poplib: Python's poplib logs in over implicit TLS and over STLS
// and reads a message delivered to the backend.
func TestPOP3Poplib(t *testing.T) {
	e := newProtoEnv(t, []string{"pop3", "lmtp"}, nil)
	lmtpAddr := serveExtra(t, e.h, Listener{Protocol: routing.ProtocolLMTP, Mode: StartTLS})
	c := testenv.LMTPDial(t, lmtpAddr, "")
	if r, d := testenv.Deliver(t, c, strings.NewReader(testenv.Message("for pop3", "hi")), "alice@example.org"); len(r)+len(d) != 0 {
		t.Fatalf("delivery: %v %v", r, d)
	}
	for _, mode := range []string{"tls", "stls"} {
		out := runPoplib(t, e, mode, "alice@example.org")
		if !strings.Contains(out, "count 1") || !strings.Contains(out, "subject Subject: for pop3") {
			t.Errorf("poplib (%s) saw:\n%s", mode, out)
		}
	}
	if log := e.d.Log(); strings.Count(log, "pop3-login: Info: Login: user=<alice@example.org>") != 2 {
		t.Errorf("no POP3 login in Dovecot's log:\n%s", log)
	}
}

// TestPOP3Fetchmail: fetchmail over STLS downloads the message.
func TestPOP3Fetchmail(t *testing.T) {
	testenv.Need(t, "fetchmail")
	e := newProtoEnv(t, []string{"pop3", "lmtp"}, nil)
	lmtpAddr := serveExtra(t, e.h, Listener{Protocol: routing.ProtocolLMTP, Mode: StartTLS})
	c := testenv.LMTPDial(t, lmtpAddr, "")
	if r, d := testenv.Deliver(t, c, strings.NewReader(testenv.Message("for fetchmail", "hi")), "bob@example.org"); len(r)+len(d) != 0 {
		t.Fatalf("delivery: %v %v", r, d)
	}
	dir := t.TempDir()
	_, port, _ := net.SplitHostPort(e.addrs["pop3"])
	out := filepath.Join(dir, "mbox")
	rc := "poll localhost protocol POP3 port " + port + "\n" +
		"  user \"bob@example.org\" password \"" + e.d.Users["bob@example.org"] + "\"\n" +
		"  sslproto 'TLS1.2+' sslcertck sslcertfile \"" + e.ca.CAFile + "\"\n" +
		"  mda \"cat >> " + out + "\"\n"
	rcFile := filepath.Join(dir, "fetchmailrc")
	if err := os.WriteFile(rcFile, []byte(rc), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(testenv.Bin("fetchmail"), "-f", rcFile, "--nosyslog", "-v", "-k")
	cmd.Env = append(os.Environ(), "HOME="+dir, "FETCHMAILHOME="+dir)
	res, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("fetchmail: %v\n%s", err, res)
	}
	got, _ := os.ReadFile(out)
	if !strings.Contains(string(got), "Subject: for fetchmail") {
		t.Errorf("fetchmail delivered %q\n%s", got, res)
	}
	if !strings.Contains(string(res), "STLS") {
		t.Errorf("fetchmail did not use STLS:\n%s", res)
	}
}

// TestPOP3Conversation: the pre-auth dialogue, AUTH forms, the bad-input
// classes, and an eviction closing a logged-in POP3 session.
func TestPOP3Conversation(t *testing.T) {
	e := newProtoEnv(t, []string{"pop3"}, func(o *Options) { o.Limits.MaxBadCommands = 3 })
	pass := e.d.Users["alice@example.org"]
	plain := base64.StdEncoding.EncodeToString([]byte("\x00alice@example.org\x00" + pass))

	t.Run("cleartext refuses credentials until STLS", func(t *testing.T) {
		c := dialConv(t, e.addrs["pop3"], nil)
		c.Expect("+OK imapgate ready.")
		c.Send("USER alice@example.org\r\n")
		c.Expect("-ERR [AUTH] Use STLS")
		c.Send("CAPA\r\n")
		c.Expect("+OK")
		caps := strings.Join(capaLines(c), " ")
		if !strings.Contains(caps, "STLS") || strings.Contains(caps, "USER") || strings.Contains(caps, "SASL") {
			t.Errorf("cleartext CAPA %q", caps)
		}
		// Injection after STLS: the pipelined command must be dropped.
		c.Send("STLS\r\nUSER injected\r\n")
		c.Expect("+OK Begin TLS")
		c.Handshake(e.clientTLS)
		c.Send("PASS x\r\n")
		c.Expect("-ERR USER first")
		c.Send("AUTH PLAIN " + plain + "\r\n")
		c.Expect("+OK")
		c.Send("STAT\r\n")
		c.Expect("+OK 0 0")
		c.Send("QUIT\r\n")
		c.Expect("+OK")
	})
	t.Run("AUTH PLAIN with a continuation, LOGIN, cancel", func(t *testing.T) {
		c := dialConv(t, e.addrs["pop3s"], e.clientTLS)
		c.Expect("+OK")
		c.Send("AUTH PLAIN\r\n")
		c.Expect("+ ")
		c.Send("*\r\n")
		c.Expect("-ERR Authentication cancelled")
		c.Send("AUTH LOGIN\r\n")
		c.Expect("+ VXNlcm5hbWU6")
		c.Send(base64.StdEncoding.EncodeToString([]byte("alice@example.org")) + "\r\n")
		c.Expect("+ UGFzc3dvcmQ6")
		c.Send(base64.StdEncoding.EncodeToString([]byte(pass)) + "\r\n")
		c.Expect("+OK")
		c.Send("QUIT\r\n")
		c.Expect("+OK")
	})
	for _, tc := range []struct{ name, send, want string }{
		{"long line", strings.Repeat("A", 10<<10) + "\r\n", "-ERR Line too long"},
		{"NUL", "USER a\x00b\r\n", "-ERR NUL"},
		{"IMAP on the POP3 port", "a1 LOGIN alice pass\r\n", "-ERR This is a POP3 server"},
		{"SMTP on the POP3 port", "EHLO x\r\n", "-ERR This is a POP3 server"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dialConv(t, e.addrs["pop3s"], e.clientTLS)
			c.Expect("+OK")
			c.Send(tc.send)
			c.Expect(tc.want)
			c.ExpectClosed("* BYE")
		})
	}
	t.Run("TLS on the cleartext port", func(t *testing.T) {
		c := dialConv(t, e.addrs["pop3"], nil)
		c.Expect("+OK")
		c.Send("\x16\x03\x01\x00\x05hello")
		c.Expect("-ERR This port speaks cleartext POP3")
		c.ExpectClosed("* BYE")
	})
	t.Run("too many bad commands", func(t *testing.T) {
		c := dialConv(t, e.addrs["pop3s"], e.clientTLS)
		c.Expect("+OK")
		c.Send("NOOP\r\nRETR 1\r\nLIST\r\n")
		c.Expect("-ERR")
		c.Expect("-ERR")
		c.Expect("-ERR")
		c.ExpectClosed("* BYE")
	})
	t.Run("XCLIENT gives Dovecot the client's address", func(t *testing.T) {
		c := testenv.DialConvFrom(t, e.addrs["pop3s"], net.ParseIP("127.0.0.3"), e.clientTLS)
		c.Expect("+OK")
		c.Send("AUTH PLAIN " + plain + "\r\n")
		c.Expect("+OK")
		c.Send("QUIT\r\n")
		c.Expect("+OK")
		if log := e.d.Log(); !strings.Contains(log, "rip=127.0.0.3") {
			t.Errorf("Dovecot did not see the client address 127.0.0.3:\n%s", log)
		}
	})
	t.Run("eviction closes the session", func(t *testing.T) {
		c := dialConv(t, e.addrs["pop3s"], e.clientTLS)
		c.Expect("+OK")
		c.Send("AUTH PLAIN " + plain + "\r\n")
		c.Expect("+OK")
		testenv.WaitFor(t, func() bool { return len(e.srv.Sessions("alice@example.org", "")) == 1 })
		if n := e.srv.EvictUser("alice@example.org", ""); n != 1 {
			t.Fatalf("EvictUser closed %d sessions, want 1", n)
		}
		c.Expect("-ERR [SYS/TEMP] Your mailbox moved")
		c.ExpectClosed("")
	})
	// Last: Dovecot penalises this client address for a while after it.
	t.Run("wrong password", func(t *testing.T) {
		c := dialConv(t, e.addrs["pop3s"], e.clientTLS)
		c.Expect("+OK")
		c.Send("USER alice@example.org\r\nPASS wrong\r\n")
		c.Expect("+OK")
		c.Expect("-ERR [AUTH] Authentication failed.")
	})
}

// TestPOP3SharesFailureLimits: a password guessed over POP3 counts in
// the same per-user bucket as IMAP logins.
func TestPOP3SharesFailureLimits(t *testing.T) {
	// The per-network bucket is the one that refuses (the per-user one
	// only slows logins down, limits.go): a wrong password over POP3
	// empties it for IMAP too.
	e := newProtoEnv(t, []string{"pop3"}, func(o *Options) {
		o.Limits.IPFailures = RateLimit{Burst: 1, Refill: time.Hour}
	})
	c := dialConv(t, e.addrs["pop3s"], e.clientTLS)
	c.Expect("+OK")
	c.Send("USER bob@example.org\r\nPASS wrong\r\n")
	c.Expect("+OK")
	c.Expect("-ERR [AUTH]")
	im := dialConv(t, e.addrs["imap"], e.clientTLS)
	im.Expect("* OK")
	im.Send("a LOGIN alice@example.org \"" + e.d.Users["alice@example.org"] + "\"\r\n")
	im.Expect("a NO [LIMIT]")
}

func capaLines(c *conv) []string {
	var out []string
	for {
		l := c.Line()
		if l == "." {
			return out
		}
		out = append(out, l)
	}
}

// TestPOP3OAuth: XOAUTH2 and OAUTHBEARER over POP3 are routed by the
// identity inside and relayed to Dovecot's oauth2 passdb, its error
// challenge included.
func TestPOP3OAuth(t *testing.T) {
	testenv.Need(t, "dovecot")
	url := oauthServer(t, map[string]string{"good-token": "alice@example.org"})
	dir := readableDir(t)
	conf := filepath.Join(dir, "oauth2.conf.ext")
	os.WriteFile(conf, []byte(fmt.Sprintf("introspection_mode = post\nintrospection_url = %s\nusername_attribute = username\nactive_attribute = active\nactive_value = true\n", url)), 0o644)
	d := testenv.StartDovecot(t, testenv.DovecotOptions{TrustedNetworks: "127.0.0.0/8", Protocols: []string{"pop3"}, Extra: fmt.Sprintf(`
auth_mechanisms = plain login xoauth2 oauthbearer
passdb {
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = %s
}
`, conf)})
	ca := testenv.NewTestCA(t)
	srv, err := NewServer(Options{Router: fixedRouter(dovecotLMTPBackend("d1", d)), Logger: zaptest.NewLogger(t),
		TLS:          &tls.Config{Certificates: []tls.Certificate{ca.ServerCert}},
		Capabilities: CapabilityOptions{AuthMechanisms: []string{"PLAIN", "XOAUTH2", "OAUTHBEARER"}},
		Limits:       Limits{AuthFailureDelay: -1}})
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{srv: srv}
	t.Cleanup(func() { srv.Close(); h.wg.Wait() })
	addr := serveExtra(t, h, Listener{Protocol: routing.ProtocolPOP3, Mode: ImplicitTLS})
	clientTLS := &tls.Config{RootCAs: ca.Pool, ServerName: "localhost"}
	xo := b64("user=alice@example.org\x01auth=Bearer good-token\x01\x01")
	ob := b64("n,a=alice@example.org,\x01host=localhost\x01port=995\x01auth=Bearer bad-token\x01\x01")
	c := dialConv(t, addr, clientTLS)
	c.Expect("+OK")
	c.Send("CAPA\r\n")
	c.Expect("+OK")
	if caps := strings.Join(capaLines(c), " "); !strings.Contains(caps, "SASL PLAIN XOAUTH2 OAUTHBEARER") {
		t.Errorf("CAPA %q", caps)
	}
	c.Send("AUTH XOAUTH2 " + xo + "\r\n")
	c.Expect("+OK")
	c.Send("STAT\r\n")
	c.Expect("+OK 0 0")

	c = dialConv(t, addr, clientTLS)
	c.Expect("+OK")
	c.Send("AUTH OAUTHBEARER\r\n")
	c.Expect("+ ")
	c.Send(ob + "\r\n")
	if l := c.Line(); !strings.HasPrefix(l, "+ ") || len(l) < 10 {
		t.Fatalf("got %q, want the backend's error challenge", l)
	}
	c.Send("AQ==\r\n")
	c.Expect("-ERR [AUTH]")
}

// TestMasterUserPOP3AndSieve: with a master login configured, POP3 and
// ManageSieve log in to Dovecot as the master user for the client, once
// its password is verified.
func TestMasterUserPOP3AndSieve(t *testing.T) {
	testenv.Need(t, "dovecot")
	dir := readableDir(t)
	masters := filepath.Join(dir, "masters")
	os.WriteFile(masters, []byte("imapgate:{PLAIN}master-secret\n"), 0o644)
	e := newProtoEnvExtra(t, []string{"pop3", "sieve"}, fmt.Sprintf(`
auth_master_user_separator = *
passdb {
  driver = passwd-file
  master = yes
  args = %s
}
`, masters), func(o *Options) {
		o.Backend.Master = &MasterLogin{User: "imapgate", Password: "master-secret", Verifier: fixedVerifier{"alice@example.org": "client-side-secret"}}
	})
	const masterLine = "Master user logging in as alice@example.org"
	plain := base64.StdEncoding.EncodeToString([]byte("\x00alice@example.org\x00client-side-secret"))
	c := dialConv(t, e.addrs["pop3s"], e.clientTLS)
	c.Expect("+OK")
	c.Send("USER alice@example.org\r\nPASS wrong\r\n")
	c.Expect("+OK")
	c.Expect("-ERR [AUTH]")
	c.Send("AUTH PLAIN " + plain + "\r\nSTAT\r\n")
	c.Expect("+OK")
	c.Expect("+OK 0 0")
	s := dialConv(t, e.addrs["sieve"], nil)
	s.SieveStartTLS(e.clientTLS)
	s.Send("AUTHENTICATE \"PLAIN\" \"" + plain + "\"\r\nLISTSCRIPTS\r\n")
	s.Expect("OK")
	if _, st := s.SieveResponse(); !strings.HasPrefix(st, "OK") {
		t.Fatalf("LISTSCRIPTS as master: %q", st)
	}
	testenv.WaitFor(t, func() bool { return strings.Count(e.d.Log(), masterLine) == 2 })
}
