package routing

import (
	"cmp"
	"math"
	"slices"
)

// Weighted rendezvous (highest random weight) hashing.
//
// Every candidate backend gets a pseudo-random score for the user and the
// highest score wins. Adding a backend only takes the users for which the
// newcomer scores highest (its fair share) and never moves a user between
// the old backends; removing one only moves its own users. With weights,
// score = -w / ln(u) where u is the (backend, user) hash mapped into (0, 1)
// (Schindelhauer & Schomaker, "Weighted distributed hash tables"), which
// gives each backend a share proportional to w.
//
// The hash is part of imapgate's contract: static routers on different
// instances, and across restarts, must agree, so it is a fixed function
// (FNV-1a 64 followed by the murmur3 finaliser), never a seeded one such as
// hash/maphash.

// hashString is FNV-1a 64 over s with the murmur3 fmix64 finaliser, so
// every input bit reaches every output bit (plain FNV-1a mixes the last
// bytes of s poorly).
func hashString(s string) uint64 {
	const (
		offset64 = 14695981039346656037
		prime64  = 1099511628211
	)
	h := uint64(offset64)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= prime64
	}
	return fmix64(h)
}

// fmix64 is murmur3's 64-bit finaliser: a bijection with full avalanche.
func fmix64(h uint64) uint64 {
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h
}

// userKey is the hashing key of a normalized user name.
func userKey(user string) uint64 { return hashString(user) }

// hrwNode is one candidate of a rendezvous pool, with the parts of its
// score that do not depend on the user precomputed.
type hrwNode struct {
	backend *Backend
	key     uint64  // hashString(backend.ID)
	weight  float64 // >= 1
}

// Pool is an immutable pool of backends to hash users over. Building
// one sorts and precomputes; pick allocates nothing.
type Pool struct {
	nodes []hrwNode
	// uniform is true when every weight is equal, so the score is monotonic
	// in the raw hash and pick can skip the logarithm.
	uniform bool
}

// NewPool builds a pool over backends (duplicates by ID are
// dropped). Weight zero or negative counts as 1.
func NewPool(backends []*Backend) *Pool {
	r := &Pool{uniform: true}
	seen := make(map[string]bool, len(backends))
	for _, b := range backends {
		if b == nil || seen[b.ID] {
			continue
		}
		seen[b.ID] = true
		r.nodes = append(r.nodes, hrwNode{backend: b, key: hashString(b.ID), weight: float64(weightOf(b))})
	}
	// Sorted by ID so that ties (equal scores) go to the smallest ID
	// whatever order the caller listed the backends in.
	slices.SortFunc(r.nodes, func(a, b hrwNode) int { return cmp.Compare(a.backend.ID, b.backend.ID) })
	for _, n := range r.nodes {
		if n.weight != r.nodes[0].weight {
			r.uniform = false
		}
	}
	return r
}

func weightOf(b *Backend) int {
	if b.Weight <= 0 {
		return 1
	}
	return b.Weight
}

// Len reports the number of candidates.
func (r *Pool) Len() int {
	if r == nil {
		return 0
	}
	return len(r.nodes)
}

// pick returns the backend with the highest score for the user whose
// userKey is uk, or nil if the pool is empty.
func (r *Pool) pick(uk uint64) *Backend {
	if r.Len() == 0 {
		return nil
	}
	best := -1
	if r.uniform {
		var bestH uint64
		for i := range r.nodes {
			h := fmix64(uk ^ r.nodes[i].key)
			if best < 0 || h > bestH { // strict: ties keep the smaller ID
				best, bestH = i, h
			}
		}
		return r.nodes[best].backend
	}
	bestS := math.Inf(-1)
	for i := range r.nodes {
		s := score(fmix64(uk^r.nodes[i].key), r.nodes[i].weight)
		if s > bestS {
			best, bestS = i, s
		}
	}
	return r.nodes[best].backend
}

// score is the weighted-HRW score -w/ln(u) for hash h, with u = h mapped
// into the open interval (0, 1) so the logarithm is finite and non-zero.
func score(h uint64, w float64) float64 {
	u := (float64(h>>11) + 0.5) / (1 << 53)
	return -w / math.Log(u)
}

// Pick returns the backend with the highest score for the normalized user
// name, or nil if the pool is empty. Every router that hashes (the static
// table, Consul, the directory routers' fallback) picks through it, so a
// user hashes to the same backend whichever router asks.
func (r *Pool) Pick(user string) *Backend { return r.pick(userKey(user)) }
