package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imapgate/imapgate/proxy"
	"github.com/imapgate/imapgate/routing"
)

const full = `
[log]
level = "debug"
format = "json"

[[listen]]
addr = "[::]:993"
name = "imaps"

[[listen]]
addr = "0.0.0.0:143"
mode = "starttls"
insecure_auth = ["10.1.0.0/16"]
proxy_protocol_from = ["10.9.0.0/24", "2001:db8::/32"]

[preauth]
greeting = "mail.example.org ready"
imap4rev2 = true
auth_mechanisms = ["PLAIN", "LOGIN", "XOAUTH2"]

[limits]
max_line_length = 4096
auth_failure_delay = "500ms"
ip_failure_burst = 5
ip_failure_refill = "1m"
user_failure_burst = -1

[timeouts]
preauth_idle = "30s"
backend_login = "5s"

[backends.d1]
addr = "10.0.0.1:143"
security = "starttls"
weight = 2
proxy_protocol = 2
insecure_skip_verify = true

[backends.d2]
addr = "10.0.0.2:993"
security = "tls"
server_name = "imap.internal"

[routing]
default = ["d1", "d2"]
[routing.users]
"Alice@Example.org" = "d2"
[routing.domains]
"Example.COM" = ["d1"]

[http]
addr = "127.0.0.1:9090"

[shutdown]
grace = "1m"
`

func TestParseFull(t *testing.T) {
	c, err := Parse(full)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	o, err := c.ProxyOptions()
	if err != nil {
		t.Fatal(err)
	}
	if o.Greeting != "mail.example.org ready" || !o.Capabilities.IMAP4rev2 || len(o.Capabilities.AuthMechanisms) != 3 {
		t.Errorf("pre-auth options = %+v", o.Capabilities)
	}
	if o.Limits.MaxLineLength != 4096 || o.Limits.AuthFailureDelay != 500*time.Millisecond ||
		o.Limits.IPFailures != (proxy.RateLimit{Burst: 5, Refill: time.Minute}) || o.Limits.UserFailures.Burst != -1 {
		t.Errorf("limits = %+v", o.Limits)
	}
	if o.Timeouts.PreAuthIdle != 30*time.Second || o.Timeouts.BackendLogin != 5*time.Second {
		t.Errorf("timeouts = %+v", o.Timeouts)
	}
	ls, err := c.Listeners()
	if err != nil {
		t.Fatal(err)
	}
	if len(ls) != 2 || ls[0].Listener.Mode != proxy.ImplicitTLS || ls[1].Listener.Mode != proxy.StartTLS ||
		len(ls[1].Listener.InsecureAuth) != 1 || len(ls[1].Listener.ProxyProtocolFrom) != 2 || ls[0].Listener.Name != "imaps" {
		t.Errorf("listeners = %+v", ls)
	}
	sc, err := c.StaticConfig()
	if err != nil {
		t.Fatal(err)
	}
	d1, d2 := sc.Backends["d1"], sc.Backends["d2"]
	if d1.Security != routing.SecurityStartTLS || d1.Weight != 2 || d1.ProxyProtocol != 2 || !d1.TLS.InsecureSkipVerify {
		t.Errorf("d1 = %+v", d1)
	}
	if d2.Security != routing.SecurityTLS || d2.TLS.ServerName != "imap.internal" || d2.TLS.InsecureSkipVerify {
		t.Errorf("d2 = %+v", d2)
	}
	if sc.Users["alice@example.org"] != "d2" || len(sc.Domains["example.com"]) != 1 {
		t.Errorf("pins and domains not normalized: %+v %+v", sc.Users, sc.Domains)
	}
}

