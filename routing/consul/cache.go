package consul

import (
	"container/list"
	"context"
	"sync"

	"go.uber.org/zap"
)

// userCache is the WatchFeed mode's memory of user entries: the users this
// instance has seen (read at a login's cache miss, written by this
// instance, or re-read after a change on the feed), least recently used
// first out, except that users with a live session here or an unrecorded
// route are never dropped (trimLoop asks the Evictor who they are), so
// the feed can always tell which of this instance's sessions a change
// concerns.
//
// An entry with an empty backend is a tombstone: the user's entry was
// deleted at index (or before). It answers like no entry (a lookup
// misses and reads Consul again) but refuses older reads that finish
// after it, so a read racing a delete cannot resurrect the old entry.
// Every write is monotonic in ModifyIndex for the same reason.
type userCache struct {
	mu   sync.Mutex
	m    map[string]*list.Element // of *cacheEntry
	lru  list.List                // front: most recently used
	size int
	wake chan struct{} // trimLoop: over size
}

type cacheEntry struct {
	user string
	a    assignment
}

func newUserCache(size int) *userCache {
	return &userCache{m: map[string]*list.Element{}, size: size, wake: make(chan struct{}, 1)}
}

// get returns user's entry if it is cached and not a tombstone, and marks
// it used.
func (uc *userCache) get(user string) (assignment, bool) {
	uc.mu.Lock()
	defer uc.mu.Unlock()
	e, ok := uc.m[user]
	if !ok {
		return assignment{}, false
	}
	uc.lru.MoveToFront(e)
	a := e.Value.(*cacheEntry).a
	if a.backend == "" {
		// A tombstone: no entry, so a write over it checks-and-sets
		// over index 0.
		return assignment{}, false
	}
	return a, true
}

// has reports whether user has an entry or a tombstone.
func (uc *userCache) has(user string) bool {
	uc.mu.Lock()
	defer uc.mu.Unlock()
	_, ok := uc.m[user]
	return ok
}

// put stores a (a read or a write of user's entry) unless the cache holds
// something newer.
func (uc *userCache) put(user string, a assignment) {
	uc.mu.Lock()
	if e, ok := uc.m[user]; ok {
		ce := e.Value.(*cacheEntry)
		if ce.a.index <= a.index {
			ce.a = a
		}
		uc.lru.MoveToFront(e)
		uc.mu.Unlock()
		return
	}
	uc.insertAndUnlock(user, a)
}

// insertAndUnlock adds a new entry for user, releases uc.mu (held by the
// caller) and, if the cache is now over its size, wakes the trimmer.
func (uc *userCache) insertAndUnlock(user string, a assignment) {
	uc.m[user] = uc.lru.PushFront(&cacheEntry{user: user, a: a})
	over := len(uc.m) > uc.size
	uc.mu.Unlock()
	if over {
		select {
		case uc.wake <- struct{}{}:
		default:
		}
	}
}

// del records that user's entry was deleted as of index (a read that
// found no entry, or the deleting write's index), unless the cache holds
// an entry newer than that.
func (uc *userCache) del(user string, index uint64) {
	uc.apply(user, assignment{}, false, index)
}

// apply stores what a read or a write says about user: entry a (ok), or
// none as of index (!ok). It is ignored if the cache already holds
// something newer (a read that started before this instance's own write
// finishes after it). It returns the entry the cache held before (had:
// not a tombstone) and whether the news was applied.
func (uc *userCache) apply(user string, a assignment, ok bool, index uint64) (old assignment, had, applied bool) {
	if !ok {
		a = assignment{index: index}
	}
	uc.mu.Lock()
	e, found := uc.m[user]
	if found {
		ce := e.Value.(*cacheEntry)
		old, had = ce.a, ce.a.backend != ""
		uc.lru.MoveToFront(e)
		if ce.a.index > a.index || (ce.a.index == a.index && !ok && had) {
			uc.mu.Unlock()
			return old, had, false
		}
		ce.a = a
		uc.mu.Unlock()
		if !had {
			old = assignment{}
		}
		return old, had, true
	}
	uc.insertAndUnlock(user, a)
	return assignment{}, false, true
}

// retainShard drops every entry of a feed shard whose user is not in
// keep, and returns how many it dropped.
func (uc *userCache) retainShard(shard int, keep map[string]bool) int {
	uc.mu.Lock()
	defer uc.mu.Unlock()
	n := 0
	for u, e := range uc.m {
		if !keep[u] && shardOf(u) == shard {
			uc.lru.Remove(e)
			delete(uc.m, u)
			n++
		}
	}
	return n
}

// trim drops least recently used entries not in live until the cache is
// at 90% of its size (it may stay larger: live users are kept whatever
// their number). It returns how many entries it dropped.
func (uc *userCache) trim(live map[string]bool) int {
	uc.mu.Lock()
	defer uc.mu.Unlock()
	target := uc.size * 9 / 10
	n := 0
	for e := uc.lru.Back(); e != nil && len(uc.m) > target; {
		prev := e.Prev()
		ce := e.Value.(*cacheEntry)
		if !live[ce.user] {
			uc.lru.Remove(e)
			delete(uc.m, ce.user)
			n++
		}
		e = prev
	}
	return n
}

func (uc *userCache) len() int {
	uc.mu.Lock()
	defer uc.mu.Unlock()
	return len(uc.m)
}

// each calls fn for every entry that is not a tombstone; fn must not call
// the cache.
func (uc *userCache) each(fn func(user string, a assignment)) {
	uc.mu.Lock()
	defer uc.mu.Unlock()
	for u, e := range uc.m {
		if a := e.Value.(*cacheEntry).a; a.backend != "" {
			fn(u, a)
		}
	}
}

// cacheTrimLoop keeps the cache within CacheSize, except for live users.
func (c *Consul) cacheTrimLoop(ctx context.Context) {
	defer c.wg.Done()
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.cache.wake:
		}
		if c.cache.len() <= c.cache.size {
			continue
		}
		n := c.cache.trim(c.liveUsers())
		c.log.Debug("user cache trimmed", zap.Int("dropped", n), zap.Int("left", c.cache.len()))
	}
}
