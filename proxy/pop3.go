package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"os"
	"slices"
	"strings"

	"github.com/emersion/go-sasl"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

// This file is the POP3 front end's pre-auth (RFC 1939, 2449 CAPA, 2595
// STLS, 5034 AUTH): greeting, CAPA, STLS, USER/PASS, AUTH PLAIN and LOGIN
// (with initial response), QUIT. A login is routed like an IMAP one,
// counts against the same failure limits, and is then spliced as IMAP is
// (splice.go). The backend leg is pop3_backend.go. The session struct,
// its limits, timeouts and kicks are session.go's.

// pop3Greeting is the POP3 greeting.
func pop3Greeting(s *session) string { return "+OK " + s.srv.o().Greeting + "\r\n" }

// pop3Line reads one command line: bounded, CRLF stripped, no NUL.
func (s *session) pop3Line() (string, error) {
	line, err := s.r.br.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		return "", errPOP3LineTooLong
	}
	if err != nil {
		return "", err
	}
	line = bytes.TrimRight(line, "\r\n")
	if bytes.IndexByte(line, 0) >= 0 {
		return "", errPOP3NUL
	}
	return string(line), nil
}

var (
	errPOP3LineTooLong = errors.New("line too long")
	errPOP3NUL         = errors.New("NUL in command")
)

// pop3PreAuth answers commands in the AUTHORIZATION state until a login
// succeeds (the backend connection) or the session ends (nil).
func (s *session) pop3PreAuth(ctx context.Context) *backendLogin {
	first := true
	var user string // from USER
	for {
		s.raw.SetReadDeadline(s.readDeadline())
		if first && !s.tls {
			if b, err := s.r.br.Peek(1); err == nil && b[0] == 0x16 {
				s.setReason("protocol_mismatch")
				s.writeString("-ERR This port speaks cleartext POP3; use STLS or the implicit-TLS port\r\n")
				return nil
			}
		}
		line, err := s.pop3Line()
		switch {
		case errors.Is(err, errPOP3LineTooLong):
			s.srv.o().Metrics.LimitHit("line_length")
			s.setReason("protocol_error")
			s.writeString("-ERR Line too long\r\n")
			return nil
		case errors.Is(err, errPOP3NUL):
			s.setReason("protocol_error")
			s.writeString("-ERR NUL in command\r\n")
			return nil
		case err != nil:
			s.endPOP3ReadError(err)
			return nil
		}
		name, arg, _ := strings.Cut(line, " ")
		name = strings.ToUpper(name)
		if first && isNotPOP3(name, arg) {
			s.setReason("protocol_mismatch")
			s.writeString("-ERR This is a POP3 server\r\n")
			return nil
		}
		first = false
		switch name {
		case "CAPA", "STLS", "USER", "PASS", "AUTH", "QUIT":
			s.srv.o().Metrics.PreAuthCommand(strings.ToLower(name))
		default:
			s.srv.o().Metrics.PreAuthCommand("other")
		}
		switch name {
		case "CAPA":
			if !s.writeString("+OK Capability list follows\r\n" + s.pop3Caps() + ".\r\n") {
				return nil
			}
		case "QUIT":
			s.setReason("logout")
			s.writeString("+OK Bye\r\n")
			return nil
		case "STLS":
			if !s.pop3STLS(ctx) {
				return nil
			}
		case "USER":
			if !s.authAllowed() {
				if !s.pop3Err("[AUTH] Use STLS before logging in") {
					return nil
				}
				continue
			}
			if arg == "" {
				if !s.pop3Bad("USER takes a user name") {
					return nil
				}
				continue
			}
			user = arg
			if !s.writeString("+OK\r\n") {
				return nil
			}
		case "PASS":
			if user == "" {
				if !s.pop3Bad("USER first") {
					return nil
				}
				continue
			}
			cr := credentials{mech: "USER", user: user, pass: arg}
			user = ""
			bl, end := s.pop3Login(ctx, cr)
			if end || bl != nil {
				return bl
			}
		case "AUTH":
			bl, end := s.pop3Auth(ctx, arg)
			if end || bl != nil {
				return bl
			}
		default:
			if !s.pop3Bad("Unknown command or not valid before login") {
				return nil
			}
		}
	}
}

