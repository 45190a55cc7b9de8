package routing

import (
	"fmt"
	"strings"
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