func TestValidateErrors(t *testing.T) {
	base := "[[listen]]\naddr = \"127.0.0.1:993\"\n[backends.a]\naddr = \"127.0.0.1:143\"\n"
	for _, tt := range []struct {
		name, text, want string
	}{
		{"unknown key", base + "[limits]\nmax_lines = 3\n", "unknown keys: limits.max_lines"},
		{"no listeners", "[backends.a]\naddr = \"127.0.0.1:143\"\n", "no [[listen]]"},
		{"bad listen addr", "[[listen]]\naddr = \"993\"\n[backends.a]\naddr = \"127.0.0.1:143\"\n", "listen[0]"},
		{"insecure_auth on tls", "[[listen]]\naddr = \"127.0.0.1:993\"\ninsecure_auth = [\"10.0.0.0/8\"]\n[backends.a]\naddr = \"127.0.0.1:143\"\n", "starttls listener"},
		{"bad cidr", "[[listen]]\naddr = \"127.0.0.1:143\"\nmode = \"starttls\"\nproxy_protocol_from = [\"10.0.0.300/8\"]\n[backends.a]\naddr = \"127.0.0.1:143\"\n", "proxy_protocol_from"},
		{"unknown mechanism", base + "[preauth]\nauth_mechanisms = [\"CRAM-MD5\"]\n", "CRAM-MD5"},
		{"bad proxy protocol", base + "[backends.b]\naddr = \"127.0.0.1:144\"\nproxy_protocol = 3\n", "proxy_protocol"},
		{"pin to unknown backend", base + "[routing.users]\n\"x\" = \"zz\"\n", "zz"},
		// Defect: each load picked one of the two at random.
		{"duplicate pin after normalisation", base + "[backends.b]\naddr = \"127.0.0.1:144\"\n[routing.users]\n\"Alice@x\" = \"a\"\n\"alice@x\" = \"b\"\n", "same user \"alice@x\""},
		{"same pin twice after normalisation", base + "[routing.users]\n\"Alice@x\" = \"a\"\n\" alice@x\" = \"a\"\n", "same user"},
		{"duplicate domain after normalisation", base + "[backends.b]\naddr = \"127.0.0.1:144\"\n[routing.domains]\n\"X.example\" = [\"a\"]\n\"x.example\" = [\"b\"]\n", "same domain \"x.example\""},
		{"unknown router", base + "[routing]\nrouter = \"dns\"\n", "unknown router"},
		{"consul without service", base + "[routing]\nrouter = \"consul\"\n", "consul.service"},
		{"unknown users_watch", base + "[routing]\nrouter = \"consul\"\n[consul]\nservice = \"imap\"\nusers_watch = \"cache\"\n", "consul.users_watch"},
		{"master without verify", base + "[backend.master]\nuser = \"m\"\npassword = \"p\"\n", "verify"},
		{"master bad form", base + "[backend.master]\nuser = \"m\"\npassword = \"p\"\nform = \"x\"\nverify = \"backend\"\n", "form"},
		{"missing CA file", base + "[backend]\nca_file = \"/nonexistent/ca.pem\"\n", "CA file"},
		{"short lines", base + "[limits]\nmax_line_length = 100\n", "max_line_length"},
		{"bad duration", base + "[timeouts]\nlogin = \"soon\"\n", "timeouts.login"},
		{"exposed admin", base + "[http]\naddr = \"0.0.0.0:8080\"\n", "admin_token"},
		{"renewal ratio", base + "[tls.acme]\nnames = [\"a.example\"]\nrenewal_window_ratio = 1.5\n", "renewal_window_ratio"},
		{"bad log level", base + "[log]\nlevel = \"loud\"\n", "log.level"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse(tt.text)
			if err == nil {
				err = c.Validate()
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error = %v, want one mentioning %q", err, tt.want)
			}
		})
	}
}

func TestMasterFromFiles(t *testing.T) {
	dir := t.TempDir()
	pw := filepath.Join(dir, "master.pw")
	users := filepath.Join(dir, "users")
	os.WriteFile(pw, []byte("m4ster\n"), 0o600)
	os.WriteFile(users, []byte("alice:{PLAIN}a\n"), 0o600)
	c, err := Parse("[[listen]]\naddr = \"127.0.0.1:993\"\n[backends.a]\naddr = \"127.0.0.1:143\"\n[backend.master]\nuser = \"imapgate\"\npassword_file = \"" + pw + "\"\nform = \"separator\"\nverify = \"file\"\nverify_file = \"" + users + "\"\n")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	o, _ := c.ProxyOptions()
	m := o.Backend.Master
	if m == nil || m.Password != "m4ster" || m.Form != proxy.MasterSeparator || m.Verifier == nil {
		t.Fatalf("master = %+v", m)
	}
}
