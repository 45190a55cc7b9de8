package proxy

import "context"

// ENABLE (RFC 5161) is valid only after login: a client that sends it
// before is told so, and it does not count as a bad command (the
// capability list offers ENABLE, for after login).

func (s *session) imapEnable(context.Context, *command) (*backendLogin, error) {
	return nil, &imapStatus{typ: "BAD", code: "CLIENTBUG", text: "ENABLE is only valid after login", uncounted: true}
}
