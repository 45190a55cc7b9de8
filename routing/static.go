package routing

import (
	"context"
	"errors"
	"fmt"
	"slices"
)

// StaticConfig is the routing table of a Static router, usually read from
// imapgate's config file.
type StaticConfig struct {
	// Backends are the backends by ID. A Backend's ID must equal its key;
	// an empty ID is set to the key. NewStatic keeps the pointers: do not
	// modify the Backends afterwards.
	Backends map[string]*Backend
	// Users pins users to a backend: normalized (or not: keys go through
	// NormalizeUser) user name → backend ID. Pins win over everything.
	Users map[string]string
	// Domains gives a domain (the part after the last '@') its own pool of
	// backend IDs; its users are hashed over that pool only.
	Domains map[string][]string
	// Default is the pool for everyone else. Empty means all backends.
	Default []string
}

// Static routes from a fixed table: user pin, then the user's domain pool,
// then the default pool, hashing with weighted rendezvous within a pool so
// that every imapgate instance with the same table agrees without talking
// to each other. It is safe for concurrent use and never blocks.
type Static struct {
	users   map[string]*Backend
	domains map[string]*Pool
	def     *Pool
}

var _ Router = (*Static)(nil)

// NewStatic validates cfg and precomputes its pools. It rejects a config
// with no backends, a backend without an address or with a negative
// weight, a pin or pool naming an unknown backend, and an empty domain
// pool.
func NewStatic(cfg StaticConfig) (*Static, error) {
	if len(cfg.Backends) == 0 {
		return nil, errors.New("routing: static config has no backends")
	}
	for id, b := range cfg.Backends {
		switch {
		case id == "":
			return nil, errors.New("routing: static backend with an empty ID")
		case b == nil:
			return nil, fmt.Errorf("routing: static backend %q is nil", id)
		case b.ID == "":
			b.ID = id
		case b.ID != id:
			return nil, fmt.Errorf("routing: static backend %q has ID %q; they must match", id, b.ID)
		}
		if b.Addr == "" {
			return nil, fmt.Errorf("routing: static backend %q has no address", id)
		}
		if b.Weight < 0 {
			return nil, fmt.Errorf("routing: static backend %q has negative weight %d", id, b.Weight)
		}
	}
	s := &Static{
		users:   make(map[string]*Backend, len(cfg.Users)),
		domains: make(map[string]*Pool, len(cfg.Domains)),
	}
	for user, id := range cfg.Users {
		key := NormalizeUser(user)
		if key == "" {
			return nil, fmt.Errorf("routing: static pin with an empty user name (to %q)", id)
		}
		b, ok := cfg.Backends[id]
		if !ok {
			return nil, fmt.Errorf("routing: user %q is pinned to unknown backend %q", user, id)
		}
		if prev, dup := s.users[key]; dup && prev != b {
			return nil, fmt.Errorf("routing: user %q is pinned twice (to %q and %q) after normalization", key, prev.ID, id)
		}
		s.users[key] = b
	}
	for domain, ids := range cfg.Domains {
		key := NormalizeUser(domain)
		if key == "" {
			return nil, errors.New("routing: static domain pool with an empty domain")
		}
		if _, dup := s.domains[key]; dup {
			return nil, fmt.Errorf("routing: domain %q is listed twice after normalization", key)
		}
		p, err := staticPool(cfg.Backends, ids)
		if err != nil {
			return nil, fmt.Errorf("routing: domain %q: %w", domain, err)
		}
		s.domains[key] = p
	}
	if len(cfg.Default) == 0 {
		all := make([]*Backend, 0, len(cfg.Backends))
		for _, b := range cfg.Backends {
			all = append(all, b)
		}
		s.def = NewPool(all)
	} else {
		p, err := staticPool(cfg.Backends, cfg.Default)
		if err != nil {
			return nil, fmt.Errorf("routing: default pool: %w", err)
		}
		s.def = p
	}
	return s, nil
}

// staticPool resolves a list of backend IDs.
func staticPool(backends map[string]*Backend, ids []string) (*Pool, error) {
	if len(ids) == 0 {
		return nil, errors.New("empty pool")
	}
	pool := make([]*Backend, 0, len(ids))
	for _, id := range ids {
		b, ok := backends[id]
		if !ok {
			return nil, fmt.Errorf("unknown backend %q", id)
		}
		if slices.Contains(pool, b) {
			return nil, fmt.Errorf("backend %q listed twice", id)
		}
		pool = append(pool, b)
	}
	return NewPool(pool), nil
}

// Route returns user's backend: their pin, else a hash over their domain's
// pool, else a hash over the default pool. It never fails for a valid
// Static, but an empty user name is refused with ErrNoBackend.
func (s *Static) Route(_ context.Context, user string) (*Backend, error) {
	key := NormalizeUser(user)
	if key == "" {
		return nil, fmt.Errorf("%w: empty user name", ErrNoBackend)
	}
	if b, ok := s.users[key]; ok {
		return b, nil
	}
	pool := s.def
	if d := Domain(key); d != "" {
		if p, ok := s.domains[d]; ok {
			pool = p
		}
	}
	if b := pool.pick(userKey(key)); b != nil {
		return b, nil
	}
	return nil, ErrNoBackend
}

// String describes s for logs.
func (s *Static) String() string {
	return fmt.Sprintf("static(%d pins, %d domain pools, default pool of %d)", len(s.users), len(s.domains), s.def.Len())
}
