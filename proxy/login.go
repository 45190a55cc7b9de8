package proxy

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

// This file is the part of a login that is the same in every protocol:
// the failure limits, the route, the backend login and the commit. Each
// front end (IMAP: imap_login.go, POP3: pop3.go, ManageSieve: sieve.go)
// checks the credentials' form, calls runLogin with its own backend login,
// and answers the loginResult in its protocol's words.

// loginEnd is how the shared part of a login ended.
type loginEnd uint8

const (
	// loginOK: the backend accepted the user and the route is committed;
	// the session holds the backend connection.
	loginOK loginEnd = iota
	// loginLimited: too many recent failures; the backend was not asked.
	loginLimited
	// loginExpired: waiting for the limits outlived the login state.
	loginExpired
	// loginNoRoute: the router has no backend for the user.
	loginNoRoute
	// loginRefused: the backend said no to the credentials.
	loginRefused
	// loginNotPlaced: a backend accepted the user but the router placed
	// them elsewhere (a placement race, a move during the login).
	loginNotPlaced
	// loginUnavailable: the backend could not be reached or failed.
	loginUnavailable
	// loginClientGone: the client left, or the session was kicked.
	loginClientGone
)

// loginResult is what runLogin decided.
type loginResult struct {
	end     loginEnd
	bl      *backendLogin        // loginOK: the logged-in backend connection
	refused *backendRefusedError // loginRefused: the backend's answer
}

// backendLoginFunc logs in to b in one protocol.
type backendLoginFunc func(ctx context.Context, b *routing.Backend) (*backendLogin, error)

// runLogin takes the user through the failure limits (limits.go: tokens
// are reserved before the backend is asked, so logins in flight cannot
// overdraw them), then the three steps of every login: route (the router
// proposes a backend, and the session becomes evictable, so a move during
// the login cannot leave the user on the old backend), backend login
// (the protocol's own, login), and commit (commit.go: the router records
// the placement, or says the user lives elsewhere now). It logs and
// counts every outcome; the caller only answers the client.
func (s *session) runLogin(ctx context.Context, cr *credentials, user string, log *zap.Logger, login backendLoginFunc) loginResult {
	s.loginStart = time.Now()
	defer busy()()
	// The login's context ends with the Not Authenticated state.
	lctx, cancel := context.WithDeadline(ctx, s.deadline)
	defer cancel()
	att, res, ok := s.reserveLogin(lctx, user, log)
	if !ok {
		return res
	}
	s.setState(StateLogin)

	t0 := time.Now()
	b, err := s.route(lctx, cr, user)
	if err != nil {
		att.abandoned()
		s.setState(StatePreAuth)
		s.srv.o().Metrics.Login("unavailable", "no_route")
		log.Warn("login failed: no route", zap.Error(err))
		return loginResult{end: loginNoRoute}
	}
	bl, err := login(lctx, b)
	if err == nil {
		err = s.srv.commitRoute(lctx, user, b, bl.conn)
	}
	if err != nil {
		s.unroute(user)
		return s.loginFailed(att, b, err, log)
	}
	return s.loggedIn(att, b, bl, cr, log, t0)
}

// reserveLogin asks the failure limits for a token. ok=false: the login
// ends here with res.
func (s *session) reserveLogin(lctx context.Context, user string, log *zap.Logger) (att *loginAttempt, res loginResult, ok bool) {
	m := s.srv.o().Metrics
	att, err := s.srv.limiters.Load().begin(lctx, s.network, user)
	if err != nil {
		if !errors.Is(err, errLoginLimited) {
			s.setEnd(EndLoginTimeout)
			return nil, loginResult{end: loginExpired}, false
		}
		m.LimitHit("auth_failure_rate")
		m.Login("refused", "rate_limited")
		log.Warn("login refused: too many recent failures", zap.Stringer("network", s.network))
		return nil, loginResult{end: loginLimited}, false
	}
	if att.slowed() {
		m.LimitHit("user_slowdown")
		log.Info("login slowed: many recent failures for this user from unknown networks", zap.Stringer("network", s.network))
	}
	return att, loginResult{}, true
}

// route asks the router for user's backend and, once it has one, puts
// the session in the per-user index: from here on it is evictable.
func (s *session) route(lctx context.Context, cr *credentials, user string) (*routing.Backend, error) {
	t0 := time.Now()
	b, err := s.srv.o().Router.Route(s.routeContext(lctx, cr), user)
	s.srv.o().Metrics.RouteLookup(time.Since(t0), err == nil)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.backend, s.user = b, user
	s.mu.Unlock()
	s.srv.index(s, user)
	return b, nil
}

// unroute undoes route after a failed backend login or commit.
func (s *session) unroute(user string) {
	s.srv.unindex(s, user)
	s.mu.Lock()
	s.backend, s.user = nil, ""
	s.mu.Unlock()
	s.setState(StatePreAuth)
}

// loginFailed settles the reservation of a login that b or the commit
// refused, and says which loginEnd it was.
func (s *session) loginFailed(att *loginAttempt, b *routing.Backend, err error, log *zap.Logger) loginResult {
	m := s.srv.o().Metrics
	var refused *backendRefusedError
	switch {
	case errors.As(err, &refused):
		att.failed()
		m.Login("refused", "backend_no")
		log.Info("login failed", zap.String("backend", b.ID), zap.String("reason", refused.Error()), zap.Int("failures", s.authFails+1))
		return loginResult{end: loginRefused, refused: refused}
	case errors.Is(err, errClientGone):
		att.abandoned()
		return loginResult{end: loginClientGone}
	case errors.Is(err, errNotPlaced):
		att.succeeded() // the credentials were right
		m.Login("unavailable", "not_placed")
		log.Info("login refused: user placed elsewhere", zap.String("backend", b.ID), zap.Error(err))
		return loginResult{end: loginNotPlaced}
	}
	att.abandoned()
	m.Login("unavailable", "backend_error")
	log.Warn("login failed: backend unavailable", zap.String("backend", b.ID),
		zap.String("backend_addr", b.AddrFor(s.lst.Protocol)), zap.Error(err))
	return loginResult{end: loginUnavailable}
}

// loggedIn hands the session the committed backend connection, unless
// it was kicked meanwhile.
func (s *session) loggedIn(att *loginAttempt, b *routing.Backend, bl *backendLogin, cr *credentials, log *zap.Logger, t0 time.Time) loginResult {
	att.succeeded()
	s.mu.Lock()
	if s.closed { // kicked while logging in
		s.mu.Unlock()
		bl.conn.Close()
		return loginResult{end: loginClientGone}
	}
	s.bconn = bl.conn
	s.mu.Unlock()
	s.srv.o().Metrics.Login("ok", strings.ToLower(cr.mech))
	log.Info("login", zap.String("backend", b.ID), zap.Duration("took", time.Since(t0)))
	return loginResult{end: loginOK, bl: bl}
}
