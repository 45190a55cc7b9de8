package consul

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

const (
	// retryMin is the first back-off after a failed Consul query.
	retryMin = 250 * time.Millisecond
	// kvMinInterval spaces KV listings so that a burst of placements
	// (each of which changes the prefix's index) costs one listing of the
	// users, not one per placement. It adds at most this much to how long
	// a move takes to reach every instance.
	kvMinInterval = 250 * time.Millisecond
	// kvPerUser stretches the interval between listings of the users with
	// their number: a listing costs each instance (and the Consul server)
	// several microseconds per user, so this keeps a storm of new users
	// from spending more than about a third of a core on listings. 100,000
	// users: one listing per 2s at most.
	kvPerUser = 20 * time.Microsecond
	// staleAfter is how old a stale read may be before it is reported.
	staleAfter = 5 * time.Second
)

// watchHealth tracks whether one watch currently hears from Consul.
type watchHealth struct {
	okAt    atomic.Int64 // unix nanoseconds of the last good answer
	failing atomic.Bool
	stale   atomic.Bool
}

func (h *watchHealth) age() time.Duration {
	if !h.failing.Load() {
		return 0
	}
	return time.Since(time.Unix(0, h.okAt.Load()))
}

// blockingTimeout bounds one blocking query: Consul answers within
// WaitTime plus up to WaitTime/16 of jitter, so a query that takes much
// longer is talking to a partitioned agent.
func (c *Consul) blockingTimeout() time.Duration {
	return c.cfg.WaitTime + c.cfg.WaitTime/16 + 10*time.Second
}

// nextIndex applies Consul's rules for blocking-query indexes: start over
// if the index went backwards (a restored or restarted cluster), never
// block on zero.
func nextIndex(prev, got uint64) uint64 {
	switch {
	case got < prev:
		return 0
	case got == 0:
		return 1
	}
	return got
}

// noteMeta reports stale or leaderless answers.
func (c *Consul) noteMeta(watch string, h *watchHealth, meta *api.QueryMeta) {
	stale := !meta.KnownLeader || meta.LastContact > staleAfter
	if stale {
		c.metrics.stale.WithLabelValues(watch).Inc()
	}
	if h.stale.Swap(stale) != stale {
		if stale {
			c.log.Warn("consul answers are stale (no leader or lagging server); serving them",
				zap.String("watch", watch), zap.Bool("known_leader", meta.KnownLeader), zap.Duration("last_contact", meta.LastContact))
		} else {
			c.log.Info("consul answers are fresh again", zap.String("watch", watch))
		}
	}
}

func (c *Consul) noteResult(watch string, h *watchHealth, err error) {
	now := time.Now()
	if err == nil {
		if h.failing.Swap(false) {
			c.log.Info("consul reachable again", zap.String("watch", watch),
				zap.Duration("outage", now.Sub(time.Unix(0, h.okAt.Load()))))
		}
		h.okAt.Store(now.UnixNano())
		return
	}
	if errors.Is(err, context.Canceled) {
		// Close stopped the watch: not a Consul failure.
		return
	}
	c.metrics.watchErrors.WithLabelValues(watch).Inc()
	if !h.failing.Swap(true) {
		c.log.Warn("consul query failed; serving the last view", zap.String("watch", watch), zap.Error(err))
	} else {
		c.log.Debug("consul query failed again", zap.String("watch", watch), zap.Error(err))
	}
}

// fetchCatalog runs one (blocking, unless index is 0) health query for
// the service and applies a changed answer. It returns the next index.
func (c *Consul) fetchCatalog(ctx context.Context, index uint64) (uint64, error) {
	ctx, cancel := context.WithTimeout(ctx, c.blockingTimeout())
	defer cancel()
	q := &api.QueryOptions{AllowStale: true, WaitIndex: index, WaitTime: c.cfg.WaitTime}
	entries, meta, err := c.client.Health().Service(c.cfg.Service, c.cfg.Tag, false, q.WithContext(ctx))
	c.noteResult("catalog", &c.catalogHealth, err)
	if err != nil {
		return index, err
	}
	c.noteMeta("catalog", &c.catalogHealth, meta)
	if index != 0 && meta.LastIndex == index {
		return index, nil // the wait ended without a change
	}
	c.mu.Lock()
	c.applyCatalog(entries, time.Now())
	c.mu.Unlock()
	return nextIndex(index, meta.LastIndex), nil
}