// isNotPOP3 spots a first line of another protocol: IMAP (a tag, then a
// command), HTTP, SMTP.
func isNotPOP3(name, arg string) bool {
	switch name {
	case "EHLO", "HELO", "LHLO", "GET", "POST", "PUT", "HEAD", "CONNECT", "OPTIONS", "PROXY":
		return true
	}
	cmd, _, _ := strings.Cut(strings.ToUpper(arg), " ")
	switch cmd {
	case "LOGIN", "CAPABILITY", "STARTTLS", "AUTHENTICATE", "NOOP", "LOGOUT", "ID":
		return true
	}
	return false
}

func (s *session) endPOP3ReadError(err error) {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		s.timedOut()
		s.writeString("-ERR Autologout; idle for too long\r\n")
		return
	}
	s.endOnReadError(err) // the reasons; its IMAP BYE is only for timeouts
}

// pop3Caps is the CAPA list for the session's state.
func (s *session) pop3Caps() string {
	var b strings.Builder
	for _, c := range []string{"TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"} {
		b.WriteString(c + "\r\n")
	}
	if !s.tls && s.srv.o().TLS != nil {
		b.WriteString("STLS\r\n")
	}
	if s.authAllowed() {
		b.WriteString("USER\r\n")
		if mechs := s.pop3Mechs(); len(mechs) > 0 {
			b.WriteString("SASL " + strings.Join(mechs, " ") + "\r\n")
		}
	}
	b.WriteString("IMPLEMENTATION imapgate\r\n")
	return b.String()
}

// pop3Mechs are the offered SASL mechanisms POP3 supports.
func (s *session) pop3Mechs() []string {
	var mechs []string
	for _, m := range s.srv.o().Capabilities.AuthMechanisms {
		switch m = strings.ToUpper(m); m {
		case sasl.Plain, sasl.Login, mechXOAuth2, mechOAuthBearer:
			mechs = append(mechs, m)
		}
	}
	return mechs
}

// pop3Err answers -ERR and reports whether the session goes on.
func (s *session) pop3Err(text string) bool { return s.writeString("-ERR " + text + "\r\n") }

// pop3Bad answers a bad command, hanging up after too many.
func (s *session) pop3Bad(text string) bool {
	s.badCmds++
	if s.badCmds >= s.srv.o().Limits.MaxBadCommands {
		s.srv.o().Metrics.LimitHit("bad_commands")
		s.setReason("bad_commands")
		s.writeString("-ERR " + text + "; too many invalid commands\r\n")
		return false
	}
	return s.pop3Err(text)
}

func (s *session) pop3STLS(ctx context.Context) bool {
	if s.tls {
		return s.pop3Bad("TLS is already active")
	}
	if s.srv.o().TLS == nil {
		return s.pop3Bad("STLS is not available")
	}
	if !s.writeString("+OK Begin TLS negotiation now\r\n") {
		return false
	}
	return s.upgradeTLS(ctx, "STLS")
}

// pop3Auth runs AUTH (RFC 5034): PLAIN and LOGIN, with or without an
// initial response; "*" cancels.
func (s *session) pop3Auth(ctx context.Context, arg string) (*backendLogin, bool) {
	mech, ir, hasIR := strings.Cut(arg, " ")
	mech = strings.ToUpper(mech)
	if mech == "" {
		var list strings.Builder
		for _, m := range s.pop3Mechs() {
			list.WriteString(m + "\r\n")
		}
		return nil, !s.writeString("+OK\r\n" + list.String() + ".\r\n")
	}
	if !slices.Contains(s.pop3Mechs(), mech) {
		return nil, !s.pop3Bad("Unsupported authentication mechanism")
	}
	if !s.authAllowed() {
		return nil, !s.pop3Err("[AUTH] Use STLS before logging in")
	}
	step := func(challenge string) ([]byte, bool, bool) {
		var line string
		if hasIR {
			line, hasIR = ir, false
		} else {
			if !s.writeString("+ " + challenge + "\r\n") {
				return nil, false, true
			}
			s.raw.SetReadDeadline(s.readDeadline())
			var err error
			if line, err = s.pop3Line(); err != nil {
				s.setReason("protocol_error")
				return nil, false, true
			}
		}
		if line == "*" {
			return nil, false, !s.pop3Err("Authentication cancelled")
		}
		if line == "=" {
			return []byte{}, true, false
		}
		b, err := base64.StdEncoding.DecodeString(line)
		if err != nil {
			return nil, false, !s.pop3Bad("Invalid base64")
		}
		return b, true, false
	}
	var cr credentials
	switch mech {
	case sasl.Plain:
		raw, ok, end := step("")
		if !ok {
			return nil, end
		}
		var err error
		if cr, err = decodePlain(raw); err != nil {
			return nil, !s.pop3Bad(err.Error())
		}
	case sasl.Login:
		u, ok, end := step("VXNlcm5hbWU6")
		if !ok {
			return nil, end
		}
		p, ok, end := step("UGFzc3dvcmQ6")
		if !ok {
			return nil, end
		}
		cr = credentials{mech: sasl.Login, user: string(u), pass: string(p)}
	case mechXOAuth2, mechOAuthBearer:
		// Routed by the identity inside, relayed to the backend as is
		// (with its error challenge, as for IMAP).
		raw, ok, end := step("")
		if !ok {
			return nil, end
		}
		var err error
		if cr, err = decodeOAuth(mech, raw); err != nil {
			return nil, !s.pop3Bad(strings.TrimPrefix(err.Error(), "[CLIENTBUG] "))
		}
	}
	return s.pop3Login(ctx, cr)
}

