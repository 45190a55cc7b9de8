package proxy

import (
	"net/netip"
	"sync"
	"time"
)

// failureLimiter is a bounded set of token buckets of failed logins, one
// per key (a client network, a user). A login takes a token before the
// backend is asked and gives it back when it succeeds, so logins already
// in flight cannot overdraw a bucket. Memory is bounded however many keys
// attack: keys live in two generations of at most max/2 each, and the
// older generation is dropped whole when the newer one fills (a cheap
// approximation of least-recently-used). A key that is used is promoted
// into the newer generation with its bucket as it was.
type failureLimiter struct {
	mu     sync.Mutex
	burst  float64
	refill time.Duration // one token back each refill
	max    int
	cur    map[string]*bucket
	old    map[string]*bucket
}

// bucket holds the tokens of one key as of last. A key that is not
// tracked has a full bucket.
type bucket struct {
	tokens float64
	last   time.Time
}

func newFailureLimiter(burst int, refill time.Duration, keys int) *failureLimiter {
	if burst <= 0 {
		return nil
	}
	if refill <= 0 {
		refill = time.Nanosecond
	}
	return &failureLimiter{
		burst:  float64(burst),
		refill: refill,
		max:    max(keys, 2),
		cur:    make(map[string]*bucket),
	}
}

// refilled returns b's tokens at now.
func (l *failureLimiter) refilled(b *bucket, now time.Time) float64 {
	if d := now.Sub(b.last); d > 0 {
		return min(l.burst, b.tokens+float64(d)/float64(l.refill))
	}
	return b.tokens
}

// take takes a token from key's bucket and reports whether there was one;
// when there was none, nothing changes. A nil limiter always has tokens.
func (l *failureLimiter) take(key string, now time.Time) bool {
	if l == nil {
		return true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.lookup(key)
	if b == nil {
		l.insert(key, &bucket{tokens: l.burst - 1, last: now})
		return true
	}
	t := l.refilled(b, now)
	if t < 1 {
		return false
	}
	b.tokens, b.last = t-1, now
	return true
}

// give returns a token taken by take (the login succeeded, or never got
// an answer about the credentials).
func (l *failureLimiter) give(key string, now time.Time) {
	if l == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if b := l.lookup(key); b != nil {
		b.tokens, b.last = min(l.burst, l.refilled(b, now)+1), now
	}
}

// tokens reports key's tokens at now, for tests and diagnostics.
func (l *failureLimiter) tokens(key string, now time.Time) float64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if b := l.lookup(key); b != nil {
		return l.refilled(b, now)
	}
	return l.burst
}

func (l *failureLimiter) insert(key string, b *bucket) {
	if len(l.cur) >= l.max/2 {
		l.old, l.cur = l.cur, make(map[string]*bucket, len(l.cur))
	}
	l.cur[key] = b
}

// lookup finds key in either generation, promoting it to the current one.
func (l *failureLimiter) lookup(key string) *bucket {
	if b, ok := l.cur[key]; ok {
		return b
	}
	if b, ok := l.old[key]; ok {
		delete(l.old, key)
		l.insert(key, b)
		return b
	}
	return nil
}

// size is how many keys are tracked.
func (l *failureLimiter) size() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.cur) + len(l.old)
}

// networkOf is the network an address counts for in every per-client
// limit (connections, failed logins): its /v4 for IPv4 (an IPv4-mapped
// IPv6 address is IPv4), its /v6 for IPv6 (one host usually has a whole
// /64).
func networkOf(a netip.Addr, v4, v6 int) netip.Prefix {
	a = a.Unmap()
	bits := v6
	if a.Is4() {
		bits = v4
	}
	p, err := a.Prefix(bits)
	if err != nil { // invalid address (a test's pipe): one network
		return netip.Prefix{}
	}
	return p
}