// fetchKV runs one (blocking, unless index is 0) listing of a KV
// sub-prefix, applies a changed answer and closes the sessions of moved
// users. It returns the next index.
func (c *Consul) fetchKV(ctx context.Context, kind kvKind, index uint64) (uint64, error) {
	h := &c.kvHealth[kind]
	initial := h.okAt.Load() == 0 // first load: nothing to diff against
	ctx, cancel := context.WithTimeout(ctx, c.blockingTimeout())
	defer cancel()
	start := time.Now()
	q := &api.QueryOptions{AllowStale: true, WaitIndex: index, WaitTime: c.cfg.WaitTime}
	pairs, meta, err := c.client.KV().List(c.cfg.Prefix+"/"+kind.String()+"/", q.WithContext(ctx))
	c.noteResult(kind.String(), h, err)
	if err != nil {
		return index, err
	}
	c.noteMeta(kind.String(), h, meta)
	if index != 0 && meta.LastIndex == index {
		return index, nil
	}
	if err := c.takeListing(ctx, kind, pairs, meta.LastIndex, initial, start); err != nil {
		c.noteResult(kind.String(), h, err)
		return index, err
	}
	return nextIndex(index, meta.LastIndex), nil
}

// takeListing applies a (possibly stale) listing of kind taken at index,
// unless it is older than the one applied last: a lagging server's answer
// could undo a move already applied (and evict the new sessions). Then
// the leader is asked, and what it says is applied even if it is behind
// too (a restored cluster).
func (c *Consul) takeListing(ctx context.Context, kind kvKind, pairs api.KVPairs, index uint64, initial bool, start time.Time) error {
	if c.behind(kind, index) {
		c.metrics.stale.WithLabelValues(kind.String()).Inc()
		c.log.Info("ignoring a consul listing older than the one applied; asking the leader",
			zap.String("watch", kind.String()), zap.Uint64("index", index))
		q := &api.QueryOptions{RequireConsistent: true}
		var meta *api.QueryMeta
		var err error
		start = time.Now()
		if pairs, meta, err = c.client.KV().List(c.cfg.Prefix+"/"+kind.String()+"/", q.WithContext(ctx)); err != nil {
			return err
		}
		index = meta.LastIndex
	}
	c.applyListing(kind, pairs, index, initial, start)
	return nil
}

// behind reports whether a listing at index is older than the last one
// applied for kind.
func (c *Consul) behind(kind kvKind, index uint64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return index < c.kvApplied[kind]
}

// applyListing applies a listing of kind taken at index (started at
// listStart) and queues the evictions it implies.
func (c *Consul) applyListing(kind kvKind, pairs api.KVPairs, index uint64, initial bool, listStart time.Time) {
	c.mu.Lock()
	c.kvApplied[kind] = index
	ev := c.applyKV(kind, pairs, initial)
	c.mu.Unlock()
	if kind == kvUsers {
		c.pruneOverlay(listStart)
		c.evictUsers(ev)
	}
}

// pruneOverlay drops this instance's placements that the view now holds
// (or that were deleted since: the listing started after they were made).
func (c *Consul) pruneOverlay(listStart time.Time) {
	if c.overlayN.Load() == 0 {
		return
	}
	v := c.view.Load()
	c.overlay.Range(func(k, o any) bool {
		e := o.(*overlayEntry)
		if v.users[k.(string)].index >= e.minIdx || listStart.After(e.at) {
			if c.overlay.CompareAndDelete(k, o) {
				c.overlayN.Add(-1)
			}
		}
		return true
	})
}

