package main

import (
	"context"
	"fmt"
	"time"

	"github.com/imapgate/imapgate/internal/config"
	"github.com/imapgate/imapgate/routing/consul"
	"go.uber.org/zap"
)

// imapgate's own Consul registration ([consul.register]): one service
// instance per listener, checked on /readyz, removed first thing when a
// drain starts. A Consul router that started while Consul was unreachable
// serves from its snapshot (degraded, as /readyz says), and the
// registration waits for Consul in the background.

// register announces this instance in Consul when configured.
func (a *app) register(ctx context.Context, specs []config.ListenerSpec) error {
	cfg := a.cfg.Load()
	reg, ok := cfg.Registration(specs, a.lnAddrs, a.httpAddr)
	if !ok {
		return nil
	}
	client, err := cfg.ConsulClient()
	if err != nil {
		return err
	}
	r, err := consul.NewRegistration(ctx, client, reg, a.log.Named("consul"))
	if err != nil {
		return fmt.Errorf("consul registration: %w", err)
	}
	a.registration.Store(r)
	a.log.Info("registered in consul", zap.String("service", reg.Name), zap.String("id", reg.ID))
	return nil
}

// deregister removes the Consul registration, once; the keep-alive stops
// with it (a draining instance must stay out of the catalog).
func (a *app) deregister() {
	r := a.registration.Swap(nil)
	if r == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := r.Deregister(ctx); err != nil {
		a.log.Warn("consul deregistration failed", zap.Error(err))
		return
	}
	a.log.Info("deregistered from consul")
}

// registerLater registers the instance in Consul once Consul answers,
// when the start-up registration failed because the router started from
// its snapshot; then it keeps the registration as start does.
func (a *app) registerLater(ctx context.Context, specs []config.ListenerSpec) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if a.draining.Load() {
			return
		}
		if err := a.register(ctx, specs); err != nil {
			a.log.Debug("consul registration failed again", zap.Error(err))
			continue
		}
		if a.draining.Load() { // drained while registering: stay out
			a.deregister()
			return
		}
		if reg := a.registration.Load(); reg != nil {
			reg.Keep(ctx, 5*time.Second)
		}
		return
	}
}
