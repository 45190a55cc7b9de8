package consul

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

// A route's life in the Consul router:
//
//	proposed   Route hashed or looked the user up; nothing is written.
//	committed  the backend accepted the login and Commit recorded the
//	           placement with check-and-set (or found it recorded); a
//	           lost race answers the winner, whose backend the proxy
//	           must use instead.
//	unrecorded Commit could not write (place_rate spent, Consul down or
//	           failing): the route is served and kept in c.unrec, retried
//	           in the background, and its sessions are evicted as soon as
//	           Route's answer for the user diverges from it.
//	evicted    the user's entry moved, was deleted, or their backend was
//	           gone past the grace: the Evictor closes the sessions that
//	           are now in the wrong place.

// unrecordedRetry is how often unrecorded routes are retried.
const unrecordedRetry = time.Second

// maxUnrecorded bounds the routes kept unrecorded; beyond it Commit
// refuses (the user is told to retry) rather than serve a route nobody
// would evict.
const maxUnrecorded = 100000

// unrecorded is a route served but not written to Consul.
type unrecorded struct {
	backend string
	at      time.Time
}

// Commit records that b accepted user's login and returns the backend the
// user must be served by: b, or the winner of a placement race (the
// caller drops b). It implements Committer.
func (c *Consul) Commit(ctx context.Context, user string, b *routing.Backend) (*routing.Backend, error) {
	key := routing.NormalizeUser(user)
	if key == "" || b == nil {
		return nil, fmt.Errorf("%w: nothing to commit", routing.ErrNoBackend)
	}
	v := c.view.Load()
	a, ok := c.lookup(v, key)
	if ok {
		if rb := v.routable[a.backend]; rb != nil {
			if rb.ID != b.ID {
				// Moved or placed elsewhere while this login ran.
				c.metrics.placements.WithLabelValues("raced").Inc()
			}
			return rb, nil
		}
		if a.pinned() {
			return nil, fmt.Errorf("%w: user is pinned to unavailable backend %q", routing.ErrNoBackend, a.backend)
		}
	}
	if v.routable[b.ID] == nil {
		return nil, fmt.Errorf("%w: backend %q is gone", routing.ErrNoBackend, b.ID)
	}
	if c.limit != nil && !c.limit.Allow() {
		c.metrics.placements.WithLabelValues("ratelimited").Inc()
		return c.serveUnrecorded(key, b)
	}
	if c.usersFailing() {
		// The watch cannot reach Consul: do not make the login wait
		// PlaceTimeout for a write that would fail.
		c.metrics.placements.WithLabelValues("unrecorded").Inc()
		return c.serveUnrecorded(key, b)
	}
	return c.record(ctx, key, b, a.index)
}

// record writes user → b with check-and-set over the entry's ModifyIndex
// over (0: no entry). If another instance won, its choice is returned.
func (c *Consul) record(ctx context.Context, user string, b *routing.Backend, over uint64) (*routing.Backend, error) {
	for range 3 {
		res, idx, winner, err := c.cas(ctx, user, b.ID, over)
		if err != nil && ctx.Err() != nil {
			return nil, fmt.Errorf("%w: %w", routing.ErrNoBackend, ctx.Err())
		}
		switch res {
		case casWriteFailed:
			c.metrics.placements.WithLabelValues("unrecorded").Inc()
			c.log.Warn("cannot record placement in consul; serving it unrecorded", zap.String("user", user),
				zap.String("backend", b.ID), zap.Error(err))
			return c.serveUnrecorded(user, b)
		case casReadFailed:
			// Lost the race and cannot read the winner: refusing is the
			// only way not to split the user over two backends.
			return nil, fmt.Errorf("%w: placement race lost and winner unreadable: %w", routing.ErrNoBackend, err)
		case casWon:
			c.remember(user, b.ID, idx)
			c.forgetUnrecorded(user, "")
			if over == 0 {
				c.metrics.placements.WithLabelValues("created").Inc()
			} else {
				c.metrics.placements.WithLabelValues("replaced").Inc()
			}
			return b, nil
		}
		c.metrics.placements.WithLabelValues("raced").Inc()
		if winner.ModifyIndex == 0 { // deleted in between
			over = 0
			continue
		}
		id := strings.TrimSpace(string(winner.Value))
		if wb := c.view.Load().routable[id]; wb != nil {
			c.remember(user, id, winner.ModifyIndex)
			return wb, nil
		}
		if winner.Flags&FlagPinned != 0 {
			return nil, fmt.Errorf("%w: user is pinned to unavailable backend %q", routing.ErrNoBackend, id)
		}
		over = winner.ModifyIndex
	}
	return nil, fmt.Errorf("%w: placement did not settle", routing.ErrNoBackend)
}

// serveUnrecorded keeps a route that could not be written, so that it is
// retried and evicted if Route's answer moves away from it.
func (c *Consul) serveUnrecorded(user string, b *routing.Backend) (*routing.Backend, error) {
	c.umu.Lock()
	defer c.umu.Unlock()
	if _, ok := c.unrec[user]; !ok && len(c.unrec) >= maxUnrecorded {
		return nil, fmt.Errorf("%w: too many placements waiting to be recorded", routing.ErrNoBackend)
	}
	c.unrec[user] = unrecorded{backend: b.ID, at: time.Now()}
	return b, nil
}

