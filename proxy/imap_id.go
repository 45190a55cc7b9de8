package proxy

import "context"

// ID (RFC 2971): the client's fields are kept, bounded, and forwarded to
// the backend with the client's address (forwardedID, session.go); the
// answer names imapgate, not the backend.

// maxIDFields and friends bound the client's ID (RFC 2971 limits).
const (
	maxIDFields   = 30
	maxIDKeyLen   = 30
	maxIDValueLen = 1024
)

func (s *session) imapID(_ context.Context, cmd *command) (*backendLogin, error) {
	a := cmd.args
	var fields []string
	switch {
	case len(a) == 1 && a[0].isNil():
	case len(a) >= 2 && a[0].kind == tokLParen && a[len(a)-1].kind == tokRParen && len(a)%2 == 0:
		for i := 1; i+1 < len(a)-1; i += 2 {
			k, v := a[i], a[i+1]
			if !k.isString() || k.kind == tokAtom || !(v.isString() || v.isNil()) {
				return nil, imapBad("ID takes a list of string pairs or NIL")
			}
			if len(fields)/2 >= maxIDFields || len(k.val) > maxIDKeyLen || len(v.val) > maxIDValueLen {
				return nil, imapBad("ID field too long or too many fields")
			}
			if v.isNil() && v.kind == tokAtom {
				continue
			}
			fields = append(fields, k.val, v.val)
		}
	default:
		return nil, imapBad("ID takes a list of string pairs or NIL")
	}
	s.clientID = fields
	s.queue(`ID ("name" "imapgate" "vendor" "imapgate")`)
	return nil, nil
}