// pop3Login routes the user, logs in to the backend's POP3 and answers
// the client: login() of session.go, in POP3's words.
func (s *session) pop3Login(ctx context.Context, cr credentials) (*backendLogin, bool) {
	m := s.srv.o().Metrics
	if strings.ContainsAny(cr.user+cr.pass+cr.authzid, "\x00\r\n") || cr.user == "" {
		m.Login("refused", "invalid_credentials")
		return nil, !s.pop3Bad("Invalid characters in credentials")
	}
	user := routing.NormalizeUser(cr.routingUser())
	log := s.logger(zap.String("user", user), zap.String("mech", cr.mech), zap.String("protocol", "pop3"))
	res := s.runLogin(ctx, &cr, user, log, func(lctx context.Context, b *routing.Backend) (*backendLogin, error) {
		return s.srv.pop3LoginBackend(lctx, b, &cr, s.clientInfo(), s.pop3Relay)
	})
	switch res.end {
	case loginExpired:
		s.pop3Err("[SYS/TEMP] Autologout; idle for too long")
		return nil, true
	case loginLimited:
		return s.pop3Refused(ctx, "[LOGIN-DELAY] Too many failed logins, try again later")
	case loginNoRoute:
		return nil, !s.pop3Err("[SYS/TEMP] No server is available for this account right now, try again later")
	case loginRefused:
		return s.pop3Refused(ctx, "[AUTH] Authentication failed.")
	case loginNotPlaced:
		return nil, !s.pop3Err("[SYS/TEMP] Your account is moving, please try again")
	case loginUnavailable:
		return nil, !s.pop3Err("[SYS/TEMP] The mail server is not reachable right now, try again later")
	case loginClientGone:
		return nil, true
	}
	bl := res.bl
	if !s.writeString("+OK " + bl.caps + "\r\n") {
		bl.conn.Close()
		return nil, true
	}
	return bl, false
}

// pop3Relay shows the client a SASL challenge from the backend (the
// OAuth error challenge) and returns its answer line.
func (s *session) pop3Relay(challenge string) (string, error) {
	if !s.writeString("+ " + challenge + "\r\n") {
		return "", errClientGone
	}
	s.raw.SetReadDeadline(s.readDeadline())
	line, err := s.pop3Line()
	if err != nil {
		s.setReason("protocol_error")
		return "", errClientGone
	}
	return line, nil
}

// pop3Refused answers a failed login after the failure delay, and hangs
// up after too many on this connection.
func (s *session) pop3Refused(ctx context.Context, text string) (*backendLogin, bool) {
	s.authFails++
	s.failureDelay(ctx)
	if s.authFails >= s.srv.o().Limits.MaxAuthFailures {
		s.srv.o().Metrics.LimitHit("auth_failures")
		s.setReason("auth_failures")
		s.writeString("-ERR " + text + " Too many login failures\r\n")
		return nil, true
	}
	return nil, !s.pop3Err(text)
}
