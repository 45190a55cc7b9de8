package proxy

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imapgate/imapgate/internal/testenv"
	"github.com/imapgate/imapgate/routing"
)

// These tests check, against a real Dovecot, every way imapgate carries a
// login and the client's address to the backend.

// lbConv dials imapgate's STARTTLS listener as a load balancer that says,
// with a PROXY header, that the client is at client.
func lbConv(t *testing.T, h *harness, client string) *conv {
	c := dialConv(t, h.startTLSAddr, nil)
	c.Send(string(proxyV2(t, client, "192.0.2.1:143")))
	c.Expect("* OK")
	return c
}

func lbListener() Listener {
	loop := netip.MustParsePrefix("127.0.0.0/8")
	return Listener{Mode: StartTLS, ProxyProtocolFrom: []netip.Prefix{loop}, InsecureAuth: []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24")}}
}

func TestDovecotSeesClientAddressViaID(t *testing.T) {
	d := startDovecot(t) // login_trusted_networks = 127.0.0.0/8
	h := newHarnessListeners(t, fixedRouter(dovecotBackend(d, routing.SecurityNone)), nil, lbListener())
	c := lbConv(t, h, "203.0.113.8:40123")
	c.Send("a LOGIN alice@example.org " + d.Users["alice@example.org"] + "\r\n")
	c.Expect("a OK")
	d.WaitLog(t, "Login: user=<alice@example.org>", "rip=203.0.113.8")
}

func TestDovecotSeesClientAddressViaProxyProtocol(t *testing.T) {
	testenv.Need(t, "dovecot")
	port := testenv.FreePort(t)
	d := testenv.StartDovecot(t, testenv.DovecotOptions{Extra: fmt.Sprintf(`
haproxy_trusted_networks = 127.0.0.0/8
service imap-login {
  inet_listener imap_haproxy {
    address = 127.0.0.1
    port = %d
    haproxy = yes
  }
}
`, port)})
	// Dovecot now sees a remote client, so it wants TLS before login.
	b := &routing.Backend{ID: "dovecot-pp", Addr: fmt.Sprintf("127.0.0.1:%d", port), ProxyProtocol: 2,
		Security: routing.SecurityStartTLS, TLS: &tls.Config{RootCAs: d.CA.Pool, ServerName: "localhost"}}
	h := newHarnessListeners(t, fixedRouter(b), func(o *Options) { o.Backend.NoForwardID = true }, lbListener())
	c := lbConv(t, h, "203.0.113.9:40124")
	c.Send("a LOGIN bob@example.org \"" + d.Users["bob@example.org"] + "\"\r\n")
	c.Expect("a OK")
	d.WaitLog(t, "Login: user=<bob@example.org>", "rip=203.0.113.9")
	who := d.Doveadm(t, "who", "-1")
	if !strings.Contains(who, "203.0.113.9") {
		t.Errorf("doveadm who does not show the client's address:\n%s", who)
	}
}

// oauthServer is a token-introspection endpoint (RFC 7662) for Dovecot's
// oauth2 passdb: tokens maps a token to its user.
func oauthServer(t *testing.T, tokens map[string]string) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.ParseForm()
		tok := r.Form.Get("token")
		if tok == "" {
			tok = strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		}
		user, ok := tokens[tok]
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"active": ok, "username": user})
	})}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ln)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return "http://" + ln.Addr().String() + "/introspect"
}

