package config

import (
	"net"
	"testing"
	"time"

	igtls "github.com/imapgate/imapgate/tls"
)

func TestConsulMapping(t *testing.T) {
	c, err := Parse(`
[[listen]]
addr = "127.0.0.1:993"
[[listen]]
addr = "127.0.0.1:143"
mode = "starttls"
[[listen]]
addr = "127.0.0.1:1993"
name = "second-imaps"
[[listen]]
addr = "127.0.0.1:4190"
protocol = "sieve"
mode = "starttls"
[routing]
router = "consul"
[consul]
address = "127.0.0.1:8500"
service = "imap"
grace = "3s"
move_hold = "2s"
place_rate = 7
[consul.register]
enable = true
tags = ["a"]
`)
	if err != nil {
		t.Fatal(err)
	}
	cc, err := c.ConsulRouter()
	if err != nil {
		t.Fatal(err)
	}
	if cc.Address != "127.0.0.1:8500" || cc.Service != "imap" || cc.Grace != 3*time.Second || cc.MoveHold != 2*time.Second || cc.PlaceRate != 7 {
		t.Errorf("ConsulRouter = %+v", cc)
	}
	specs, err := c.Listeners()
	if err != nil {
		t.Fatal(err)
	}
	bound := []net.Addr{&net.TCPAddr{Port: 1}, &net.TCPAddr{Port: 2}, &net.TCPAddr{Port: 3}, &net.TCPAddr{Port: 4}}
	reg, ok := c.Registration(specs, bound, &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 8080})
	if !ok {
		t.Fatal("registration off")
	}
	want := map[string]int{"imaps": 1, "imap": 2, "second-imaps": 3, "sieve": 4}
	for k, v := range want {
		if reg.Ports[k] != v {
			t.Errorf("port %s = %d, want %d (%v)", k, reg.Ports[k], v, reg.Ports)
		}
	}
	if reg.Name != "imapgate" || reg.ID == "" || reg.CheckHTTP != "http://127.0.0.1:8080/readyz" || len(reg.Tags) != 1 {
		t.Errorf("registration defaults: %+v", reg)
	}
	c.Consul.Register.Enable = false
	if _, ok := c.Registration(specs, bound, nil); ok {
		t.Error("registration on with enable = false")
	}
}

func TestTLSMapping(t *testing.T) {
	c, err := Parse(`
[consul]
address = "127.0.0.1:8500"
token = "t"
[tls]
min_version = "1.3"
[[tls.certificates]]
cert = "c.pem"
key = "k.pem"
[tls.acme]
names = ["mail.example"]
storage = "consul"
consul_prefix = "p"
`)
	if err != nil {
		t.Fatal(err)
	}
	o := c.TLSOptions()
	if o.MinVersion != "1.3" || len(o.Certificates) != 1 || o.Certificates[0].CertFile != "c.pem" {
		t.Errorf("TLSOptions: %+v", o)
	}
	if a := o.ACME; len(a.Names) != 1 || a.Storage.Kind != igtls.StorageConsul || a.Storage.Consul.Address != "127.0.0.1:8500" || a.Storage.Consul.Prefix != "p" || a.Storage.Consul.Token != "t" {
		t.Errorf("ACME: %+v", a)
	}
	c.TLS.ACME.Names = nil
	if c.TLS.UsesACME() || len(c.TLSOptions().ACME.Names) != 0 {
		t.Error("ACME without names or on-demand")
	}
}

func TestTicketKeysStore(t *testing.T) {
	for _, tc := range []struct {
		text string
		want TicketStore
		auto bool
	}{
		{"", TicketsOff, true},
		{"[tls.session_tickets]\nfile = \"/x\"\n", TicketsFile, true},
		{"[routing]\nrouter = \"consul\"\n", TicketsConsul, true},
		{"[tls.acme]\nstorage = \"consul\"\n", TicketsConsul, true},
		{"[routing]\nrouter = \"consul\"\n[tls.session_tickets]\nstore = \"off\"\n", TicketsOff, false},
		{"[tls.session_tickets]\nstore = \"file\"\nfile = \"/x\"\n", TicketsFile, false},
	} {
		c, err := Parse(tc.text)
		if err != nil {
			t.Fatal(err)
		}
		cfg, store, auto, err := c.TicketKeys()
		if err != nil || store != tc.want || auto != tc.auto || (store != TicketsOff) != (cfg.Store != nil) {
			t.Errorf("%q: store %v auto %v (%v, %v), want %v auto %v", tc.text, store, auto, cfg.Store, err, tc.want, tc.auto)
		}
	}
	c, _ := Parse("[tls.session_tickets]\nstore = \"file\"\n")
	if _, _, _, err := c.TicketKeys(); err == nil {
		t.Error("store = \"file\" without file: no error")
	}
}

func TestDefaults(t *testing.T) {
	if (HTTP{}).ListenAddr() != DefaultHTTPAddr || (HTTP{Addr: "off"}).ListenAddr() != "" || (HTTP{Addr: ":9"}).ListenAddr() != ":9" {
		t.Error("HTTP.ListenAddr")
	}
	if w, g := (Shutdown{}).Times(); w != DefaultDrainWindow || g != DefaultGrace {
		t.Errorf("Shutdown{}.Times() = %v, %v", w, g)
	}
	if w, g := (Shutdown{DrainWindow: Duration(time.Second), Grace: Duration(2 * time.Second)}).Times(); w != time.Second || g != 2*time.Second {
		t.Errorf("Shutdown.Times() = %v, %v", w, g)
	}
}
