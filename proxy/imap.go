package proxy

import (
	"context"
	"errors"
	"strings"

	"go.uber.org/zap"
)

// This file is the IMAP front end's Not Authenticated state: the loop
// that reads commands, the table of commands (one file each:
// imap_capability.go, imap_noop.go, imap_logout.go, imap_starttls.go,
// imap_id.go, imap_enable.go, imap_login.go, imap_authenticate.go), and
// the dispatcher that writes each command's reply. As in go-imap's
// imapserver, a handler returns its reply as an error value (imapStatus)
// and the dispatcher writes it once, tagged; a nil error is the plain
// "OK <command> completed".

// imapGreeting is the IMAP greeting, with the pre-auth capabilities.
func imapGreeting(s *session) string {
	return "* OK [CAPABILITY " + s.capabilities() + "] " + s.srv.o().Greeting + "\r\n"
}

// imapPreAuth is the IMAP front end's Not Authenticated state.
func imapPreAuth(s *session, ctx context.Context) *backendLogin {
	bl, err := s.preAuth(ctx)
	if err != nil {
		return nil
	}
	return bl
}

// imapHandler answers one pre-auth command. It returns the backend
// connection after a successful login (with an OK imapStatus), and
// otherwise its reply: nil (OK), an *imapStatus, errAnswered (it wrote
// its own tagged reply) or errClientGone (the session is over, its end
// reason recorded).
type imapHandler func(s *session, ctx context.Context, cmd *command) (*backendLogin, error)

// imapCommands are the commands valid before login; any other gets BAD.
var imapCommands = map[string]imapHandler{
	"CAPABILITY":   (*session).imapCapability,
	"NOOP":         (*session).imapNoop,
	"LOGOUT":       (*session).imapLogout,
	"STARTTLS":     (*session).imapStartTLS,
	"ID":           (*session).imapID,
	"ENABLE":       (*session).imapEnable,
	"LOGIN":        (*session).imapLogin,
	"AUTHENTICATE": (*session).imapAuthenticate,
}

// imapStatus is a tagged status reply, the error value a handler returns
// (as go-imap's imap.Error): what the client is told, never a backend's
// address or a router's error.
type imapStatus struct {
	typ  string // "OK", "NO", "BAD"; "BYE" is untagged and ends the session
	code string // response code without brackets, e.g. "AUTHENTICATIONFAILED"; "" for none
	text string
	// bye, if set, follows the reply as "* BYE bye"; the session ends.
	bye string
	// end: the session ends after the reply (LOGOUT).
	end bool
	// uncounted: a BAD that does not count towards MaxBadCommands (a
	// cancelled AUTHENTICATE, ENABLE before login).
	uncounted bool
}

func (e *imapStatus) Error() string {
	if e.code != "" {
		return e.typ + " [" + e.code + "] " + e.text
	}
	return e.typ + " " + e.text
}

func imapBad(text string) *imapStatus      { return &imapStatus{typ: "BAD", text: text} }
func imapNo(code, text string) *imapStatus { return &imapStatus{typ: "NO", code: code, text: text} }
func imapBye(text string) *imapStatus      { return &imapStatus{typ: "BYE", text: text} }
func imapOK(code, text string) *imapStatus { return &imapStatus{typ: "OK", code: code, text: text} }
func imapClientBug(text string) *imapStatus {
	return &imapStatus{typ: "BAD", code: "CLIENTBUG", text: text}
}
func imapUnavailable(text string) *imapStatus { return imapNo("UNAVAILABLE", text) }

// errAnswered is a handler's word that it wrote its own tagged reply
// (STARTTLS answers before its handshake).
var errAnswered = errors.New("proxy: command answered by its handler")

// preAuth answers commands until a login succeeds (it returns the backend
// connection) or the session must end (nil).
func (s *session) preAuth(ctx context.Context) (*backendLogin, error) {
	first := true
	for {
		s.raw.SetReadDeadline(s.readDeadline())
		if first && s.clientHelloOnCleartext() {
			s.writeString("* BYE [CLIENTBUG] This port speaks cleartext IMAP; use STARTTLS or the implicit-TLS port\r\n")
			return nil, nil
		}
		cmd, err := s.r.readCommand()
		if err != nil {
			var pe *protoError
			if !errors.As(err, &pe) {
				s.endOnReadError(err)
				return nil, err
			}
			if first && pe.tag == "" || pe.fatal {
				s.setEnd(EndProtocolError)
				if pe.code == "TOOBIG" {
					s.srv.o().Metrics.LimitHit("line_length")
				}
				s.writeString("* BYE " + pe.Error() + "\r\n")
				return nil, nil
			}
			if s.reply(pe.tag, nil, imapBad(pe.Error())) {
				return nil, nil
			}
			first = false
			continue
		}
		if first && isOtherProtocol(cmd) {
			s.setEnd(EndProtocolMismatch)
			s.writeString("* BYE [CLIENTBUG] This is an IMAP server\r\n")
			return nil, nil
		}
		first = false
		bl, end := s.handle(ctx, cmd)
		if end || bl != nil {
			return bl, nil
		}
	}
}

