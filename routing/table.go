package routing

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"go.uber.org/zap"
)

// Table is the static router as the binary runs it: a Static table that
// a reload replaces, plus the operator's in-memory drains and moves. It
// implements Router, Committer (a re-check of the answer) and Operator.
//
// Route is a pure function of (table, drained set, moves): every instance
// with the same file, the same drains and the same moves agrees, and no
// answer depends on the sessions an instance happens to hold (that is
// what split users over instances). So a drain is an evacuation: the
// users whose home is drained go to the next backend of their pool, and
// their sessions on the drained backend are closed; an undrain brings
// them back the same way. Drains and moves are per instance and lost on
// restart: apply them to every instance (or write them in the file).
//
// After every change (SetConfig, SetDrain, Move) the sessions whose user
// now routes elsewhere are closed through the Evictor.
type Table struct {
	ev  Evictor // nil: nothing closed
	log *zap.Logger

	mu sync.Mutex // serialises changes; Route reads st
	st atomic.Pointer[tableState]
}

// tableState is one immutable routing table.
type tableState struct {
	cfg     StaticConfig
	full    *Static         // the table as configured
	avoid   *Static         // drained backends out of every pool; nil if none drained
	drained map[string]bool // by ID
	moves   map[string]*Backend
}

var (
	_ Router    = (*Table)(nil)
	_ Committer = (*Table)(nil)
	_ Operator  = (*Table)(nil)
)

// NewTable validates cfg and returns its Table. ev closes sessions after
// a change (nil: none are closed); it should also implement UserLister,
// or only the users it is told about can be checked. log may be nil.
func NewTable(cfg StaticConfig, ev Evictor, log *zap.Logger) (*Table, error) {
	if log == nil {
		log = zap.NewNop()
	}
	t := &Table{ev: ev, log: log}
	st, err := buildTable(cfg, nil, nil)
	if err != nil {
		return nil, err
	}
	t.st.Store(st)
	return t, nil
}

// SetEvictor sets the Evictor (the proxy is built after its router).
func (t *Table) SetEvictor(ev Evictor) {
	t.mu.Lock()
	t.ev = ev
	t.mu.Unlock()
}

// SetConfig replaces the table (a reload), keeping the drains and moves
// that still name known backends, and closes the sessions whose user now
// routes elsewhere. It returns how many it closed.
func (t *Table) SetConfig(ctx context.Context, cfg StaticConfig) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	old := t.st.Load()
	drained := map[string]bool{}
	for id := range old.drained {
		if _, ok := cfg.Backends[id]; ok {
			drained[id] = true
		}
	}
	moves := map[string]*Backend{}
	for u, b := range old.moves {
		if _, ok := cfg.Backends[b.ID]; ok {
			moves[u] = cfg.Backends[b.ID]
		}
	}
	st, err := buildTable(cfg, drained, moves)
	if errors.Is(err, ErrLastInPool) {
		// The new table has a pool made only of drained backends: forget
		// the drains rather than refuse a table the operator wrote.
		t.log.Warn("reload: a pool would be fully drained; forgetting the drains")
		st, err = buildTable(cfg, nil, moves)
	}
	if err != nil {
		return 0, err
	}
	t.st.Store(st)
	return t.evictMisrouted(ctx), nil
}

// SetDrain drains or undrains backend id (see Table for what that means)
// and closes the sessions now in the wrong place.
func (t *Table) SetDrain(ctx context.Context, id string, on bool) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	st := t.st.Load()
	if _, ok := st.cfg.Backends[id]; !ok {
		return fmt.Errorf("%w %q", ErrUnknownBackend, id)
	}
	drained := map[string]bool{}
	maps.Copy(drained, st.drained)
	if on {
		drained[id] = true
	} else {
		delete(drained, id)
	}
	nst, err := buildTable(st.cfg, drained, st.moves)
	if err != nil {
		return err
	}
	t.st.Store(nst)
	n := t.evictMisrouted(ctx)
	t.log.Info("backend drain changed", zap.String("backend", id), zap.Bool("drain", on), zap.Int("sessions_closed", n))
	return nil
}

