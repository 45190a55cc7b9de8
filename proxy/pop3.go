package proxy

import (
	"bufio"
	"bytes"
	"context"
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
// succeeds (the backend connection) or the session ends (nil). Each
// command's handler returns its reply (pop3Answer), which pop3Reply
// writes.
func (s *session) pop3PreAuth(ctx context.Context) *backendLogin {
	first := true
	var user string // from USER
	for {
		s.raw.SetReadDeadline(s.readDeadline())
		if first && s.clientHelloOnCleartext() {
			s.writeString("-ERR This port speaks cleartext POP3; use STLS or the implicit-TLS port\r\n")
			return nil
		}
		line, err := s.pop3Line()
		switch {
		case errors.Is(err, errPOP3LineTooLong):
			s.srv.o().Metrics.LimitHit("line_length")
			s.setEnd(EndProtocolError)
			s.writeString("-ERR Line too long\r\n")
			return nil
		case errors.Is(err, errPOP3NUL):
			s.setEnd(EndProtocolError)
			s.writeString("-ERR NUL in command\r\n")
			return nil
		case err != nil:
			s.endPOP3ReadError(err)
			return nil
		}
		name, arg, _ := strings.Cut(line, " ")
		name = strings.ToUpper(name)
		if first && isNotPOP3(name, arg) {
			s.setEnd(EndProtocolMismatch)
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
		var bl *backendLogin
		switch name {
		case "CAPA":
			err = &pop3Answer{ok: true, text: "Capability list follows", body: s.pop3Caps() + "."}
		case "QUIT":
			s.setEnd(EndLogout)
			err = &pop3Answer{ok: true, text: "Bye", end: true}
		case "STLS":
			err = s.pop3STLS(ctx)
		case "USER":
			err = s.pop3User(arg, &user)
		case "PASS":
			if user == "" {
				err = pop3Bad("USER first")
				break
			}
			cr := credentials{mech: "USER", user: user, pass: arg}
			user = ""
			bl, err = s.pop3Login(ctx, cr)
		case "AUTH":
			bl, err = s.pop3Auth(ctx, arg)
		default:
			err = pop3Bad("Unknown command or not valid before login")
		}
		if s.pop3Reply(bl, err) {
			return nil
		}
		if bl != nil {
			return bl
		}
	}
}

// pop3Answer is a POP3 reply, the error value a command's handler
// returns: "+OK text" (and a multi-line body) or "-ERR text".
type pop3Answer struct {
	ok   bool
	text string
	body string // after the status line, for CAPA and AUTH's list: lines, the last one "."
	bad  bool   // counts towards MaxBadCommands
	end  bool   // the session ends after the reply
}

func (e *pop3Answer) Error() string {
	if e.ok {
		return "+OK " + e.text
	}
	return "-ERR " + e.text
}

func pop3Err(text string) *pop3Answer { return &pop3Answer{text: text} }
func pop3Bad(text string) *pop3Answer { return &pop3Answer{text: text, bad: true} }

// pop3Reply writes a handler's reply and reports whether the session
// ends: nil is a plain +OK; after too many bad commands the last -ERR
// says so and the session ends; an error that is not a reply is a bug,
// logged and answered -ERR [SYS/TEMP]. bl, a login's backend connection,
// is closed if the client cannot be told.
func (s *session) pop3Reply(bl *backendLogin, err error) (end bool) {
	st, done, end := replyOf(s, err, &pop3Answer{ok: true}, pop3Err("[SYS/TEMP] Internal error"))
	if done {
		return end
	}
	text, end := st.text, st.end
	if st.bad && s.countBad() {
		text += "; too many invalid commands"
		end = true
	}
	line := "-ERR"
	if st.ok {
		line = "+OK"
	}
	if text != "" {
		line += " " + text
	}
	line += "\r\n"
	if st.body != "" {
		line += st.body + "\r\n"
	}
	if !s.send(line, bl) {
		return true
	}
	return end
}

// pop3User takes USER's name for the PASS that follows.
func (s *session) pop3User(arg string, user *string) error {
	if !s.authAllowed() {
		return pop3Err("[AUTH] Use STLS before logging in")
	}
	if arg == "" {
		return pop3Bad("USER takes a user name")
	}
	*user = arg
	return nil
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

func (s *session) pop3STLS(ctx context.Context) error {
	if s.tls {
		return pop3Bad("TLS is already active")
	}
	if s.srv.o().TLS == nil {
		return pop3Bad("STLS is not available")
	}
	// Answered here, before the handshake.
	if !s.writeString("+OK Begin TLS negotiation now\r\n") || !s.upgradeTLS(ctx, "STLS") {
		return errClientGone
	}
	return errAnswered
}

// pop3Auth runs AUTH (RFC 5034): PLAIN, LOGIN, XOAUTH2 and OAUTHBEARER
// (sasl.go), with or without an initial response; "*" cancels.
func (s *session) pop3Auth(ctx context.Context, arg string) (*backendLogin, error) {
	mech, ir, hasIR := strings.Cut(arg, " ")
	mech = strings.ToUpper(mech)
	if mech == "" {
		var list strings.Builder
		for _, m := range s.pop3Mechs() {
			list.WriteString(m + "\r\n")
		}
		return nil, &pop3Answer{ok: true, body: list.String() + "."}
	}
	if !slices.Contains(s.pop3Mechs(), mech) {
		return nil, pop3Bad("Unsupported authentication mechanism")
	}
	if !s.authAllowed() {
		return nil, pop3Err("[AUTH] Use STLS before logging in")
	}
	step := saslSteps{
		ir: ir, hasIR: hasIR,
		challenge: s.pop3Relay,
		cancelled: pop3Err("Authentication cancelled"),
		invalid:   func(text string) error { return pop3Bad(withoutIMAPCode(text)) },
	}
	cr, err := step.credentials(mech)
	if err != nil {
		return nil, err
	}
	return s.pop3Login(ctx, cr)
}

// pop3Login routes the user, logs in to the backend's POP3 and returns
// the client's reply: login() of imap_login.go, in POP3's words.
func (s *session) pop3Login(ctx context.Context, cr credentials) (*backendLogin, error) {
	if !cr.valid() {
		s.srv.o().Metrics.Login("refused", "invalid_credentials")
		return nil, pop3Bad("Invalid characters in credentials")
	}
	user := routing.NormalizeUser(cr.routingUser())
	log := s.logger(zap.String("user", user), zap.String("mech", cr.mech), zap.String("protocol", "pop3"))
	res := s.runLogin(ctx, &cr, user, log, func(lctx context.Context, b *routing.Backend) (*backendLogin, error) {
		return s.srv.pop3LoginBackend(lctx, b, &cr, s.clientInfo(), s.pop3Relay)
	})
	switch res.end {
	case loginExpired:
		return nil, &pop3Answer{text: "[SYS/TEMP] Autologout; idle for too long", end: true}
	case loginLimited:
		return nil, s.pop3Refused(ctx, "[LOGIN-DELAY] Too many failed logins, try again later")
	case loginNoRoute:
		return nil, pop3Err("[SYS/TEMP] No server is available for this account right now, try again later")
	case loginRefused:
		return nil, s.pop3Refused(ctx, "[AUTH] Authentication failed.")
	case loginNotPlaced:
		return nil, pop3Err("[SYS/TEMP] Your account is moving, please try again")
	case loginUnavailable:
		return nil, pop3Err("[SYS/TEMP] The mail server is not reachable right now, try again later")
	case loginClientGone:
		return nil, errClientGone
	}
	return res.bl, &pop3Answer{ok: true, text: res.bl.caps}
}

// pop3Relay shows the client a SASL challenge (imapgate's own, or the
// backend's OAuth error challenge) and returns its answer line.
func (s *session) pop3Relay(challenge string) (string, error) {
	if !s.writeString("+ " + challenge + "\r\n") {
		return "", errClientGone
	}
	s.raw.SetReadDeadline(s.readDeadline())
	line, err := s.pop3Line()
	if err != nil {
		s.setEnd(EndProtocolError)
		return "", errClientGone
	}
	return line, nil
}

// pop3Refused is a failed login's reply, after the failure delay; after
// too many on this connection it hangs up.
func (s *session) pop3Refused(ctx context.Context, text string) *pop3Answer {
	if s.countAuthFailure(ctx) {
		return &pop3Answer{text: text + " Too many login failures", end: true}
	}
	return pop3Err(text)
}
