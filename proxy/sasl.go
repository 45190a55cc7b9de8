package proxy

import (
	"bytes"
	"encoding/base64"
	"errors"
	"strings"

	"github.com/emersion/go-sasl"
)

// This file is the SASL every front end shares (IMAP AUTHENTICATE,
// imap_authenticate.go; POP3 AUTH; ManageSieve AUTHENTICATE): PLAIN and
// LOGIN, whose credentials imapgate uses itself, and XOAUTH2 and
// OAUTHBEARER, whose tokens it relays to the backend (routed by the
// identity inside).

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

// errClientGone ends a login or a command whose client went away (or was
// kicked): the session is over, its end reason recorded.
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
