package proxy

import "context"

// STARTTLS (RFC 9051 6.2.1): the tagged OK, then the handshake under its
// own deadline. Bytes the client pipelined after the command are dropped
// (upgradeTLS, session.go: the CVE-2011-0411 class of bug).

func (s *session) imapStartTLS(ctx context.Context, cmd *command) (*backendLogin, error) {
	if s.tls {
		return nil, imapBad("TLS is already active")
	}
	if s.srv.o().TLS == nil {
		return nil, imapBad("STARTTLS is not available")
	}
	if len(cmd.args) != 0 {
		return nil, imapBad("STARTTLS takes no arguments")
	}
	// Answered here, before the handshake, not by the dispatcher.
	if !s.writeString(cmd.tag + " OK Begin TLS negotiation now\r\n") {
		return nil, errClientGone
	}
	if !s.upgradeTLS(ctx, "STARTTLS") {
		return nil, errClientGone
	}
	return nil, errAnswered
}
