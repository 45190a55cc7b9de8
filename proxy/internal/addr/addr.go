// Package addr is how the proxy's front ends (package proxy for IMAP,
// POP3 and ManageSieve, proxy/lmtp for delivery) read a peer's address:
// one form (an IPv4-mapped IPv6 address is IPv4) for logs, limits,
// PROXY headers, XCLIENT and the checks against configured networks.
package addr

import (
	"net"
	"net/netip"
	"slices"
)

// Of returns a's address and port, unmapped. An address that is not TCP
// is parsed from its string; one that does not parse (a pipe in a test)
// is the zero AddrPort.
func Of(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

// In reports whether a is in one of nets (none: false).
func In(nets []netip.Prefix, a netip.Addr) bool {
	return slices.ContainsFunc(nets, func(p netip.Prefix) bool { return p.Contains(a) })
}
