package proxy

import (
	"context"
	"errors"
	"strings"
)

// AUTHENTICATE (RFC 9051 6.2.2): PLAIN and LOGIN, whose credentials
// imapgate uses itself, and XOAUTH2 and OAUTHBEARER, whose tokens it
// relays to the backend (route by the identity inside, relay the
// backend's error challenge back). Every mechanism works with and
// without SASL-IR, and the client may cancel with "*". The decoding is
// sasl.go's, shared with POP3 and ManageSieve.

func (s *session) imapAuthenticate(ctx context.Context, cmd *command) (*backendLogin, error) {
	a := cmd.args
	if len(a) < 1 || len(a) > 2 || a[0].kind != tokAtom || (len(a) == 2 && !a[1].isString()) {
		return nil, imapBad("AUTHENTICATE takes a mechanism and an optional initial response")
	}
	mech := strings.ToUpper(a[0].val)
	if !s.offers(mech) {
		s.srv.o().Metrics.Login("refused", "unsupported_mechanism")
		return nil, imapNo("CANNOT", "Unsupported authentication mechanism")
	}
	if !s.authAllowed() {
		s.srv.o().Metrics.Login("refused", "privacy_required")
		return nil, imapNo("PRIVACYREQUIRED", "Use STARTTLS before logging in")
	}
	step := saslSteps{
		challenge: func(challenge string) (string, error) {
			line, err := s.readContinuation(challenge)
			if err != nil {
				return "", errClientGone // answered already
			}
			return line, nil
		},
		cancelled: &imapStatus{typ: "BAD", text: "Authentication cancelled", uncounted: true},
		invalid:   func(text string) error { return imapBad(text) },
	}
	if len(a) == 2 {
		step.ir, step.hasIR = a[1].val, true
	}
	cr, err := step.credentials(mech)
	if err != nil {
		return nil, err
	}
	return s.login(ctx, cr)
}

// readContinuation sends "+ challenge" and reads the client's answer line.
// Errors have been dealt with (BYE, reason) when it returns one.
func (s *session) readContinuation(challenge string) (string, error) {
	if !s.writeString("+ " + challenge + "\r\n") {
		return "", errClientGone
	}
	s.raw.SetReadDeadline(s.readDeadline())
	line, err := s.r.readLine()
	if err != nil {
		var pe *protoError
		if errors.As(err, &pe) {
			s.setEnd(EndProtocolError)
			s.writeString("* BYE " + pe.Error() + "\r\n")
			return "", err
		}
		s.endOnReadError(err)
		return "", err
	}
	return string(line), nil
}
