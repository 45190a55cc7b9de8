package proxy

import "context"

// NOOP (RFC 9051 6.1.2): nothing to do before login.

func (s *session) imapNoop(context.Context, *command) (*backendLogin, error) { return nil, nil }