// isOtherProtocol spots a first line that is not IMAP at all: an HTTP
// request line, SMTP or POP3 greetings. Such clients get BYE at once.
func isOtherProtocol(cmd *command) bool {
	switch strings.ToUpper(cmd.tag) {
	case "GET", "POST", "PUT", "HEAD", "OPTIONS", "CONNECT", "DELETE", "PATCH", "TRACE":
		for _, a := range cmd.args {
			if strings.HasPrefix(a.val, "HTTP/") {
				return true
			}
		}
	case "EHLO", "HELO", "USER", "CAPA", "STLS", "QUIT", "PROXY":
		return true
	}
	return false
}

// handle runs one pre-auth command and writes its reply. It returns the
// backend connection after a successful login, or end=true when the
// session must close.
func (s *session) handle(ctx context.Context, cmd *command) (bl *backendLogin, end bool) {
	h, ok := imapCommands[cmd.name]
	if !ok {
		s.srv.o().Metrics.PreAuthCommand("other")
		return nil, s.reply(cmd.tag, nil, imapBad("Unknown command or not valid before login"))
	}
	s.srv.o().Metrics.PreAuthCommand(strings.ToLower(cmd.name))
	bl, err := h(s, ctx, cmd)
	if err == nil {
		err = imapOK("", cmd.name+" completed")
	}
	if s.reply(cmd.tag, bl, err) {
		return nil, true
	}
	return bl, false
}

// reply writes a handler's reply, tagged, with whatever untagged
// responses the handler queued (one write), and reports whether the
// session ends. A BAD counts towards MaxBadCommands, the last one with a
// BYE. An error that is not a reply is a bug: it is logged, and the
// client gets NO [SERVERBUG]. bl, the backend connection of a login, is
// closed if the client cannot be told.
func (s *session) reply(tag string, bl *backendLogin, err error) (end bool) {
	st, done, end := replyOf(s, err, imapOK("", "Completed"), imapNo("SERVERBUG", "Internal error"))
	if done {
		return end
	}
	if tag == "" {
		tag = "*"
	}
	bye := st.bye
	if st.typ == "BAD" && !st.uncounted && s.countBad() {
		bye = "Too many invalid commands"
	}
	var b strings.Builder
	b.WriteString(s.untagged)
	s.untagged = ""
	if st.typ == "BYE" {
		b.WriteString("* BYE ")
	} else {
		b.WriteString(tag + " " + st.typ + " ")
	}
	if st.code != "" {
		b.WriteString("[" + st.code + "] ")
	}
	b.WriteString(st.text + "\r\n")
	if bye != "" {
		b.WriteString("* BYE " + bye + "\r\n")
	}
	if !s.send(b.String(), bl) {
		return true
	}
	return st.end || bye != "" || st.typ == "BYE"
}

// replyOf sorts a handler's error, in any protocol: its reply (R, the
// protocol's reply type; ok for nil), or done when there is nothing to
// write (errAnswered: the session goes on; errClientGone: it ends). An
// error that is not a reply is a bug: it is logged, and the client gets
// the protocol's internal-error reply.
func replyOf[R error](s *session, err error, ok, internal R) (r R, done, end bool) {
	switch {
	case err == nil:
		return ok, false, false
	case errors.Is(err, errAnswered):
		return r, true, false
	case errors.Is(err, errClientGone):
		return r, true, true
	case errors.As(err, &r):
		return r, false, false
	}
	s.logger().Error("pre-auth command failed", zap.Error(err))
	return internal, false, false
}

// countBad counts a bad command, in any protocol, and reports whether it
// was the last one allowed: the session then ends, and its reply says so.
func (s *session) countBad() (last bool) {
	s.badCmds++
	if s.badCmds < s.srv.o().Limits.MaxBadCommands {
		return false
	}
	s.srv.o().Metrics.LimitHit("bad_commands")
	s.setEnd(EndBadCommands)
	return true
}

// countAuthFailure counts a failed login, in any protocol, waits out the
// failure delay, and reports whether it was the last one allowed on this
// connection: the session then ends, and its reply says so.
func (s *session) countAuthFailure(ctx context.Context) (last bool) {
	s.authFails++
	s.failureDelay(ctx)
	if s.authFails < s.srv.o().Limits.MaxAuthFailures {
		return false
	}
	s.srv.o().Metrics.LimitHit("auth_failures")
	s.setEnd(EndAuthFailures)
	return true
}

// send writes a reply; when the client is gone, bl (a login's backend
// connection, or nil) is closed, since nobody will use it.
func (s *session) send(reply string, bl *backendLogin) bool {
	if s.writeString(reply) {
		return true
	}
	if bl != nil {
		bl.conn.Close()
	}
	return false
}

// queue adds an untagged response ("* " and CRLF added) to the next reply.
func (s *session) queue(resp string) { s.untagged += "* " + resp + "\r\n" }
