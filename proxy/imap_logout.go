package proxy

import "context"

// LOGOUT (RFC 9051 6.1.3): BYE, the tagged OK, and the session ends.

func (s *session) imapLogout(_ context.Context, cmd *command) (*backendLogin, error) {
	s.setEnd(EndLogout)
	s.queue("BYE Logging out")
	return nil, &imapStatus{typ: "OK", text: "LOGOUT completed", end: true}
}
