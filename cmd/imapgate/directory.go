package main

import (
	"context"
	"fmt"

	"github.com/imapgate/imapgate/internal/config"
	"github.com/imapgate/imapgate/routing"
	"github.com/prometheus/client_golang/prometheus"
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
	a.reg.MustRegister(directoryMetrics(r)...)
	return nil
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
