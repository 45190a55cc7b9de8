package proxy

import (
	"context"
	"strings"

	"github.com/imapgate/imapgate/routing"
)

// This file is what the front ends (IMAP: imap.go, POP3: pop3.go,
// ManageSieve: sieve.go, LMTP: lmtp.go) say differently in the shared
// session machinery.

// frontEnd is what a protocol's front end adds to the shared session:
// its greeting, its Not Authenticated state (nil when the session ends
// there), and the line a session says after a panic.
type frontEnd struct {
	greeting  func(s *session) string
	preAuth   func(s *session, ctx context.Context) *backendLogin
	panicLine string
}

var (
	imapFrontEnd  = frontEnd{greeting: imapGreeting, preAuth: imapPreAuth, panicLine: "* BYE [SERVERBUG] Internal error\r\n"}
	pop3FrontEnd  = frontEnd{greeting: pop3Greeting, preAuth: (*session).pop3PreAuth, panicLine: "-ERR [SYS/TEMP] Internal error\r\n"}
	sieveFrontEnd = frontEnd{greeting: sieveGreeting, preAuth: (*session).sievePreAuth, panicLine: `BYE "Internal error"` + "\r\n"}
)

// frontEndFor returns the front end of a listener's protocol (LMTP has
// its own server, lmtp.go).
func frontEndFor(p routing.Protocol) *frontEnd {
	switch p {
	case routing.ProtocolPOP3:
		return &pop3FrontEnd
	case routing.ProtocolSieve:
		return &sieveFrontEnd
	}
	return &imapFrontEnd
}

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
