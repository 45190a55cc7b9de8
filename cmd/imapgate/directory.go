package main

import (
	"context"
	"fmt"

	"github.com/imapgate/imapgate/internal/config"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

// directoryRouter is what the app needs of the http and ldap routers
// (routing/http.go, routing/ldap.go): routing, the operator's view
// (routing.Operator: the backends they have named so far, Where), their
// counters, and Forget, so that a kick makes the next login ask the
// directory again.
type directoryRouter interface {
	routing.Router
	routing.Operator
	Stats() routing.DirectoryStats
	Forget(user string)
	Close()
}

var (
	_ directoryRouter = (*routing.HTTP)(nil)
	_ directoryRouter = (*routing.LDAP)(nil)
)

// newDirectoryRouter builds the http or ldap router of cfg. Sessions a
// fresh answer puts in the wrong place are evicted through ev.
func newDirectoryRouter(cfg *config.Config, ev routing.Evictor, log *zap.Logger) (directoryRouter, error) {
	switch cfg.Routing.Router {
	case "http":
		hc, err := cfg.HTTPRouterConfig()
		if err != nil {
			return nil, err
		}
		hc.Directory.Evictor, hc.Directory.Logger = ev, log.Named("http-router")
		return routing.NewHTTP(hc)
	case "ldap":
		lc, err := cfg.LDAPRouterConfig()
		if err != nil {
			return nil, err
		}
		lc.Directory.Evictor, lc.Directory.Logger = ev, log.Named("ldap-router")
		return routing.NewLDAP(lc)
	}
	return nil, fmt.Errorf("routing.router %q is not a directory router", cfg.Routing.Router)
}

// setDirectoryRouter makes a's router the http or ldap router of cfg.
func (a *app) setDirectoryRouter(cfg *config.Config) error {
	r, err := newDirectoryRouter(cfg, a.evictor, a.log)
	if err != nil {
		return fmt.Errorf("%s router: %w", cfg.Routing.Router, err)
	}
	a.dir = r
	a.router = newSwapRouter(r)
	a.closers = append(a.closers, r.Close)
	return nil
}

// directoryBackends lists the backends a directory router knows: the
// configured ones and those it was told about. It has no health of its
// own: the directory is the truth.
func directoryBackends(r directoryRouter) []backendInfo {
	var out []backendInfo
	for _, b := range r.Backends(context.Background()) {
		out = append(out, backendInfo{
			ID: b.ID, Addr: b.Addr, Security: b.Security.String(), Weight: max(b.Weight, 1),
			Health: "directory", Up: true,
		})
	}
	return out
}
