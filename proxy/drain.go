package proxy

// Spliced is a handle on one spliced session, for a drain that closes
// sessions one at a time on its own schedule (see cmd/imapgate, which
// spreads them over a window so that clients do not all reconnect in the
// same second). A handle holds no lock; using it after the session ended
// does nothing.
type Spliced struct{ sess *session }

// Spliced returns handles on the sessions spliced to a backend now, in no
// particular order. Sessions still logging in are not included: Shutdown
// says BYE to them, and any that finish logging in meanwhile show up in a
// later call.
func (s *Server) Spliced() []Spliced {
	ss := s.spliceSessions()
	out := make([]Spliced, len(ss))
	for i, sess := range ss {
		out[i] = Spliced{sess}
	}
	return out
}

// Close ends the session as a drain would: "* BYE [UNAVAILABLE] text"
// when the client stream is at a line boundary, then both legs are closed.
// The session's end line and metrics give "drained" as how it ended.
func (h Spliced) Close(text string) { h.sess.kick(EndDrained, text) }

// Info describes the session.
func (h Spliced) Info() SessionInfo { return h.sess.info() }
