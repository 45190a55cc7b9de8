package proxy

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
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

// saslSteps reads a client's SASL responses, in any protocol: the
// initial response first (if the command had one), then one line per
// challenge. The protocol says how a challenge is sent and what the
// client is told when it cancels or sends what is not base64.
type saslSteps struct {
	ir    string
	hasIR bool
	// challenge sends a challenge (base64, "" for none) and reads the
	// answer line. Its error is the command's reply (errClientGone: the
	// session is over).
	challenge func(challenge string) (string, error)
	// cancelled is the reply to "*"; invalid builds the reply to a
	// response that cannot be used (text says why).
	cancelled error
	invalid   func(text string) error
}

// next returns the client's next decoded response ("=" is an empty one),
// or the reply that ends the exchange.
func (st *saslSteps) next(challenge string) ([]byte, error) {
	var resp string
	if st.hasIR {
		resp, st.hasIR = st.ir, false
	} else {
		line, err := st.challenge(challenge)
		if err != nil {
			return nil, err
		}
		resp = line
	}
	if resp == "*" {
		return nil, st.cancelled
	}
	raw, err := decodeSASL(resp)
	if err != nil {
		return nil, st.invalid(err.Error())
	}
	return raw, nil
}

// credentials runs mech's exchange (a known mechanism the listener
// offers) and returns what the client logs in with, or the reply that
// ended the exchange.
func (st *saslSteps) credentials(mech string) (credentials, error) {
	switch mech {
	case sasl.Login:
		user, err := st.next("VXNlcm5hbWU6") // "Username:"
		if err != nil {
			return credentials{}, err
		}
		pass, err := st.next("UGFzc3dvcmQ6") // "Password:"
		if err != nil {
			return credentials{}, err
		}
		return credentials{mech: sasl.Login, user: string(user), pass: string(pass)}, nil
	case sasl.Plain, mechXOAuth2, mechOAuthBearer:
		raw, err := st.next("")
		if err != nil {
			return credentials{}, err
		}
		var cr credentials
		if mech == sasl.Plain {
			cr, err = decodePlain(raw)
		} else {
			cr, err = decodeOAuth(mech, raw)
		}
		if err != nil {
			return credentials{}, st.invalid(err.Error())
		}
		return cr, nil
	}
	return credentials{}, fmt.Errorf("proxy: SASL mechanism %q has no exchange", mech)
}

// withoutIMAPCode drops the IMAP response code the SASL decoders put in
// their errors, for the protocols that have other codes.
func withoutIMAPCode(text string) string { return strings.TrimPrefix(text, "[CLIENTBUG] ") }

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
