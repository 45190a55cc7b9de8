package config

import (
	"strings"
	"testing"

	"github.com/imapgate/imapgate/proxy"
	"github.com/imapgate/imapgate/routing"
)

const protocolsConf = `
[[listen]]
addr = "[::]:993"

[[listen]]
addr = "[::]:995"
protocol = "pop3"

[[listen]]
addr = "[::]:4190"
protocol = "sieve"
mode = "starttls"

[[listen]]
addr = "10.0.0.9:24"
protocol = "lmtp"
allow_from = ["10.0.5.0/24"]

[lmtp]
hostname = "gate.example.org"
max_message_size = 1048576
hop_limit = 10
recipient_delimiter = "+"

[backends.d1]
addr = "10.0.0.1:143"
pop3_addr = "10.0.0.1:110"
sieve_addr = "10.0.0.1:4190"
lmtp_addr = "10.0.0.1:24"
lmtp_security = "starttls"
`

func TestProtocolKeys(t *testing.T) {
	c, err := Parse(protocolsConf)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	ls, err := c.Listeners()
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		p    routing.Protocol
		mode proxy.ListenMode
	}{{routing.ProtocolIMAP, proxy.ImplicitTLS}, {routing.ProtocolPOP3, proxy.ImplicitTLS},
		{routing.ProtocolSieve, proxy.StartTLS}, {routing.ProtocolLMTP, proxy.StartTLS}}
	for i, w := range want {
		if l := ls[i].Listener; l.Protocol != w.p || l.Mode != w.mode {
			t.Errorf("listen[%d] = %v %v, want %v %v", i, l.Protocol, l.Mode, w.p, w.mode)
		}
	}
	if a := ls[3].Listener.AllowFrom; len(a) != 1 || a[0].String() != "10.0.5.0/24" {
		t.Errorf("allow_from = %v", a)
	}
	o, err := c.ProxyOptions()
	if err != nil {
		t.Fatal(err)
	}
	if o.LMTP.Hostname != "gate.example.org" || o.LMTP.MaxMessageBytes != 1<<20 || o.LMTP.HopLimit != 10 || o.LMTP.RecipientDelimiter != "+" {
		t.Errorf("LMTP options %+v", o.LMTP)
	}
	sc, err := c.StaticConfig()
	if err != nil {
		t.Fatal(err)
	}
	b := sc.Backends["d1"]
	if b.POP3Addr != "10.0.0.1:110" || b.SieveAddr != "10.0.0.1:4190" || b.LMTPAddr != "10.0.0.1:24" || b.LMTPSecurity != routing.SecurityStartTLS {
		t.Errorf("backend %+v", b)
	}
}

func TestProtocolKeyErrors(t *testing.T) {
	for _, tc := range []struct{ conf, want string }{
		{"[[listen]]\naddr = \":1\"\nprotocol = \"smtp\"\n", "unknown protocol"},
		{"[[listen]]\naddr = \":1\"\nallow_from = [\"10.0.0.0/8\"]\n", "allow_from is only for"},
		{"[[listen]]\naddr = \":1\"\nprotocol = \"lmtp\"\nproxy_protocol_from = [\"10.0.0.0/8\"]\n", "not supported on an lmtp"},
		{"[[listen]]\naddr = \":1\"\n[backends.a]\naddr = \"h:1\"\nlmtp_addr = \"nohost\"\n", "lmtp_addr"},
	} {
		c, err := Parse(tc.conf)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want an error with %q", tc.conf, err, tc.want)
		}
	}
}
