package proxy

import (
	"context"
	"strings"

	"github.com/imapgate/imapgate/routing"
)

// routeContext is ctx carrying the login being routed (routing.Login), for
// routers that ask a service wanting it: nginx's auth_http protocol sends
// the mechanism, the attempt number, the client's address and, when
// configured, the password. The static and Consul routers ignore it.
func (s *session) routeContext(ctx context.Context, cr *credentials) context.Context {
	return routing.WithLogin(ctx, routing.Login{
		Password: cr.pass,
		Method:   strings.ToLower(cr.mech),
		Protocol: s.lst.Protocol.String(),
		Attempt:  s.authFails + 1,
		Client:   s.remote.Addr(),
	})
}
