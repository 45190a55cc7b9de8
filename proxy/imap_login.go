package proxy

import (
	"context"

	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

// LOGIN (RFC 9051 6.2.3), and the IMAP words for every login's outcome
// (AUTHENTICATE ends here too). The steps every protocol shares (limits,
// route, backend login, commit) are runLogin's, login.go.

func (s *session) imapLogin(ctx context.Context, cmd *command) (*backendLogin, error) {
	if len(cmd.args) != 2 || !cmd.args[0].isString() || !cmd.args[1].isString() {
		return nil, imapBad("LOGIN takes a user name and a password")
	}
	return s.login(ctx, credentials{user: cmd.args[0].val, pass: cmd.args[1].val})
}

// login routes the user, logs in to the backend and returns the client's
// reply: OK with the backend's capabilities and the backend connection,
// or why not.
func (s *session) login(ctx context.Context, cr credentials) (*backendLogin, error) {
	if cr.mech == "" {
		cr.mech = "LOGIN"
	}
	m := s.srv.o().Metrics
	if !s.authAllowed() {
		m.Login("refused", "privacy_required")
		return nil, imapNo("PRIVACYREQUIRED", "Use STARTTLS before logging in")
	}
	if !cr.valid() {
		m.Login("refused", "invalid_credentials")
		return nil, imapClientBug("Invalid characters in credentials")
	}
	user := routing.NormalizeUser(cr.routingUser())
	log := s.logger(zap.String("user", user), zap.String("mech", cr.mech))
	res := s.runLogin(ctx, &cr, user, log, func(lctx context.Context, b *routing.Backend) (*backendLogin, error) {
		return s.srv.loginBackend(lctx, b, &cr, s.clientInfo(), s.readContinuation)
	})
	switch res.end {
	case loginExpired:
		return nil, imapBye("Autologout; idle for too long")
	case loginLimited:
		return nil, s.loginRefused(ctx, "LIMIT", "Too many failed logins, try again later")
	case loginNoRoute:
		return nil, imapUnavailable("No server is available for this account right now, try again later")
	case loginRefused:
		code := res.refused.code
		if code == "" {
			code = "AUTHENTICATIONFAILED"
		}
		return nil, s.loginRefused(ctx, code, res.refused.text)
	case loginNotPlaced:
		return nil, imapUnavailable("Your account is moving, please try again")
	case loginUnavailable:
		return nil, imapUnavailable("The mail server is not reachable right now, try again later")
	case loginClientGone:
		return nil, errClientGone
	}
	return res.bl, imapOK("CAPABILITY "+res.bl.caps, "Logged in")
}

// loginRefused is a failed login's reply, given after the failure delay;
// after too many on this connection it hangs up.
func (s *session) loginRefused(ctx context.Context, code, text string) *imapStatus {
	if text == "" {
		text = "Authentication failed."
	}
	st := imapNo(code, text)
	if s.countAuthFailure(ctx) {
		st.bye = "Too many login failures"
	}
	return st
}
