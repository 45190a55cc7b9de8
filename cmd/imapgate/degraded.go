package main

import (
	"context"
	"time"

	"github.com/imapgate/imapgate/internal/config"
	"go.uber.org/zap"
)

// A Consul router that started while Consul was unreachable serves from
// its snapshot (routing/consul/snapshot.go) until Consul is back: the
// instance is ready (known users route as before) but degraded, which
// /readyz says in its body (internal/admin) and imapgate_consul_degraded
// in a metric. Its registration waits for Consul too.

// snapshotAge is how old the snapshot the router serves from is; zero
// when it is not serving from one.
func (a *app) snapshotAge() time.Duration {
	if r, ok := a.router.(interface{ SnapshotAge() time.Duration }); ok {
		return r.SnapshotAge()
	}
	return 0
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
		if reg := a.reg1.Load(); reg != nil {
			reg.Keep(ctx, 5*time.Second)
		}
		return
	}
}
