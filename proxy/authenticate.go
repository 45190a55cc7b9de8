package proxy

import (
	"context"
	"encoding/base64"
	"errors"
	"strings"

	"github.com/emersion/go-sasl"
)

// cmdAuthenticate runs AUTHENTICATE PLAIN, with or without an initial
// response (SASL-IR); the client may cancel with "*".
func (s *session) cmdAuthenticate(ctx context.Context, cmd *command) (*backendLogin, bool) {
	a := cmd.args
	if len(a) < 1 || len(a) > 2 || a[0].kind != tokAtom || (len(a) == 2 && !a[1].isString()) {
		return nil, !s.bad(cmd.tag, "AUTHENTICATE takes a mechanism and an optional initial response")
	}
	if mech := strings.ToUpper(a[0].val); mech != sasl.Plain {
		s.srv.opts.Metrics.Login("refused", "unsupported_mechanism")
		return nil, !s.writeString(cmd.tag + " NO [CANNOT] Unsupported authentication mechanism\r\n")
	}
	if !s.authAllowed() {
		s.srv.opts.Metrics.Login("refused", "privacy_required")
		return nil, !s.writeString(cmd.tag + " NO [PRIVACYREQUIRED] Use STARTTLS before logging in\r\n")
	}
	var resp string
	if len(a) == 2 {
		resp = a[1].val
	} else {
		if !s.writeString("+ \r\n") {
			return nil, true
		}
		s.raw.SetReadDeadline(s.readDeadline())
		line, err := s.r.readLine()
		if err != nil {
			var pe *protoError
			if errors.As(err, &pe) {
				s.setReason("protocol_error")
				s.writeString("* BYE " + pe.Error() + "\r\n")
				return nil, true
			}
			s.endOnReadError(err)
			return nil, true
		}
		resp = string(line)
	}
	if resp == "*" {
		return nil, !s.writeString(cmd.tag + " BAD Authentication cancelled\r\n")
	}
	cr, err := decodePlain(resp)
	if err != nil {
		return nil, !s.bad(cmd.tag, err.Error())
	}
	return s.login(ctx, cmd.tag, cr)
}

// decodePlain decodes a base64 SASL PLAIN response ("=" is an empty one).
func decodePlain(resp string) (credentials, error) {
	if resp == "=" {
		resp = ""
	}
	raw, err := base64.StdEncoding.DecodeString(resp)
	if err != nil {
		return credentials{}, errors.New("[CLIENTBUG] Invalid base64 in authentication response")
	}
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
