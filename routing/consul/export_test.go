package consul

import "fmt"

// CacheEntry describes user's entry in c's user cache, for the model
// test's failure messages.
func CacheEntry(c *Consul, user string) string {
	if c.cache == nil {
		return "no cache"
	}
	c.cache.mu.Lock()
	defer c.cache.mu.Unlock()
	e, ok := c.cache.m[user]
	if !ok {
		return "not cached"
	}
	a := e.Value.(*cacheEntry).a
	return fmt.Sprintf("cached %q flags %d index %d (shard %d gen %d seq %d)", a.backend, a.flags, a.index,
		shardOf(user), c.feedGen[shardOf(user)].Load(), c.feedSeq[shardOf(user)].Load())
}
