package main

import (
	"context"
	"fmt"

	"github.com/imapgate/imapgate/routing/consul"

	"github.com/imapgate/imapgate/internal/admin"
	"github.com/imapgate/imapgate/internal/config"
	"github.com/imapgate/imapgate/proxy"
	"github.com/imapgate/imapgate/routing"
)

// placement is what the binary needs of its router: routing (and
// committing) logins, and the operator's operations. Every router the
// binary runs is one; the rules live in package routing.
type placement interface {
	routing.Router
	routing.Committer
	routing.Operator
}

// newRouter builds the router cfg names. ev closes the sessions the
// router decides are in the wrong place.
func (a *app) newRouter(ctx context.Context, cfg *config.Config, ev *proxy.LateEvictor) (placement, error) {
	switch cfg.Routing.Router {
	case config.RouterStatic:
		sc, err := cfg.StaticConfig()
		if err != nil {
			return nil, err
		}
		t, err := routing.NewTable(sc, ev, a.log.Named("routing"))
		if err != nil {
			return nil, fmt.Errorf("routing: %w", err)
		}
		return t, nil
	case config.RouterConsul:
		cc, err := cfg.ConsulRouter()
		if err != nil {
			return nil, err
		}
		cc.Evictor, cc.Logger, cc.Registerer = ev, a.log.Named("consul"), a.reg
		c, err := consul.NewConsul(ctx, cc)
		if err != nil {
			return nil, fmt.Errorf("consul router: %w", err)
		}
		a.closers = append(a.closers, func() { c.Close() })
		return c, nil
	case config.RouterHTTP:
		hc, err := cfg.HTTPRouterConfig()
		if err != nil {
			return nil, fmt.Errorf("http router: %w", err)
		}
		hc.Directory.Evictor, hc.Directory.Logger = ev, a.log.Named("http-router")
		r, err := routing.NewHTTP(hc)
		if err != nil {
			return nil, fmt.Errorf("http router: %w", err)
		}
		return a.directory(r), nil
	case config.RouterLDAP:
		lc, err := cfg.LDAPRouterConfig()
		if err != nil {
			return nil, fmt.Errorf("ldap router: %w", err)
		}
		lc.Directory.Evictor, lc.Directory.Logger = ev, a.log.Named("ldap-router")
		r, err := routing.NewLDAP(lc)
		if err != nil {
			return nil, fmt.Errorf("ldap router: %w", err)
		}
		return a.directory(r), nil
	}
	return nil, fmt.Errorf("routing.router: unknown router %v", cfg.Routing.Router)
}

// directoryRouter is an http or ldap router (routing/http.go,
// routing/ldap.go): the admin API also asks it for its counters and to
// Forget a kicked user, so that the next login asks the directory again.
type directoryRouter interface {
	placement
	Stats() routing.DirectoryStats
	Forget(user string)
	Close()
}

var (
	_ directoryRouter = (*routing.HTTP)(nil)
	_ directoryRouter = (*routing.LDAP)(nil)
)

// directory registers a directory router's counters and closes it with
// the app.
func (a *app) directory(r directoryRouter) placement {
	a.closers = append(a.closers, r.Close)
	admin.RegisterDirectory(a.reg, r.Stats)
	return r
}