func TestDovecotOAuth(t *testing.T) {
	testenv.Need(t, "dovecot")
	url := oauthServer(t, map[string]string{"good-token": "alice@example.org"})
	dir := readableDir(t)
	conf := filepath.Join(dir, "oauth2.conf.ext")
	os.WriteFile(conf, []byte(fmt.Sprintf("introspection_mode = post\nintrospection_url = %s\nusername_attribute = username\nactive_attribute = active\nactive_value = true\n", url)), 0o644)
	d := testenv.StartDovecot(t, testenv.DovecotOptions{TrustedNetworks: "127.0.0.0/8", Extra: fmt.Sprintf(`
auth_mechanisms = plain login xoauth2 oauthbearer
passdb {
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = %s
}
`, conf)})
	h := newHarness(t, fixedRouter(dovecotBackend(d, routing.SecurityNone)), func(o *Options) {
		o.Capabilities.AuthMechanisms = []string{"PLAIN", "XOAUTH2", "OAUTHBEARER"}
	})
	xo := func(user, tok string) string { return b64("user=" + user + "\x01auth=Bearer " + tok + "\x01\x01") }
	ob := func(user, tok string) string {
		return b64("n,a=" + user + ",\x01host=localhost\x01port=993\x01auth=Bearer " + tok + "\x01\x01")
	}
	for _, tt := range []struct {
		name string
		mech string
		resp string
		ir   bool
		ok   bool
	}{
		{"xoauth2 ok sasl-ir", "XOAUTH2", xo("alice@example.org", "good-token"), true, true},
		{"xoauth2 ok continuation", "XOAUTH2", xo("alice@example.org", "good-token"), false, true},
		{"oauthbearer ok", "OAUTHBEARER", ob("alice@example.org", "good-token"), true, true},
		{"xoauth2 bad token", "XOAUTH2", xo("alice@example.org", "bad-token"), true, false},
		{"oauthbearer bad token", "OAUTHBEARER", ob("alice@example.org", "bad-token"), false, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := dialConv(t, h.tlsAddr, h.clientTLS)
			g := c.Expect("* OK")
			if !strings.Contains(g, "AUTH="+tt.mech) {
				t.Fatalf("greeting %q lacks AUTH=%s", g, tt.mech)
			}
			if tt.ir {
				c.Send("a AUTHENTICATE " + tt.mech + " " + tt.resp + "\r\n")
			} else {
				c.Send("a AUTHENTICATE " + tt.mech + "\r\n")
				c.Expect("+")
				c.Send(tt.resp + "\r\n")
			}
			if tt.ok {
				c.Expect("a OK [CAPABILITY")
				c.Send("b SELECT INBOX\r\n")
				if l, _ := c.Tagged("b"); !strings.HasPrefix(l, "b OK") {
					t.Fatalf("SELECT after OAuth login: %q", l)
				}
				return
			}
			// The backend's error challenge reaches the client, whose
			// (empty or %x01) answer goes back before the NO.
			l := c.Line()
			if !strings.HasPrefix(l, "+ ") || len(l) < 10 {
				t.Fatalf("got %q, want the backend's error challenge", l)
			}
			c.Send("AQ==\r\n")
			c.Expect("a NO")
			c.Send("z NOOP\r\n")
			c.Expect("z OK")
		})
	}
}

func TestDovecotMasterUser(t *testing.T) {
	testenv.Need(t, "dovecot")
	dir := readableDir(t)
	masters := filepath.Join(dir, "masters")
	os.WriteFile(masters, []byte("imapgate:{PLAIN}master-secret\n"), 0o644)
	d := testenv.StartDovecot(t, testenv.DovecotOptions{TrustedNetworks: "127.0.0.0/8", Extra: fmt.Sprintf(`
auth_master_user_separator = *
passdb {
  driver = passwd-file
  master = yes
  args = %s
}
`, masters)})
	clientPass := d.Users["alice@example.org"]
	for _, tt := range []struct {
		name     string
		form     MasterForm
		verifier PasswordVerifier
	}{
		{"authzid, own verifier", MasterAuthzid, fixedVerifier{"alice@example.org": "client-side-secret"}},
		{"separator, own verifier", MasterSeparator, fixedVerifier{"alice@example.org": "client-side-secret"}},
		{"authzid, verified on backend", MasterAuthzid, VerifyOnBackend},
	} {
		t.Run(tt.name, func(t *testing.T) {
			pass := "client-side-secret"
			if tt.verifier == VerifyOnBackend {
				pass = clientPass
			}
			h := newHarness(t, fixedRouter(dovecotBackend(d, routing.SecurityNone)), func(o *Options) {
				o.Backend.Master = &MasterLogin{User: "imapgate", Password: "master-secret", Form: tt.form, Verifier: tt.verifier}
			})
			const masterLine = "Master user logging in as alice@example.org"
			before := strings.Count(d.Log(), masterLine)
			c := dialConv(t, h.tlsAddr, h.clientTLS)
			c.Expect("* OK")
			c.Send("a LOGIN alice@example.org wrong-password\r\n")
			c.Expect("a NO [AUTHENTICATIONFAILED]")
			c.Send(`b LOGIN alice@example.org "` + pass + `"` + "\r\n")
			c.Expect("b OK [CAPABILITY")
			c.Send("c SELECT INBOX\r\n")
			if l, _ := c.Tagged("c"); !strings.HasPrefix(l, "c OK") {
				t.Fatalf("SELECT as master: %q", l)
			}
			if n := strings.Count(d.Log(), masterLine); n != before+1 {
				t.Errorf("Dovecot logged %d master logins for this session, want 1", n-before)
			}
		})
	}
}

// readableDir is a temporary directory Dovecot's unprivileged auth
// process can read (t.TempDir's parent is private to root).
func readableDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "imapgate-dovecot-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}
