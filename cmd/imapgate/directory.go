package main

import (
	"fmt"

	"github.com/imapgate/imapgate/internal/admin"
	"github.com/imapgate/imapgate/internal/config"
	"github.com/imapgate/imapgate/routing"
)

// directoryRouter is what the app needs of the http and ldap routers
// (routing/http.go, routing/ldap.go): routing and committing (which
// records nothing), the operator's view (routing.Operator: the backends
// named so far, Where), their counters, and Forget, so that a kick makes
// the next login ask the directory again.
type directoryRouter interface {
	routing.Router
	routing.Committer
	routing.Operator
	Stats() routing.DirectoryStats
	Forget(user string)
	Close()
}

var (
	_ directoryRouter = (*routing.HTTP)(nil)
	_ directoryRouter = (*routing.LDAP)(nil)
)

// newDirectoryRouter builds cfg's http or ldap router; sessions that a
// fresh answer puts in the wrong place are evicted through ev. Its
// metrics are registered and it is closed with the app.
func (a *app) newDirectoryRouter(cfg *config.Config, ev routing.Evictor) (directoryRouter, error) {
	var r directoryRouter
	switch cfg.Routing.Router {
	case config.RouterHTTP:
		hc, err := cfg.HTTPRouterConfig()
		if err != nil {
			return nil, fmt.Errorf("http router: %w", err)
		}
		hc.Directory.Evictor, hc.Directory.Logger = ev, a.log.Named("http-router")
		if r, err = routing.NewHTTP(hc); err != nil {
			return nil, fmt.Errorf("http router: %w", err)
		}
	case config.RouterLDAP:
		lc, err := cfg.LDAPRouterConfig()
		if err != nil {
			return nil, fmt.Errorf("ldap router: %w", err)
		}
		lc.Directory.Evictor, lc.Directory.Logger = ev, a.log.Named("ldap-router")
		if r, err = routing.NewLDAP(lc); err != nil {
			return nil, fmt.Errorf("ldap router: %w", err)
		}
	default:
		return nil, fmt.Errorf("routing.router %v is not a directory router", cfg.Routing.Router)
	}
	a.closers = append(a.closers, r.Close)
	admin.RegisterDirectory(a.reg, r.Stats)
	return r, nil
}
