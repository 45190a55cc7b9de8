package proxy

import (
	"context"
	"errors"
	"os"
	"strings"

	"github.com/emersion/go-sasl"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

// This file is the ManageSieve front end's pre-auth (RFC 5804): the
// capability greeting, CAPABILITY, STARTTLS (capabilities re-sent after
// the handshake), AUTHENTICATE "PLAIN" (initial response quoted or as a
// literal, or a continuation), NOOP, LOGOUT. A login is routed like an
// IMAP one, counts against the same failure limits, and is then spliced.
// Commands are read by sieve_parse.go; the backend leg is
// sieve_backend.go.

// sieveExtensions is the SIEVE capability shown before login (the
// backend's own list comes with CAPABILITY after it): Pigeonhole's
// default set.
const sieveExtensions = "fileinto reject envelope encoded-character vacation subaddress comparator-i;ascii-numeric relational regex imap4flags copy include variables body enotify environment mailbox date index ihave duplicate mime foreverypart extracttext"

// sieveGreeting is the ManageSieve greeting: the capabilities, then OK.
func sieveGreeting(s *session) string {
	return s.sieveCaps() + "OK " + sieveQuote(s.srv.o().Greeting) + "\r\n"
}

// sieveCaps is the capability response for the session's state.
func (s *session) sieveCaps() string {
	var b strings.Builder
	b.WriteString("\"IMPLEMENTATION\" \"imapgate\"\r\n")
	if s.authAllowed() {
		b.WriteString("\"SASL\" \"" + strings.Join(s.sieveMechs(), " ") + "\"\r\n")
	} else {
		b.WriteString("\"SASL\" \"\"\r\n")
	}
	b.WriteString("\"SIEVE\" \"" + sieveExtensions + "\"\r\n")
	if !s.tls && s.srv.o().TLS != nil {
		b.WriteString("\"STARTTLS\"\r\n")
	}
	b.WriteString("\"VERSION\" \"1.0\"\r\n")
	return b.String()
}

func (s *session) sieveMechs() []string {
	var out []string
	for _, m := range s.srv.o().Capabilities.AuthMechanisms {
		if m = strings.ToUpper(m); m == sasl.Plain {
			out = append(out, m)
		}
	}
	return out
}

// sieveAnswer is a ManageSieve reply, the error value a command's
// handler returns: a response (data lines) and a status line, OK, NO or
// BYE, with an optional code in parentheses and a quoted text.
type sieveAnswer struct {
	body string // before the status line: capabilities, or the backend's answer to a login
	typ  string // "OK", "NO", "BYE"; "" for body only
	code string // response code without parentheses, or ""
	text string
	bye  string // if set, a BYE with this text follows and the session ends
	bad  bool   // counts towards MaxBadCommands
	end  bool   // the session ends after the reply
}

func (e *sieveAnswer) Error() string {
	if e.code != "" {
		return e.typ + " (" + e.code + ") " + e.text
	}
	return e.typ + " " + e.text
}

func sieveNo(code, text string) *sieveAnswer { return &sieveAnswer{typ: "NO", code: code, text: text} }
func sieveBad(text string) *sieveAnswer      { return &sieveAnswer{typ: "NO", text: text, bad: true} }

// sieveReply writes a handler's reply and reports whether the session
// ends: nil is a plain OK; the bad command over MaxBadCommands gets BYE
// instead of NO; an error that is not a reply is a bug, logged and
// answered NO. bl, a login's backend connection, is closed if the client
// cannot be told.
func (s *session) sieveReply(bl *backendLogin, err error) (end bool) {
	st, done, end := replyOf(s, err, &sieveAnswer{typ: "OK", text: "Done."}, sieveNo("TRYLATER", "Internal error"))
	if done {
		return end
	}
	typ, text, end := st.typ, st.text, st.end || st.bye != "" || st.typ == "BYE"
	if st.bad && s.countBad() {
		typ, text, end = "BYE", text+"; too many invalid commands", true
	}
	out := st.body
	if typ != "" {
		out += typ + " "
		if st.code != "" {
			out += "(" + st.code + ") "
		}
		out += sieveQuote(text) + "\r\n"
	}
	if st.bye != "" {
		out += "BYE " + sieveQuote(st.bye) + "\r\n"
	}
	if !s.send(out, bl) {
		return true
	}
	return end
}

func (s *session) sieveLimits() readLimits {
	lim := s.srv.o().Limits
	return readLimits{maxLine: lim.MaxLineLength, maxLiteral: lim.MaxLiteralSize, maxCommand: lim.MaxCommandSize, maxArgs: 16}
}

// sievePreAuth answers commands until a login succeeds or the session
// ends (nil). Each command's handler returns its reply (sieveAnswer),
// which sieveReply writes.
func (s *session) sievePreAuth(ctx context.Context) *backendLogin {
	first := true
	for {
		s.raw.SetReadDeadline(s.readDeadline())
		if first && s.clientHelloOnCleartext() {
			s.writeString(`BYE "This port speaks cleartext ManageSieve; use STARTTLS"` + "\r\n")
			return nil
		}
		args, err := readSieveCommand(s.r.br, s.sieveLimits())
		var se *errSieve
		switch {
		case errors.As(err, &se) && se.fatal:
			if se == errSieveTooLong {
				s.srv.o().Metrics.LimitHit("line_length")
			}
			s.setEnd(EndProtocolError)
			s.writeString("BYE " + sieveQuote(se.text) + "\r\n")
			return nil
		case errors.As(err, &se):
			if s.sieveReply(nil, sieveBad(se.text)) {
				return nil
			}
			first = false
			continue
		case errors.Is(err, os.ErrDeadlineExceeded):
			s.timedOut()
			s.writeString(`BYE "Autologout; idle for too long"` + "\r\n")
			return nil
		case err != nil:
			s.endOnReadError(err)
			return nil
		}
		if len(args) == 0 {
			if s.sieveReply(nil, sieveBad("Empty command")) {
				return nil
			}
			continue
		}
		name := args[0].val
		if first && (args[0].quoted || isNotSieve(args)) {
			s.setEnd(EndProtocolMismatch)
			s.writeString(`BYE "This is a ManageSieve server"` + "\r\n")
			return nil
		}
		first = false
		switch name {
		case "CAPABILITY", "STARTTLS", "AUTHENTICATE", "NOOP", "LOGOUT":
			s.srv.o().Metrics.PreAuthCommand(strings.ToLower(name))
		default:
			s.srv.o().Metrics.PreAuthCommand("other")
		}
		var bl *backendLogin
		switch name {
		case "CAPABILITY":
			err = &sieveAnswer{body: s.sieveCaps(), typ: "OK", text: "Capability completed."}
		case "NOOP":
			err = &sieveAnswer{typ: "OK", text: "NOOP completed."}
			if len(args) == 2 && args[1].quoted {
				err = &sieveAnswer{typ: "OK", code: "TAG " + sieveQuote(args[1].val), text: "Done."}
			}
		case "LOGOUT":
			s.setEnd(EndLogout)
			err = &sieveAnswer{typ: "OK", text: "Logout completed.", end: true}
		case "STARTTLS":
			err = s.sieveStartTLS(ctx)
		case "AUTHENTICATE":
			bl, err = s.sieveAuthenticate(ctx, args[1:])
		default:
			err = sieveBad("Unknown command or not valid before login")
		}
		if s.sieveReply(bl, err) {
			return nil
		}
		if bl != nil {
			return bl
		}
	}
}

// isNotSieve spots a first line of another protocol.
func isNotSieve(args []sieveArg) bool {
	switch args[0].val {
	case "EHLO", "HELO", "LHLO", "USER", "CAPA", "STLS", "GET", "POST", "PUT", "HEAD", "CONNECT", "PROXY":
		return true
	}
	if len(args) > 1 && !args[1].quoted {
		switch strings.ToUpper(args[1].val) {
		case "LOGIN", "CAPABILITY", "STARTTLS", "AUTHENTICATE", "LOGOUT":
			return true // IMAP: a tag, then a command
		}
	}
	return false
}

func (s *session) sieveStartTLS(ctx context.Context) error {
	if s.tls {
		return sieveBad("TLS is already active")
	}
	if s.srv.o().TLS == nil {
		return sieveBad("STARTTLS is not available")
	}
	// Answered here, before the handshake.
	if !s.writeString(`OK "Begin TLS negotiation now."`+"\r\n") || !s.upgradeTLS(ctx, "STARTTLS") {
		return errClientGone
	}
	// RFC 5804 2.2: the capabilities again, unasked, then OK.
	return &sieveAnswer{body: s.sieveCaps(), typ: "OK", text: "TLS negotiation successful."}
}

// sieveAuthenticate runs AUTHENTICATE "PLAIN" [initial-response] (the
// response quoted or a literal, or sent after an empty challenge).
func (s *session) sieveAuthenticate(ctx context.Context, args []sieveArg) (*backendLogin, error) {
	if len(args) < 1 || len(args) > 2 || !args[0].quoted {
		return nil, sieveBad(`AUTHENTICATE takes a quoted mechanism and an optional initial response`)
	}
	if !strings.EqualFold(args[0].val, sasl.Plain) || !s.offers(sasl.Plain) {
		return nil, sieveNo("", "Unsupported authentication mechanism")
	}
	if !s.authAllowed() {
		return nil, sieveNo("ENCRYPT-NEEDED", "Use STARTTLS before logging in")
	}
	step := saslSteps{
		challenge: func(challenge string) (string, error) {
			if !s.writeString(sieveQuote(challenge) + "\r\n") {
				return "", errClientGone
			}
			s.raw.SetReadDeadline(s.readDeadline())
			more, err := readSieveCommand(s.r.br, s.sieveLimits())
			if err != nil {
				s.setEnd(EndProtocolError)
				return "", errClientGone
			}
			if len(more) != 1 {
				return "", sieveBad("Expected a string")
			}
			return more[0].val, nil
		},
		cancelled: sieveNo("", "Authentication cancelled."),
		invalid:   func(text string) error { return sieveBad(withoutIMAPCode(text)) },
	}
	if len(args) == 2 {
		step.ir, step.hasIR = args[1].val, true
	}
	cr, err := step.credentials(sasl.Plain)
	if err != nil {
		return nil, err
	}
	return s.sieveLogin(ctx, cr)
}

// sieveLogin routes the user, logs in to the backend's ManageSieve and
// returns the client's reply: login() of imap_login.go, in ManageSieve's
// words.
func (s *session) sieveLogin(ctx context.Context, cr credentials) (*backendLogin, error) {
	if !cr.valid() {
		s.srv.o().Metrics.Login("refused", "invalid_credentials")
		return nil, sieveBad("Invalid characters in credentials")
	}
	user := routing.NormalizeUser(cr.routingUser())
	log := s.logger(zap.String("user", user), zap.String("mech", cr.mech), zap.String("protocol", "sieve"))
	res := s.runLogin(ctx, &cr, user, log, func(lctx context.Context, b *routing.Backend) (*backendLogin, error) {
		return s.srv.sieveLoginBackend(lctx, b, &cr, s.clientInfo())
	})
	switch res.end {
	case loginExpired:
		return nil, &sieveAnswer{typ: "BYE", code: "TRYLATER", text: "Autologout; idle for too long"}
	case loginLimited:
		return nil, s.sieveRefused(ctx, "TRYLATER", "Too many failed logins, try again later")
	case loginNoRoute:
		return nil, sieveNo("TRYLATER", "No server is available for this account right now, try again later")
	case loginRefused:
		return nil, s.sieveRefused(ctx, "", "Authentication failed.")
	case loginNotPlaced:
		return nil, sieveNo("TRYLATER", "Your account is moving, please try again")
	case loginUnavailable:
		return nil, sieveNo("TRYLATER", "The mail server is not reachable right now, try again later")
	case loginClientGone:
		return nil, errClientGone
	}
	return res.bl, &sieveAnswer{body: res.bl.caps + "\r\n"}
}

// sieveRefused is a failed login's reply, after the failure delay; after
// too many on this connection it hangs up.
func (s *session) sieveRefused(ctx context.Context, code, text string) *sieveAnswer {
	st := sieveNo(code, text)
	if s.countAuthFailure(ctx) {
		st.bye = "Too many login failures"
	}
	return st
}
