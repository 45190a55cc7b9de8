package proxy

import (
	"context"
	"errors"
	"strings"

	"github.com/emersion/go-sasl"
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
	step := saslSteps{s: s}
	if len(a) == 2 {
		step.ir, step.hasIR = a[1].val, true
	}
	var cr credentials
	switch mech {
	case sasl.Plain:
		raw, err := step.next("")
		if err != nil {
			return nil, err
		}
		if cr, err = decodePlain(raw); err != nil {
			return nil, imapBad(err.Error())
		}
	case sasl.Login:
		user, err := step.next("VXNlcm5hbWU6") // "Username:"
		if err != nil {
			return nil, err
		}
		pass, err := step.next("UGFzc3dvcmQ6") // "Password:"
		if err != nil {
			return nil, err
		}
		cr = credentials{mech: sasl.Login, user: string(user), pass: string(pass)}
	case mechXOAuth2, mechOAuthBearer:
		raw, err := step.next("")
		if err != nil {
			return nil, err
		}
		if cr, err = decodeOAuth(mech, raw); err != nil {
			return nil, imapBad(err.Error())
		}
	}
	return s.login(ctx, cr)
}

// saslSteps reads a client's SASL responses: the initial response first
// (if the command had one), then one line per challenge.
type saslSteps struct {
	s     *session
	ir    string
	hasIR bool
}

// next returns the client's next decoded response, or the command's
// reply when the exchange is over (cancelled, invalid, or the client
// gone: errClientGone).
func (st *saslSteps) next(challenge string) ([]byte, error) {
	var resp string
	if st.hasIR {
		resp, st.hasIR = st.ir, false
	} else {
		line, err := st.s.readContinuation(challenge)
		if err != nil {
			return nil, errClientGone
		}
		resp = line
	}
	if resp == "*" {
		return nil, &imapStatus{typ: "BAD", text: "Authentication cancelled", uncounted: true}
	}
	raw, err := decodeSASL(resp)
	if err != nil {
		return nil, imapBad(err.Error())
	}
	return raw, nil
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