func (c *Consul) evictUsers(ev []kvEviction) {
	if len(ev) == 0 {
		return
	}
	hold := time.Now().Add(c.cfg.MoveHold)
	jobs := make([]evictJob, 0, len(ev))
	var here map[string]bool // users with sessions here, if an entry was deleted
	for _, e := range ev {
		if e.deleted && e.keep != "" {
			// The sessions left on keep are served without a record now:
			// track them like any unrecorded route, so that they are
			// recorded again or evicted if the hash moves.
			if here == nil {
				here = c.routedHere()
			}
			if here[e.user] {
				c.serveUnrecorded(e.user, &routing.Backend{ID: e.keep})
			}
		}
		if e.deleted && e.keep != "" && !e.moved {
			continue // its sessions on other backends: none to close but strays
		}
		if e.moved && c.cfg.MoveHold > 0 {
			if _, loaded := c.holds.Swap(e.user, hold); !loaded {
				c.holdN.Add(1)
			}
		}
		jobs = append(jobs, evictJob{kind: "user", user: e.user, keep: e.keep})
	}
	c.enqueueEviction(jobs...)
	c.log.Debug("user entries changed in consul", zap.Int("users", len(ev)))
}

// routedHere returns the users the Evictor has sessions of (nil if it
// cannot list them).
func (c *Consul) routedHere() map[string]bool {
	l, ok := c.cfg.Evictor.(routing.UserLister)
	if !ok {
		return map[string]bool{}
	}
	out := map[string]bool{}
	for _, u := range l.RoutedUsers() {
		out[u] = true
	}
	return out
}

// catalogLoop keeps the backend states current until ctx ends.
func (c *Consul) catalogLoop(ctx context.Context, index uint64) {
	c.follow(ctx, index, c.fetchCatalog, nil)
}

// kvLoop keeps one kind of KV state current until ctx ends, at most one
// listing per kvInterval(kind).
func (c *Consul) kvLoop(ctx context.Context, kind kvKind, index uint64) {
	fetch := func(ctx context.Context, index uint64) (uint64, error) { return c.fetchKV(ctx, kind, index) }
	c.follow(ctx, index, fetch, func() time.Duration { return c.kvInterval(kind) })
}

// follow runs a blocking query (fetch, from index; it returns the index
// to wait on next) until ctx ends, the loop of every watch but the change
// feed's. A failure backs off, doubling from retryMin up to RetryMax, and
// re-syncs with a plain read: a restarted (or restored) cluster may be
// behind our index and would hold a blocking query until it catches up.
// With interval set, two answers are at least interval() apart.
func (c *Consul) follow(ctx context.Context, index uint64, fetch func(context.Context, uint64) (uint64, error), interval func() time.Duration) {
	defer c.wg.Done()
	backoff := retryMin
	for {
		start := time.Now()
		next, err := fetch(ctx, index)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			if !sleepCtx(ctx, backoff) {
				return
			}
			backoff, index = min(2*backoff, c.cfg.RetryMax), 0
			continue
		}
		backoff, index = retryMin, next
		c.noteCaughtUp()
		if interval != nil && !sleepCtx(ctx, interval()-time.Since(start)) {
			return
		}
	}
}

// kvInterval is the least time between two listings of kind.
func (c *Consul) kvInterval(kind kvKind) time.Duration {
	if kind != kvUsers {
		return kvMinInterval
	}
	return max(kvMinInterval, time.Duration(len(c.view.Load().users))*kvPerUser)
}

// graceLoop declares backends gone once they have been down for longer
// than the grace, and closes their sessions.
func (c *Consul) graceLoop(ctx context.Context) {
	defer c.wg.Done()
	t := time.NewTicker(min(max(c.cfg.Grace/10, 50*time.Millisecond), time.Second))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			c.mu.Lock()
			gone := c.expireGrace(now)
			c.mu.Unlock()
			c.pruneHolds(now)
			for _, id := range gone {
				c.enqueueEviction(evictJob{kind: "backend", backend: id})
			}
		}
	}
}

// pruneHolds forgets move holds that have ended.
func (c *Consul) pruneHolds(now time.Time) {
	if c.holdN.Load() == 0 {
		return
	}
	c.holds.Range(func(k, v any) bool {
		if now.After(v.(time.Time)) && c.holds.CompareAndDelete(k, v) {
			c.holdN.Add(-1)
		}
		return true
	})
}

// sleepCtx sleeps for d (nothing if d <= 0) and reports whether ctx is
// still alive.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
