package routing

import (
	"fmt"
	"net"
	"strconv"
	"strings"

	"go.uber.org/zap"
)

// This file is the per-protocol side of a backend: imapgate fronts IMAP,
// POP3, ManageSieve and LMTP with one placement, so a backend is one
// identity (one ID, one weight, one place in hashing) with an address per
// protocol it serves.

// Protocol is a mail protocol imapgate fronts.
type Protocol uint8

const (
	// ProtocolIMAP is IMAP4 (RFC 9051/3501), served at Backend.Addr.
	ProtocolIMAP Protocol = iota
	// ProtocolPOP3 is POP3 (RFC 1939), at Backend.POP3Addr.
	ProtocolPOP3
	// ProtocolSieve is ManageSieve (RFC 5804), at Backend.SieveAddr.
	ProtocolSieve
	// ProtocolLMTP is LMTP (RFC 2033) for delivery, at Backend.LMTPAddr.
	ProtocolLMTP
)

// String returns the config-file spelling of p.
func (p Protocol) String() string {
	switch p {
	case ProtocolIMAP:
		return "imap"
	case ProtocolPOP3:
		return "pop3"
	case ProtocolSieve:
		return "sieve"
	case ProtocolLMTP:
		return "lmtp"
	}
	return "unknown"
}

// ParseProtocol parses "imap" (or empty), "pop3", "sieve" (or
// "managesieve") and "lmtp".
func ParseProtocol(s string) (Protocol, error) {
	switch strings.ToLower(s) {
	case "", "imap":
		return ProtocolIMAP, nil
	case "pop3":
		return ProtocolPOP3, nil
	case "sieve", "managesieve":
		return ProtocolSieve, nil
	case "lmtp":
		return ProtocolLMTP, nil
	}
	return 0, fmt.Errorf(`routing: unknown protocol %q (want "imap", "pop3", "sieve" or "lmtp")`, s)
}

// AddrFor returns the address b serves p at, or "" if it does not.
func (b *Backend) AddrFor(p Protocol) string {
	switch p {
	case ProtocolIMAP:
		return b.Addr
	case ProtocolPOP3:
		return b.POP3Addr
	case ProtocolSieve:
		return b.SieveAddr
	case ProtocolLMTP:
		return b.LMTPAddr
	}
	return ""
}

// Service Meta keys for the other protocols of a Consul backend instance:
// the port of each on the service's own address. A missing key means the
// backend does not serve that protocol.
const (
	MetaPOP3Port     = "imapgate-pop3-port"
	MetaSievePort    = "imapgate-sieve-port"
	MetaLMTPPort     = "imapgate-lmtp-port"
	MetaLMTPSecurity = "imapgate-lmtp-security" // "none" (default), "tls" or "starttls"
)

// protocolAddrs fills b's per-protocol addresses from a service's Meta.
// A bad value skips the backend (logged), as a bad security does.
func (c *Consul) protocolAddrs(b *Backend, host string, meta map[string]string) bool {
	for _, f := range []struct {
		key string
		dst *string
	}{{MetaPOP3Port, &b.POP3Addr}, {MetaSievePort, &b.SieveAddr}, {MetaLMTPPort, &b.LMTPAddr}} {
		v := meta[f.key]
		if v == "" {
			continue
		}
		port, err := strconv.Atoi(v)
		if err != nil || port <= 0 || port > 65535 {
			c.log.Error("bad "+f.key+" in service meta (want a port number); backend skipped",
				zap.String("backend", b.ID), zap.String("value", v))
			return false
		}
		*f.dst = net.JoinHostPort(host, strconv.Itoa(port))
	}
	sec, err := ParseSecurity(meta[MetaLMTPSecurity])
	if err != nil {
		c.log.Error("bad "+MetaLMTPSecurity+" in service meta; backend skipped", zap.String("backend", b.ID), zap.Error(err))
		return false
	}
	b.LMTPSecurity = sec
	return true
}

func sameProtocolAddrs(a, b *Backend) bool {
	return a.POP3Addr == b.POP3Addr && a.SieveAddr == b.SieveAddr && a.LMTPAddr == b.LMTPAddr && a.LMTPSecurity == b.LMTPSecurity
}
