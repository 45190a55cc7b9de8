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
// It depends on the options, TLS and whether credentials may be sent:
// the four lists are built once per Options (every greeting carries one).
func (s *session) capabilities() string {
	o := s.srv.o()
	c := s.srv.caps.Load()
	if c == nil || c.o != o {
		c = &capLists{o: o}
		for i, tls := range []bool{false, true} {
			for j, auth := range []bool{false, true} {
				c.lists[i][j] = capabilityList(o, tls, auth)
			}
		}
		s.srv.caps.Store(c)
	}
	return c.lists[b2i(s.tls)][b2i(s.authAllowed())]
}

// capLists are the pre-auth lists of one Options, by TLS and by whether
// credentials may be sent.
type capLists struct {
	o     *Options
	lists [2][2]string
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// capabilityList is the pre-auth list under o.
func capabilityList(o *Options, tls, auth bool) string {
	c := o.Capabilities
	var caps []string
	if len(c.Replace) > 0 {
		caps = append(caps, c.Replace...)
	} else {
		caps = append(caps, "IMAP4rev1")
		if c.IMAP4rev2 {
			caps = append(caps, "IMAP4rev2")
		}
		caps = append(caps, "SASL-IR", "LITERAL+", "ID", "ENABLE", "IDLE")
		caps = append(caps, c.Extra...)
	}
	if !tls && o.TLS != nil {
		caps = append(caps, "STARTTLS")
	}
	if auth {
		for _, m := range c.AuthMechanisms {
			caps = append(caps, "AUTH="+strings.ToUpper(m))
		}
	} else {
		caps = append(caps, "LOGINDISABLED")
	}
	return strings.Join(caps, " ")
}
