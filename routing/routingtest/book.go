// Package routingtest holds test helpers shared by the routers' tests: a
// session book that stands in for the proxy's sessions where a test wants
// to see what a router's evictions left, without a proxy.
package routingtest

import (
	"slices"
	"sync"
)

// SessionBook is a routing.Evictor that holds sessions (user → backend IDs) the
// way the proxy's Server does, so that tests see what is left after the
// router's evictions.
type SessionBook struct {
	mu       sync.Mutex
	sessions map[string][]string
}

// NewSessionBook returns an empty book.
func NewSessionBook() *SessionBook { return &SessionBook{sessions: map[string][]string{}} }

// Add records a session of user on backend.
func (b *SessionBook) Add(user, backend string) {
	b.mu.Lock()
	b.sessions[user] = append(b.sessions[user], backend)
	b.mu.Unlock()
}

// On lists the backends user has sessions on, sorted.
func (b *SessionBook) On(user string) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Sorted(slices.Values(b.sessions[user]))
}

// EvictUser implements routing.Evictor.
func (b *SessionBook) EvictUser(user, keep string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	var left []string
	n := 0
	for _, id := range b.sessions[user] {
		if keep != "" && id == keep {
			left = append(left, id)
		} else {
			n++
		}
	}
	b.sessions[user] = left
	return n
}

// EvictBackend implements routing.Evictor.
func (b *SessionBook) EvictBackend(id string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for u, ids := range b.sessions {
		left := slices.DeleteFunc(slices.Clone(ids), func(x string) bool { return x == id })
		n += len(ids) - len(left)
		b.sessions[u] = left
	}
	return n
}

// RoutedUsers lists the users with at least one session.
func (b *SessionBook) RoutedUsers() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for u, ids := range b.sessions {
		if len(ids) > 0 {
			out = append(out, u)
		}
	}
	return out
}
