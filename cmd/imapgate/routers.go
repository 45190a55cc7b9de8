package main

import (
	"context"
	"fmt"
	"sync/atomic"

	"github.com/imapgate/imapgate/routing/consul"

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
func (a *app) newRouter(ctx context.Context, cfg *config.Config, ev *lateEvictor) (placement, error) {
	switch cfg.Routing.Router {
	case "", "static":
		sc, err := cfg.StaticConfig()
		if err != nil {
			return nil, err
		}
		t, err := routing.NewTable(sc, ev, a.log.Named("routing"))
		if err != nil {
			return nil, fmt.Errorf("routing: %w", err)
		}
		return t, nil
	case "consul":
		bt, err := cfg.BackendTLS()
		if err != nil {
			return nil, err
		}
		watch, err := consul.ParseUsersWatch(cfg.Consul.UsersWatch)
		if err != nil {
			return nil, fmt.Errorf("consul.users_watch: %w", err)
		}
		c, err := consul.NewConsul(ctx, consul.ConsulConfig{
			Address:    cfg.Consul.Address,
			Token:      cfg.Consul.Token,
			Datacenter: cfg.Consul.Datacenter,
			Service:    cfg.Consul.Service,
			Tag:        cfg.Consul.Tag,
			Prefix:     cfg.Consul.Prefix,
			BackendTLS: bt,
			Evictor:    ev,
			Grace:      cfg.Consul.Grace.D(),
			PlaceRate:  cfg.Consul.PlaceRate,
			UsersWatch: watch,
			CacheSize:  cfg.Consul.CacheSize,
			// A start while Consul is unreachable serves from this.
			SnapshotFile:   cfg.Consul.SnapshotPath(),
			SnapshotMaxAge: cfg.Consul.SnapshotMaxAge.D(),
			Logger:         a.log.Named("consul"),
			Registerer:     a.reg,
		})
		if err != nil {
			return nil, fmt.Errorf("consul router: %w", err)
		}
		a.closers = append(a.closers, func() { c.Close() })
		return c, nil
	case "http", "ldap":
		return a.newDirectoryRouter(cfg, ev)
	}
	return nil, fmt.Errorf("routing.router: unknown router %q", cfg.Routing.Router)
}

// routerKind is the configured router's name: "static", "consul",
// "http" or "ldap".
func routerKind(cfg *config.Config) string {
	if cfg.Routing.Router == "" {
		return "static"
	}
	return cfg.Routing.Router
}

// lateEvictor lets the router, built before the proxy, evict sessions of
// the proxy built after it.
type lateEvictor struct{ srv atomic.Pointer[proxy.Server] }

var (
	_ routing.Evictor    = (*lateEvictor)(nil)
	_ routing.UserLister = (*lateEvictor)(nil)
)

func (l *lateEvictor) EvictUser(user, keep string) int {
	if s := l.srv.Load(); s != nil {
		return s.EvictUser(user, keep)
	}
	return 0
}

func (l *lateEvictor) EvictBackend(id string) int {
	if s := l.srv.Load(); s != nil {
		return s.EvictBackend(id)
	}
	return 0
}

func (l *lateEvictor) RoutedUsers() []string {
	if s := l.srv.Load(); s != nil {
		return s.RoutedUsers()
	}
	return nil
}
