package addr

import (
	"net"
	"net/netip"
	"testing"
)

func TestOf(t *testing.T) {
	for _, tc := range []struct {
		in   net.Addr
		want string
	}{
		{&net.TCPAddr{IP: net.ParseIP("192.0.2.1"), Port: 143}, "192.0.2.1:143"},
		{&net.TCPAddr{IP: net.ParseIP("::ffff:192.0.2.1"), Port: 993}, "192.0.2.1:993"},
		{&net.TCPAddr{IP: net.ParseIP("2001:db8::1"), Port: 110}, "[2001:db8::1]:110"},
		{&net.UDPAddr{IP: net.ParseIP("192.0.2.7"), Port: 24}, "192.0.2.7:24"},
		{pipeAddr{}, "invalid AddrPort"},
	} {
		if got := Of(tc.in).String(); got != tc.want {
			t.Errorf("Of(%v) = %s, want %s", tc.in, got, tc.want)
		}
	}
}

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }

func TestIn(t *testing.T) {
	nets := []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("2001:db8::/32")}
	for _, tc := range []struct {
		a    string
		want bool
	}{
		{"127.0.0.1", true}, {"2001:db8::5", true}, {"192.0.2.1", false}, {"::1", false},
	} {
		if got := In(nets, netip.MustParseAddr(tc.a)); got != tc.want {
			t.Errorf("In(%s) = %v, want %v", tc.a, got, tc.want)
		}
	}
	if In(nil, netip.MustParseAddr("127.0.0.1")) {
		t.Error("In(nil) = true")
	}
}
