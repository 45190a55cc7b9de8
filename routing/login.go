package routing

import (
	"context"
	"fmt"
	"net/netip"
)

// Login is what the proxy knows about the login it is routing. It travels
// in the Route context (WithLogin) for routers that ask a service which
// wants it, as nginx's auth_http protocol does; the static and Consul
// routers ignore it. Operator lookups (the status page, ctl) carry none.
type Login struct {
	// Password is the client's password. Never logged (String redacts
	// it); a router sends it on only when configured to.
	Password string
	// Method is the lower-case mechanism: "login" (the LOGIN command or
	// AUTHENTICATE LOGIN), "plain", ...
	Method string
	// Protocol is "imap", "pop3", ...
	Protocol string
	// Attempt counts the logins on this connection, from 1.
	Attempt int
	// Client is the client's address (after PROXY protocol); the zero
	// Addr when unknown.
	Client netip.Addr
}

// String describes l without its password.
func (l Login) String() string {
	return fmt.Sprintf("%s %s attempt %d from %v", l.Protocol, l.Method, l.Attempt, l.Client)
}

type loginKey struct{}

// WithLogin returns ctx carrying l.
func WithLogin(ctx context.Context, l Login) context.Context {
	return context.WithValue(ctx, loginKey{}, l)
}

// LoginFrom returns the Login in ctx, if any.
func LoginFrom(ctx context.Context) (Login, bool) {
	l, ok := ctx.Value(loginKey{}).(Login)
	return l, ok
}
