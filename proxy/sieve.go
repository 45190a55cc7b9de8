package proxy

import (
	"context"
	"encoding/base64"
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

// sieveNo answers NO and reports whether the session goes on.
func (s *session) sieveNo(code, text string) bool {
	if code != "" {
		code = "(" + code + ") "
	}
	return s.writeString("NO " + code + sieveQuote(text) + "\r\n")
}

// sieveBad answers a bad command, hanging up after too many.
func (s *session) sieveBad(text string) bool {
	s.badCmds++
	if s.badCmds >= s.srv.o().Limits.MaxBadCommands {
		s.srv.o().Metrics.LimitHit("bad_commands")
		s.setReason("bad_commands")
		s.writeString("BYE " + sieveQuote(text+"; too many invalid commands") + "\r\n")
		return false
	}
	return s.sieveNo("", text)
}

func (s *session) sieveLimits() readLimits {
	lim := s.srv.o().Limits
	return readLimits{maxLine: lim.MaxLineLength, maxLiteral: lim.MaxLiteralSize, maxCommand: lim.MaxCommandSize, maxArgs: 16}
}

// sievePreAuth answers commands until a login succeeds or the session
// ends (nil).
func (s *session) sievePreAuth(ctx context.Context) *backendLogin {
	first := true
	for {
		s.raw.SetReadDeadline(s.readDeadline())
		if first && !s.tls {
			if b, err := s.r.br.Peek(1); err == nil && b[0] == 0x16 {
				s.setReason("protocol_mismatch")
				s.writeString(`BYE "This port speaks cleartext ManageSieve; use STARTTLS"` + "\r\n")
				return nil
			}
		}
		args, err := readSieveCommand(s.r.br, s.sieveLimits())
		var se *errSieve
		switch {
		case errors.As(err, &se) && se.fatal:
			if se == errSieveTooLong {
				s.srv.o().Metrics.LimitHit("line_length")
			}
			s.setReason("protocol_error")
			s.writeString("BYE " + sieveQuote(se.text) + "\r\n")
			return nil
		case errors.As(err, &se):
			if !s.sieveBad(se.text) {
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
			if !s.sieveBad("Empty command") {
				return nil
			}
			continue
		}
		name := args[0].val
		if first && (args[0].quoted || isNotSieve(args)) {
			s.setReason("protocol_mismatch")
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
		switch name {
		case "CAPABILITY":
			if !s.writeString(s.sieveCaps() + `OK "Capability completed."` + "\r\n") {
				return nil
			}
		case "NOOP":
			resp := `OK "NOOP completed."`
			if len(args) == 2 && args[1].quoted {
				resp = "OK (TAG " + sieveQuote(args[1].val) + `) "Done."`
			}
			if !s.writeString(resp + "\r\n") {
				return nil
			}
		case "LOGOUT":
			s.setReason("logout")
			s.writeString(`OK "Logout completed."` + "\r\n")
			return nil
		case "STARTTLS":
			if !s.sieveStartTLS(ctx) {
				return nil
			}
		case "AUTHENTICATE":
			bl, end := s.sieveAuthenticate(ctx, args[1:])
			if end || bl != nil {
				return bl
			}
		default:
			if !s.sieveBad("Unknown command or not valid before login") {
				return nil
			}
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

func (s *session) sieveStartTLS(ctx context.Context) bool {
	if s.tls {
		return s.sieveBad("TLS is already active")
	}
	if s.srv.o().TLS == nil {
		return s.sieveBad("STARTTLS is not available")
	}
	if !s.writeString(`OK "Begin TLS negotiation now."` + "\r\n") {
		return false
	}
	if !s.upgradeTLS(ctx, "STARTTLS") {
		return false
	}
	// RFC 5804 2.2: the capabilities again, unasked, then OK.
	return s.writeString(s.sieveCaps() + `OK "TLS negotiation successful."` + "\r\n")
}

// sieveAuthenticate runs AUTHENTICATE "PLAIN" [initial-response].
func (s *session) sieveAuthenticate(ctx context.Context, args []sieveArg) (*backendLogin, bool) {
	if len(args) < 1 || len(args) > 2 || !args[0].quoted {
		return nil, !s.sieveBad(`AUTHENTICATE takes a quoted mechanism and an optional initial response`)
	}
	if !strings.EqualFold(args[0].val, sasl.Plain) || !s.offers(sasl.Plain) {
		return nil, !s.sieveNo("", "Unsupported authentication mechanism")
	}
	if !s.authAllowed() {
		return nil, !s.sieveNo("ENCRYPT-NEEDED", "Use STARTTLS before logging in")
	}
	var resp string
	if len(args) == 2 {
		resp = args[1].val
	} else {
		if !s.writeString("\"\"\r\n") {
			return nil, true
		}
		s.raw.SetReadDeadline(s.readDeadline())
		more, err := readSieveCommand(s.r.br, s.sieveLimits())
		if err != nil {
			s.setReason("protocol_error")
			return nil, true
		}
		if len(more) != 1 {
			return nil, !s.sieveBad("Expected a string")
		}
		if !more[0].quoted && more[0].val == "*" {
			return nil, !s.sieveNo("", "Authentication cancelled.")
		}
		resp = more[0].val
	}
	raw, err := base64.StdEncoding.DecodeString(resp)
	if err != nil {
		return nil, !s.sieveBad("Invalid base64")
	}
	cr, err := decodePlain(raw)
	if err != nil {
		return nil, !s.sieveBad(err.Error())
	}
	return s.sieveLogin(ctx, cr)
}

// sieveLogin routes the user, logs in to the backend's ManageSieve and
// answers the client: login() of session.go, in ManageSieve's words.
func (s *session) sieveLogin(ctx context.Context, cr credentials) (*backendLogin, bool) {
	m := s.srv.o().Metrics
	if strings.ContainsAny(cr.user+cr.pass+cr.authzid, "\x00\r\n") || cr.user == "" {
		m.Login("refused", "invalid_credentials")
		return nil, !s.sieveBad("Invalid characters in credentials")
	}
	user := routing.NormalizeUser(cr.routingUser())
	log := s.logger(zap.String("user", user), zap.String("mech", cr.mech), zap.String("protocol", "sieve"))
	res := s.runLogin(ctx, &cr, user, log, func(lctx context.Context, b *routing.Backend) (*backendLogin, error) {
		return s.srv.sieveLoginBackend(lctx, b, &cr, s.clientInfo())
	})
	switch res.end {
	case loginExpired:
		s.writeString(`BYE (TRYLATER) "Autologout; idle for too long"` + "\r\n")
		return nil, true
	case loginLimited:
		return s.sieveRefused(ctx, "TRYLATER", "Too many failed logins, try again later")
	case loginNoRoute:
		return nil, !s.sieveNo("TRYLATER", "No server is available for this account right now, try again later")
	case loginRefused:
		return s.sieveRefused(ctx, "", "Authentication failed.")
	case loginNotPlaced:
		return nil, !s.sieveNo("TRYLATER", "Your account is moving, please try again")
	case loginUnavailable:
		return nil, !s.sieveNo("TRYLATER", "The mail server is not reachable right now, try again later")
	case loginClientGone:
		return nil, true
	}
	bl := res.bl
	if !s.writeString(bl.caps + "\r\n") {
		bl.conn.Close()
		return nil, true
	}
	return bl, false
}

func (s *session) sieveRefused(ctx context.Context, code, text string) (*backendLogin, bool) {
	s.authFails++
	s.failureDelay(ctx)
	if s.authFails >= s.srv.o().Limits.MaxAuthFailures {
		s.srv.o().Metrics.LimitHit("auth_failures")
		s.setReason("auth_failures")
		s.sieveNo(code, text)
		s.writeString(`BYE "Too many login failures"` + "\r\n")
		return nil, true
	}
	return nil, !s.sieveNo(code, text)
}
