package main

import (
	"fmt"

	"github.com/imapgate/imapgate/internal/config"
	"github.com/imapgate/imapgate/routing"
	"github.com/prometheus/client_golang/prometheus"
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
	a.reg.MustRegister(directoryMetrics(r)...)
	return r, nil
}

// routerInForce is the router the app routes with, unwrapped from the
// reload wrapper if there is one.
func (a *app) routerInForce() any {
	if a.router == nil {
		return nil
	}
	var r any = a.router
	if s, ok := r.(interface{ get() routing.Router }); ok {
		return s.get()
	}
	return r
}

// directory is the http or ldap router in force, or nil.
func (a *app) directory() directoryRouter {
	d, _ := a.routerInForce().(directoryRouter)
	return d
}

// directoryMetrics exports the directory router's counters.
func directoryMetrics(r directoryRouter) []prometheus.Collector {
	c := func(name, help string, v func(routing.DirectoryStats) int64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, func() float64 { return float64(v(r.Stats())) })
	}
	return []prometheus.Collector{
		c("imapgate_directory_cache_hits_total", "Routes answered from the http/ldap router's cache.", func(s routing.DirectoryStats) int64 { return s.Hits }),
		c("imapgate_directory_lookups_total", "Routes that asked the directory (cache misses).", func(s routing.DirectoryStats) int64 { return s.Misses }),
		c("imapgate_directory_refusals_total", "Lookups the directory answered with a refusal (no such user).", func(s routing.DirectoryStats) int64 { return s.Refusals }),
		c("imapgate_directory_errors_total", "Lookups that failed (directory down, timeout, bad answer).", func(s routing.DirectoryStats) int64 { return s.Errors }),
		c("imapgate_directory_evicted_sessions_total", "Sessions closed because the directory named another backend for their user.", func(s routing.DirectoryStats) int64 { return s.Evictions }),
	}
}
