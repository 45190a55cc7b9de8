package proxy

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"strings"

	"github.com/emersion/go-sasl"
)

// This file is AUTHENTICATE: PLAIN and LOGIN, whose credentials imapgate
// uses itself, and XOAUTH2 and OAUTHBEARER, whose tokens it relays to the
// backend (route by the identity inside, relay the backend's error
// challenge back). Every mechanism works with and without SASL-IR, and
// the client may cancel with "*".

const (
	mechXOAuth2     = "XOAUTH2"
	mechOAuthBearer = sasl.OAuthBearer
)

func knownMechanism(m string) bool {
	switch strings.ToUpper(m) {
	case sasl.Plain, sasl.Login, mechXOAuth2, mechOAuthBearer:
		return true
	}
	return false
}

// offers reports whether mech is offered to clients.
func (s *session) offers(mech string) bool {
	for _, m := range s.srv.o().Capabilities.AuthMechanisms {
		if strings.EqualFold(m, mech) {
			return true
		}
	}
	return false
}

// cmdAuthenticate runs AUTHENTICATE for every offered mechanism.
func (s *session) cmdAuthenticate(ctx context.Context, cmd *command) (*backendLogin, bool) {
	a := cmd.args
	if len(a) < 1 || len(a) > 2 || a[0].kind != tokAtom || (len(a) == 2 && !a[1].isString()) {
		return nil, !s.bad(cmd.tag, "AUTHENTICATE takes a mechanism and an optional initial response")
	}
	mech := strings.ToUpper(a[0].val)
	if !s.offers(mech) {
		s.srv.o().Metrics.Login("refused", "unsupported_mechanism")
		return nil, !s.writeString(cmd.tag + " NO [CANNOT] Unsupported authentication mechanism\r\n")
	}
	if !s.authAllowed() {
		s.srv.o().Metrics.Login("refused", "privacy_required")
		return nil, !s.writeString(cmd.tag + " NO [PRIVACYREQUIRED] Use STARTTLS before logging in\r\n")
	}
	step := saslSteps{s: s, tag: cmd.tag}
	if len(a) == 2 {
		step.ir, step.hasIR = a[1].val, true
	}
	var cr credentials
	switch mech {
	case sasl.Plain:
		raw, ok, end := step.next("")
		if !ok {
			return nil, end
		}
		var err error
		if cr, err = decodePlain(raw); err != nil {
			return nil, !s.bad(cmd.tag, err.Error())
		}
	case sasl.Login:
		user, ok, end := step.next("VXNlcm5hbWU6") // "Username:"
		if !ok {
			return nil, end
		}
		pass, ok, end := step.next("UGFzc3dvcmQ6") // "Password:"
		if !ok {
			return nil, end
		}
		cr = credentials{mech: sasl.Login, user: string(user), pass: string(pass)}
	case mechXOAuth2, mechOAuthBearer:
		raw, ok, end := step.next("")
		if !ok {
			return nil, end
		}
		var err error
		if cr, err = decodeOAuth(mech, raw); err != nil {
			return nil, !s.bad(cmd.tag, err.Error())
		}
	}
	return s.login(ctx, cmd.tag, cr)
}

// saslSteps reads a client's SASL responses: the initial response first
// (if the command had one), then one line per challenge.
type saslSteps struct {
	s     *session
	tag   string
	ir    string
	hasIR bool
}

// next returns the client's next decoded response. ok=false means the
// exchange is over (cancelled or invalid, already answered); end=true
// means the session must close.
func (st *saslSteps) next(challenge string) (raw []byte, ok, end bool) {
	s := st.s
	var resp string
	if st.hasIR {
		resp, st.hasIR = st.ir, false
	} else {
		line, err := s.readContinuation(challenge)
		if err != nil {
			return nil, false, true
		}
		resp = line
	}
	if resp == "*" {
		return nil, false, !s.writeString(st.tag + " BAD Authentication cancelled\r\n")
	}
	raw, err := decodeSASL(resp)
	if err != nil {
		return nil, false, !s.bad(st.tag, err.Error())
	}
	return raw, true, false
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

var errClientGone = errors.New("client gone")

// decodeSASL decodes a base64 SASL response ("=" is an empty one).
func decodeSASL(resp string) ([]byte, error) {
	if resp == "=" {
		return []byte{}, nil
	}
	raw, err := base64.StdEncoding.DecodeString(resp)
	if err != nil {
		return nil, errors.New("[CLIENTBUG] Invalid base64 in authentication response")
	}
	return raw, nil
}

// decodePlain parses a PLAIN response (RFC 4616).
func decodePlain(raw []byte) (credentials, error) {
	var cr credentials
	srv := sasl.NewPlainServer(func(identity, username, password string) error {
		cr = credentials{user: username, pass: password, mech: sasl.Plain}
		if identity != username {
			cr.authzid = identity
		}
		return nil
	})
	if _, _, err := srv.Next(raw); err != nil || cr.user == "" {
		return credentials{}, errors.New("[CLIENTBUG] Invalid PLAIN authentication response")
	}
	return cr, nil
}

// decodeOAuth parses an XOAUTH2 or OAUTHBEARER (RFC 7628) response for
// the identity to route by; the response itself is relayed unchanged.
func decodeOAuth(mech string, raw []byte) (credentials, error) {
	cr := credentials{mech: mech, oauth: raw}
	fields := bytes.Split(raw, []byte{1})
	if mech == mechOAuthBearer {
		// gs2-header: "n,a=user,": channel binding is not supported.
		gs2, rest, ok := bytes.Cut(raw, []byte{1})
		parts := strings.Split(string(gs2), ",")
		if !ok || len(parts) < 3 || (parts[0] != "n" && parts[0] != "y") {
			return cr, errors.New("[CLIENTBUG] Invalid OAUTHBEARER response")
		}
		if a, ok := strings.CutPrefix(parts[1], "a="); ok {
			cr.user = strings.NewReplacer("=2C", ",", "=3D", "=").Replace(a)
		}
		fields = bytes.Split(rest, []byte{1})
	}
	var token string
	for _, f := range fields {
		k, v, _ := strings.Cut(string(f), "=")
		switch k {
		case "user":
			if mech == mechXOAuth2 {
				cr.user = v
			}
		case "auth":
			token = v
		}
	}
	if cr.user == "" {
		return cr, errors.New("[CLIENTBUG] The OAuth response names no user (XOAUTH2 user=, OAUTHBEARER a=)")
	}
	if !strings.HasPrefix(token, "Bearer ") || len(token) == len("Bearer ") {
		return cr, errors.New("[CLIENTBUG] The OAuth response carries no bearer token")
	}
	if strings.ContainsAny(cr.user, "\x00\r\n") || strings.ContainsAny(token, "\x00\r\n") {
		return cr, errors.New("[CLIENTBUG] Invalid characters in the OAuth response")
	}
	return cr, nil
}
