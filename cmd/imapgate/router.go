package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/imapgate/imapgate/routing"
)

// swapRouter is the Router the proxy is built with. The proxy keeps its
// Router for its whole life, so this indirection is what lets SIGHUP
// replace the routing table without a restart.
type swapRouter struct{ cur atomic.Pointer[routerBox] }

// routerBox wraps the interface so that it fits an atomic.Pointer.
type routerBox struct{ r routing.Router }

var _ routing.Router = (*swapRouter)(nil)

func newSwapRouter(r routing.Router) *swapRouter {
	s := &swapRouter{}
	s.set(r)
	return s
}

func (s *swapRouter) set(r routing.Router) { s.cur.Store(&routerBox{r}) }
func (s *swapRouter) get() routing.Router  { return s.cur.Load().r }

// Route asks the router in force.
func (s *swapRouter) Route(ctx context.Context, user string) (*routing.Backend, error) {
	return s.get().Route(ctx, user)
}

// Commit commits through the router in force if it records placements.
func (s *swapRouter) Commit(ctx context.Context, user string, b *routing.Backend) (*routing.Backend, error) {
	r := s.get()
	if c, ok := r.(routing.Committer); ok {
		return c.Commit(ctx, user, b)
	}
	if got, err := r.Route(ctx, user); err == nil {
		return got, nil // the user may have moved during the login
	}
	return b, nil
}

// String describes the router in force for logs.
func (s *swapRouter) String() string { return fmt.Sprint(s.get()) }

// errLastInPool refuses a drain that would leave a pool with nobody to
// place its users on.
var errLastInPool = errors.New("last undrained backend of a pool")

// errUnknownBackend is a drain or move naming a backend the router does
// not know.
var errUnknownBackend = errors.New("unknown backend")

// staticRouter is the static router plus an in-memory set of drained
// backends, which routing.Static has no notion of. A user whose home (by
// hash) is drained goes to the next backend of their pool, as rendezvous
// hashing would place them if the drained one were gone, unless:
//   - they are pinned to it ([routing.users]): pins win, as in Consul;
//   - they have a live session on it through this instance: a user must
//     never be served by two backends at once, so they stay until they
//     have no session left (or are kicked).
//
// The drained set is per instance and lost on restart: with several
// imapgates and the static router, drain each of them.
type staticRouter struct {
	// live reports whether user has a spliced session on backend here. It
	// is only called for users whose home is drained.
	live func(user, backend string) bool

	mu      sync.Mutex // serializes drain changes; routes read st
	st      atomic.Pointer[staticState]
	drained map[string]bool
}

// staticState is one immutable routing table.
type staticState struct {
	cfg     routing.StaticConfig
	full    *routing.Static // the table as configured
	avoid   *routing.Static // drained backends out of every pool; nil if none drained
	drained map[string]bool
}

var _ routing.Router = (*staticRouter)(nil)

func newStaticRouter(cfg routing.StaticConfig, live func(user, backend string) bool) (*staticRouter, error) {
	r := &staticRouter{live: live, drained: map[string]bool{}}
	if err := r.setConfig(cfg); err != nil {
		return nil, err
	}
	return r, nil
}

// setConfig replaces the table, keeping the drained backends that still
// exist.
func (r *staticRouter) setConfig(cfg routing.StaticConfig) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	drained := map[string]bool{}
	for id := range r.drained {
		if _, ok := cfg.Backends[id]; ok {
			drained[id] = true
		}
	}
	st, err := buildStatic(cfg, drained)
	if errors.Is(err, errLastInPool) {
		// The new table has a pool made only of drained backends: forget
		// the drains rather than refuse a table the operator wrote.
		drained = map[string]bool{}
		st, err = buildStatic(cfg, drained)
	}
	if err != nil {
		return err
	}
	r.drained = drained
	r.st.Store(st)
	return nil
}

// setDrain drains or undrains backend id.
func (r *staticRouter) setDrain(id string, on bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.st.Load()
	if _, ok := st.cfg.Backends[id]; !ok {
		return fmt.Errorf("%w %q", errUnknownBackend, id)
	}
	drained := maps.Clone(r.drained)
	if on {
		drained[id] = true
	} else {
		delete(drained, id)
	}
	nst, err := buildStatic(st.cfg, drained)
	if err != nil {
		return err
	}
	r.drained = drained
	r.st.Store(nst)
	return nil
}

func (r *staticRouter) isDrained(id string) bool { return r.st.Load().drained[id] }

// backends returns the configured backends sorted by ID.
func (r *staticRouter) backends() []*routing.Backend {
	cfg := r.st.Load().cfg
	return slices.SortedFunc(maps.Values(cfg.Backends), func(a, b *routing.Backend) int {
		return strings.Compare(a.ID, b.ID)
	})
}

// buildStatic builds the routers for cfg with the drained backends taken
// out of every pool. routing.NewStatic keeps and may modify the Backends
// it is given, so each router gets the same pointers (IDs are filled in on
// the first build and then left alone).
func buildStatic(cfg routing.StaticConfig, drained map[string]bool) (*staticState, error) {
	full, err := routing.NewStatic(cfg)
	if err != nil {
		return nil, err
	}
	st := &staticState{cfg: cfg, full: full, drained: maps.Clone(drained)}
	if len(drained) == 0 {
		return st, nil
	}
	keep := func(pool string, ids []string) ([]string, error) {
		out := slices.DeleteFunc(slices.Clone(ids), func(id string) bool { return drained[id] })
		if len(out) == 0 {
			return nil, fmt.Errorf("%w: every backend of the %s would be drained", errLastInPool, pool)
		}
		return out, nil
	}
	acfg := routing.StaticConfig{Backends: cfg.Backends, Users: cfg.Users, Domains: map[string][]string{}}
	def := cfg.Default
	if len(def) == 0 {
		def = slices.Sorted(maps.Keys(cfg.Backends))
	}
	if acfg.Default, err = keep("default pool", def); err != nil {
		return nil, err
	}
	for d, ids := range cfg.Domains {
		if acfg.Domains[d], err = keep("pool of domain "+d, ids); err != nil {
			return nil, err
		}
	}
	if st.avoid, err = routing.NewStatic(acfg); err != nil {
		return nil, err
	}
	return st, nil
}

// Route routes by the configured table, around drained backends.
func (r *staticRouter) Route(ctx context.Context, user string) (*routing.Backend, error) {
	st := r.st.Load()
	b, err := st.full.Route(ctx, user)
	if err != nil || st.avoid == nil || !st.drained[b.ID] {
		return b, err
	}
	if r.live != nil && r.live(user, b.ID) {
		return b, nil
	}
	// Pinned users keep their pin: the avoid table has the same pins.
	return st.avoid.Route(ctx, user)
}

// String describes r for logs.
func (r *staticRouter) String() string {
	st := r.st.Load()
	if n := len(st.drained); n > 0 {
		return fmt.Sprintf("%v, %d drained", st.full, n)
	}
	return st.full.String()
}