// forgetUnrecorded drops user's unrecorded route (if backend is not
// empty, only a route to that backend).
func (c *Consul) forgetUnrecorded(user, backend string) {
	c.umu.Lock()
	if e, ok := c.unrec[user]; ok && (backend == "" || e.backend == backend) {
		delete(c.unrec, user)
	}
	c.umu.Unlock()
}

// unrecordedRoutes returns a copy of the unrecorded routes.
func (c *Consul) unrecordedRoutes() map[string]unrecorded {
	c.umu.Lock()
	defer c.umu.Unlock()
	out := make(map[string]unrecorded, len(c.unrec))
	for u, e := range c.unrec {
		out[u] = e
	}
	return out
}

// viewChanged wakes the reconciler; buildView calls it (under c.mu).
func (c *Consul) viewChanged() {
	select {
	case c.changed <- struct{}{}:
	default:
	}
}

// reconcileLoop keeps the unrecorded routes honest: after every view
// change it evicts those Route no longer agrees with, and every
// unrecordedRetry it tries to record the others.
func (c *Consul) reconcileLoop(ctx context.Context) {
	defer c.wg.Done()
	t := time.NewTicker(unrecordedRetry)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.changed:
			c.reconcile()
		case <-t.C:
			c.reconcile()
			c.retryUnrecorded(ctx)
		}
	}
}

// reconcile evicts the sessions of unrecorded routes that Route's answer
// has left (a returning backend, a move, a placement by another
// instance), and forgets the routes that are now recorded.
func (c *Consul) reconcile() {
	routes := c.unrecordedRoutes()
	if len(routes) == 0 {
		return
	}
	v := c.view.Load()
	for user, e := range routes {
		want, a, err := c.answer(v, user)
		switch {
		case err != nil || want.ID != e.backend:
			c.forgetUnrecorded(user, e.backend)
			keep := ""
			if err == nil {
				keep = want.ID
			}
			c.log.Info("unrecorded route diverged; closing its sessions", zap.String("user", user),
				zap.String("served", e.backend), zap.String("now", keep))
			c.enqueueEviction(evictJob{user: user, keep: keep, kind: "user"})
		case a.backend == e.backend:
			c.forgetUnrecorded(user, e.backend) // recorded meanwhile
		}
	}
}

// retryUnrecorded tries to write the unrecorded routes Route still
// agrees with, within the placement rate.
func (c *Consul) retryUnrecorded(ctx context.Context) {
	routes := c.unrecordedRoutes()
	for user, e := range routes {
		if ctx.Err() != nil || c.usersFailing() {
			return
		}
		if c.limit != nil && !c.limit.Allow() {
			return
		}
		v := c.view.Load()
		want, a, err := c.answer(v, user)
		if err != nil || want.ID != e.backend {
			continue // reconcile evicts it
		}
		res, idx, _, err := c.cas(ctx, user, e.backend, a.index)
		switch res {
		case casWon:
			c.remember(user, e.backend, idx)
			c.forgetUnrecorded(user, e.backend)
			c.metrics.placements.WithLabelValues("recorded_late").Inc()
			c.log.Info("unrecorded route recorded", zap.String("user", user), zap.String("backend", e.backend))
		case casWriteFailed, casReadFailed:
			c.log.Debug("recording an unrecorded route failed again", zap.String("user", user), zap.Error(err))
			return
		}
		// Lost: the watch brings the winner and reconcile decides.
	}
}

// evictJob is one eviction decided by the router, run by evictLoop.
type evictJob struct {
	kind       string // "user" or "backend"
	user, keep string // kind user
	backend    string // kind backend
}

// enqueueEviction hands an eviction to evictLoop: the watches never wait
// for a client that does not read.
func (c *Consul) enqueueEviction(jobs ...evictJob) {
	if len(jobs) == 0 {
		return
	}
	c.evmu.Lock()
	c.evq = append(c.evq, jobs...)
	c.evmu.Unlock()
	select {
	case c.evWake <- struct{}{}:
	default:
	}
}

// maxEvictWorkers bounds the evictions that run at once.
const maxEvictWorkers = 64

// evictLoop runs the queued evictions, concurrently: one that waits for
// clients that do not read holds up no other.
func (c *Consul) evictLoop(ctx context.Context) {
	defer c.wg.Done()
	var running sync.WaitGroup
	defer running.Wait()
	sem := make(chan struct{}, maxEvictWorkers)
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.evWake:
		}
		c.evmu.Lock()
		jobs := c.evq
		c.evq = nil
		c.evmu.Unlock()
		if c.cfg.Evictor == nil {
			continue
		}
		for _, j := range jobs {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return
			}
			running.Go(func() {
				defer func() { <-sem }()
				c.evict(j)
			})
		}
	}
}

func (c *Consul) evict(j evictJob) {
	switch j.kind {
	case "backend":
		n := c.cfg.Evictor.EvictBackend(j.backend)
		c.metrics.evictions.WithLabelValues("backend").Add(float64(n))
		c.log.Info("backend sessions closed", zap.String("backend", j.backend), zap.Int("sessions", n))
	default:
		if n := c.cfg.Evictor.EvictUser(j.user, j.keep); n > 0 {
			c.metrics.evictions.WithLabelValues("user").Add(float64(n))
			c.log.Info("user moved; sessions closed", zap.String("user", j.user), zap.String("backend", j.keep), zap.Int("sessions", n))
		}
	}
}
