package proxy

import (
	"context"
	"strings"
)

// CAPABILITY (RFC 9051 6.1.1): the pre-auth list, which changes with TLS
// and with whether credentials may be sent. After login the client gets
// the backend's own list, in the login's OK.

func (s *session) imapCapability(_ context.Context, cmd *command) (*backendLogin, error) {
	if len(cmd.args) != 0 {
		return nil, imapBad("CAPABILITY takes no arguments")
	}
	s.queue("CAPABILITY " + s.capabilities())
	return nil, nil
}

// capabilities is the pre-auth capability list for the session's state.
func (s *session) capabilities() string {
	o := s.srv.o().Capabilities
	var caps []string
	if len(o.Replace) > 0 {
		caps = append(caps, o.Replace...)
	} else {
		caps = append(caps, "IMAP4rev1")
		if o.IMAP4rev2 {
			caps = append(caps, "IMAP4rev2")
		}
		caps = append(caps, "SASL-IR", "LITERAL+", "ID", "ENABLE", "IDLE")
		caps = append(caps, o.Extra...)
	}
	if !s.tls && s.srv.o().TLS != nil {
		caps = append(caps, "STARTTLS")
	}
	if s.authAllowed() {
		for _, m := range s.srv.o().Capabilities.AuthMechanisms {
			caps = append(caps, "AUTH="+strings.ToUpper(m))
		}
	} else {
		caps = append(caps, "LOGINDISABLED")
	}
	return strings.Join(caps, " ")
}
