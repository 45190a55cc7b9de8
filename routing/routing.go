// Package routing decides which backend IMAP server owns a user.
//
// imapgate's proxy asks a Router for the backend of every user that logs
// in, and dials whatever it is told. Routers map a user name to a *Backend
// and nothing else (the password reaches one only through WithLogin, and
// only the http router, when configured, sends it on). Four routers exist:
//
//   - Static (static.go): per-user and per-domain entries from the config
//     file plus rendezvous hashing over a default pool. It is the embedded
//     default and needs no other service. The binary runs it as a Table
//     (table.go), which adds reloads and the operator's drains and moves.
//   - Consul (subpackage consul): backends from the Consul catalog,
//     per-user placements in Consul KV, so every imapgate instance agrees.
//     It lives apart so that this package, and the proxy that imports it,
//     pull in neither Consul's API nor Prometheus.
//   - HTTP (http.go): asks a service speaking nginx's auth_http protocol.
//   - LDAP (ldap.go): reads the backend host from the user's directory
//     entry, as Dovecot's proxy does. Both cache answers (directory.go).
//
// Typical use:
//
//	r, err := routing.NewStatic(routing.StaticConfig{...})
//	b, err := r.Route(ctx, "alice@example.org")
//	conn, err := net.Dial("tcp", b.Addr)
//	// ... the backend accepted the login:
//	if c, ok := r.(routing.Committer); ok {
//		b2, err := c.Commit(ctx, "alice@example.org", b) // b2 != b: drop conn
//	}
//
// A user must never be served by two backends at once, so a router that
// changes its mind about a user (an operator moved them, their backend
// died) tells an Evictor, which closes the live sessions that are now in the
// wrong place. Route only proposes; Commit records (see Committer). Every
// router the binary runs implements Operator (operator.go), the one
// interface the admin API and `imapgate ctl` use. README.md states the
// invariant and how each router keeps it.
package routing

import (
	"context"
	"crypto/tls"
	"errors"
	"strings"
)

// Security says how imapgate talks to a backend.
type Security uint8

const (
	// SecurityNone is cleartext TCP, for backends on a trusted network.
	SecurityNone Security = iota
	// SecurityTLS is implicit TLS (the 993 style).
	SecurityTLS
	// SecurityStartTLS is cleartext followed by the STARTTLS command.
	SecurityStartTLS
)

// String returns the config-file spelling of s.
func (s Security) String() string {
	switch s {
	case SecurityNone:
		return "none"
	case SecurityTLS:
		return "tls"
	case SecurityStartTLS:
		return "starttls"
	}
	return "unknown"
}

// ParseSecurity parses the config-file spelling of a Security: "none" (or
// empty), "tls" or "starttls".
func ParseSecurity(s string) (Security, error) {
	switch strings.ToLower(s) {
	case "", "none", "plain", "cleartext":
		return SecurityNone, nil
	case "tls", "implicit", "imaps":
		return SecurityTLS, nil
	case "starttls":
		return SecurityStartTLS, nil
	}
	return 0, errors.New("routing: unknown backend security " + `"` + s + `"` + ` (want "none", "tls" or "starttls")`)
}

// Backend is one IMAP server imapgate may send users to. A *Backend handed
// out by a Router is shared and must not be modified.
type Backend struct {
	// ID identifies the backend in logs, metrics and Consul (a service ID or
	// a config-file name). Never shown to clients.
	ID string
	// Addr is the host:port to dial.
	Addr string
	// Security is how to talk to it.
	Security Security
	// TLS is the client-side TLS config for SecurityTLS and
	// SecurityStartTLS (root CAs, ServerName, InsecureSkipVerify). If nil,
	// the system roots are used and the server name is Addr's host.
	TLS *tls.Config
	// Weight is the backend's share in hashing. Zero means 1.
	Weight int
	// ProxyProtocol, if 1 or 2, makes imapgate send a PROXY protocol
	// header of that version first on every connection to this backend,
	// so it sees the client's address. Zero means none.
	ProxyProtocol int

	// POP3Addr, SieveAddr and LMTPAddr are the host:port of the same
	// server's POP3, ManageSieve and LMTP services (Addr is IMAP): one
	// backend identity, so a user's every protocol lands on the same
	// mailboxes. Empty means the backend does not serve that protocol.
	// See protocols.go and AddrFor.
	POP3Addr, SieveAddr, LMTPAddr string
	// LMTPSecurity is how imapgate talks LMTP to the backend; LMTP mostly
	// runs in cleartext on a trusted network, so it is separate from
	// Security (which POP3 and ManageSieve share with IMAP). Zero means
	// cleartext.
	LMTPSecurity Security
}

// Router finds the backend that owns a user. Route must be safe for
// concurrent use and must not block on the network in the common case:
// it sits on every login's path.
type Router interface {
	// Route returns the backend for user. It returns an error wrapping
	// ErrNoBackend when no backend can take the user.
	Route(ctx context.Context, user string) (*Backend, error)
}

// RouterFunc adapts a function to the Router interface.
type RouterFunc func(ctx context.Context, user string) (*Backend, error)

// Route calls f.
func (f RouterFunc) Route(ctx context.Context, user string) (*Backend, error) { return f(ctx, user) }

// Committer is implemented by routers that record placements (Consul).
// Route only proposes a backend; the proxy calls Commit once that backend
// has accepted the user (the IMAP, POP3 or ManageSieve login said OK, or
// the LMTP backend accepted the RCPT), so that an unauthenticated or
// unknown name never becomes shared state.
//
// Commit returns the backend the user must be served by. It is b when the
// placement is recorded (or was already), or when it cannot be recorded
// now (Consul down, rate limit): the router then tracks the unrecorded
// route and evicts its sessions if a later answer diverges. It is another
// backend when a concurrent placement won: the caller must drop its
// connection to b and not serve the user there. An error wraps
// ErrNoBackend when the router cannot say where the user belongs; the
// caller must not serve the user.
type Committer interface {
	Commit(ctx context.Context, user string, b *Backend) (*Backend, error)
}

// ErrNoBackend means no backend is available for a user: none configured,
// none healthy, or the user's backend is gone and they cannot be placed.
var ErrNoBackend = errors.New("routing: no backend available")

// Evictor closes live sessions that a router no longer sends to where they
// are. The proxy's Server implements it.
type Evictor interface {
	// EvictUser closes user's sessions on every backend except keepID
	// (empty keepID: all of them) and returns how many it closed.
	EvictUser(user, keepID string) int
	// EvictBackend closes every session on the backend with this ID.
	EvictBackend(id string) int
}

// NormalizeUser returns the routing key for a login name: trimmed and
// lower-cased, so "Alice@Example.org" and "alice@example.org" always land
// on the same backend.
func NormalizeUser(user string) string {
	return strings.ToLower(strings.TrimSpace(user))
}

// Domain returns the part of user after the last '@', or "".
func Domain(user string) string {
	if i := strings.LastIndexByte(user, '@'); i >= 0 {
		return user[i+1:]
	}
	return ""
}
