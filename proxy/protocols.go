package proxy

import (
	"strings"

	"github.com/imapgate/imapgate/routing"
)

// This file is what the front ends (IMAP: session.go, POP3: pop3.go,
// ManageSieve: sieve.go, LMTP: lmtp.go) say differently in the shared
// session machinery.

// byeLine is what a kicked session (a move, a drain, an operator) is told
// before the close, in its protocol.
func (s *session) byeLine(text string) string {
	switch s.lst.Protocol {
	case routing.ProtocolPOP3:
		return "-ERR [SYS/TEMP] " + text + "\r\n"
	case routing.ProtocolSieve:
		return `BYE (TRYLATER) "` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(text) + "\"\r\n"
	}
	return "* BYE [UNAVAILABLE] " + text + "\r\n"
}

// refusalLine is what a connection over the limits is told on a
// cleartext listener before it is closed.
func refusalLine(p routing.Protocol) string {
	const text = "Too many connections, try again later"
	switch p {
	case routing.ProtocolPOP3:
		return "-ERR [SYS/TEMP] " + text + "\r\n"
	case routing.ProtocolSieve:
		return `BYE (TRYLATER) "` + text + "\"\r\n"
	}
	return "* BYE [UNAVAILABLE] " + text + "\r\n"
}