// Move pins user to backend id on this instance (until restart; write it
// in [routing.users] to keep it) and closes their sessions elsewhere.
func (t *Table) Move(ctx context.Context, user, id string) error {
	key := NormalizeUser(user)
	if key == "" {
		return errors.New("routing: move: empty user name")
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	st := t.st.Load()
	b, ok := st.cfg.Backends[id]
	if !ok {
		return fmt.Errorf("%w %q", ErrUnknownBackend, id)
	}
	moves := map[string]*Backend{key: b}
	maps.Copy(moves, st.moves)
	moves[key] = b
	nst, err := buildTable(st.cfg, st.drained, moves)
	if err != nil {
		return err
	}
	t.st.Store(nst)
	if t.ev != nil {
		t.ev.EvictUser(key, id)
	}
	return nil
}

// Route routes by the configured table, around drained backends, after
// the operator's moves.
func (t *Table) Route(ctx context.Context, user string) (*Backend, error) {
	return t.st.Load().route(ctx, user)
}

func (st *tableState) route(ctx context.Context, user string) (*Backend, error) {
	if len(st.moves) > 0 {
		if b, ok := st.moves[NormalizeUser(user)]; ok {
			return b, nil
		}
	}
	if st.avoid != nil {
		return st.avoid.Route(ctx, user)
	}
	return st.full.Route(ctx, user)
}

// Commit answers where user must be now: the table may have changed
// while the login ran. It implements Committer; nothing is recorded.
func (t *Table) Commit(ctx context.Context, user string, b *Backend) (*Backend, error) {
	return t.Route(ctx, user)
}

// Backends lists the configured backends, sorted by ID.
func (t *Table) Backends(context.Context) []BackendStatus {
	st := t.st.Load()
	out := make([]BackendStatus, 0, len(st.cfg.Backends))
	for _, id := range slices.Sorted(maps.Keys(st.cfg.Backends)) {
		b := st.cfg.Backends[id]
		out = append(out, BackendStatus{
			ID: id, Addr: b.Addr, Security: b.Security, Weight: max(b.Weight, 1),
			Health: "static", Up: true, Drain: st.drained[id], Placeable: !st.drained[id],
		})
	}
	return out
}

// Where says where user goes and why.
func (t *Table) Where(ctx context.Context, user string) (Placement, error) {
	key := NormalizeUser(user)
	if key == "" {
		return Placement{}, errors.New("routing: where: empty user name")
	}
	st := t.st.Load()
	p := Placement{User: key}
	hb, pool := st.full.hash(key)
	if hb != nil {
		p.Hash = hb.ID
	}
	p.Pool = pool
	b, err := st.route(ctx, key)
	if err != nil {
		p.Reason = err.Error()
		return p, nil
	}
	p.Backend = b.ID
	switch mb, moved := st.moves[key]; {
	case moved:
		p.Recorded, p.Pinned = mb.ID, true
		p.Reason = "moved to " + mb.ID + " by an operator on this instance (until restart)"
	case st.full.users[key] != nil:
		p.Recorded, p.Pinned = st.full.users[key].ID, true
		p.Reason = "pinned in [routing.users]"
	case hb != nil && st.drained[hb.ID]:
		p.Reason = "hashed over the " + pool + "; its home " + hb.ID + " is drained, so the next backend of the pool"
	default:
		p.Reason = "hashed over the " + pool
	}
	return p, nil
}

// String describes t for logs.
func (t *Table) String() string {
	st := t.st.Load()
	s := st.full.String()
	if n := len(st.drained); n > 0 {
		s += fmt.Sprintf(", %d drained", n)
	}
	if n := len(st.moves); n > 0 {
		s += fmt.Sprintf(", %d moved", n)
	}
	return s
}

// evictMisrouted closes the sessions whose user now routes elsewhere.
// t.mu must be held.
func (t *Table) evictMisrouted(ctx context.Context) int {
	if t.ev == nil {
		return 0
	}
	return EvictMisrouted(ctx, t, t.ev)
}

// buildTable builds the routers for cfg with the drained backends taken
// out of every pool. NewStatic keeps and may modify the Backends it is
// given, so each router gets the same pointers (IDs are filled in on the
// first build and then left alone).
func buildTable(cfg StaticConfig, drained map[string]bool, moves map[string]*Backend) (*tableState, error) {
	full, err := NewStatic(cfg)
	if err != nil {
		return nil, err
	}
	st := &tableState{cfg: cfg, full: full, drained: maps.Clone(drained), moves: maps.Clone(moves)}
	if st.drained == nil {
		st.drained = map[string]bool{}
	}
	if len(drained) == 0 {
		return st, nil
	}
	keep := func(pool string, ids []string) ([]string, error) {
		out := slices.DeleteFunc(slices.Clone(ids), func(id string) bool { return drained[id] })
		if len(out) == 0 {
			return nil, fmt.Errorf("%w: every backend of the %s would be drained", ErrLastInPool, pool)
		}
		return out, nil
	}
	acfg := StaticConfig{Backends: cfg.Backends, Users: cfg.Users, Domains: map[string][]string{}}
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
	if st.avoid, err = NewStatic(acfg); err != nil {
		return nil, err
	}
	return st, nil
}

// UserLister is implemented by an Evictor that can list the users it has
// sessions of (the proxy's Server), so that a router can check them all
// after a change of its table.
type UserLister interface {
	// RoutedUsers returns the users with routed sessions (logging in or
	// logged in), normalised.
	RoutedUsers() []string
}

// EvictMisrouted closes every session that r no longer routes where it
// is: for each user ev has sessions of, those on any backend but r's
// answer (all of them if r has none). ev must implement UserLister, else
// nothing is checked. Each user is routed once and every one of their
// sessions compared with that answer, so a login that lands on the new
// backend during the scan cannot hide the old sessions.
func EvictMisrouted(ctx context.Context, r Router, ev Evictor) int {
	l, ok := ev.(UserLister)
	if !ok {
		return 0
	}
	n := 0
	for _, u := range l.RoutedUsers() {
		keep := ""
		if b, err := r.Route(ctx, u); err == nil {
			keep = b.ID
		}
		n += ev.EvictUser(u, keep)
	}
	return n
}

// hash is the backend hashing over user's pool picks, ignoring pins, and
// the pool's name.
func (s *Static) hash(key string) (*Backend, string) {
	pool, name := s.def, "default pool"
	if d := Domain(key); d != "" {
		if p, ok := s.domains[d]; ok {
			pool, name = p, "pool of domain "+d
		}
	}
	return pool.pick(userKey(key)), strings.TrimSpace(name)
}
