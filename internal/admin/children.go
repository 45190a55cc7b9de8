package admin

import "sync"

// children caches a metric vector's children by their label values.
// The vector's own lookup (WithLabelValues) hashes and validates every
// value and takes the vector's lock on each call: about half a
// microsecond, and a login makes a dozen of them. A map read under a
// read lock is a tenth of that. Nothing deletes a child from the vectors
// this package keeps, so a cached child is never stale.
//
// The zero value is not usable: make one with newChildren.
type children[K comparable, M any] struct {
	mu     sync.RWMutex
	m      map[K]M
	create func(K) M // the vector's own lookup, called once per key
}

func newChildren[K comparable, M any](create func(K) M) *children[K, M] {
	return &children[K, M]{m: make(map[K]M), create: create}
}

// of returns the child for k, creating it on first use.
func (c *children[K, M]) of(k K) M {
	c.mu.RLock()
	v, ok := c.m[k]
	c.mu.RUnlock()
	if ok {
		return v
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if v, ok := c.m[k]; ok {
		return v
	}
	v = c.create(k)
	c.m[k] = v
	return v
}
