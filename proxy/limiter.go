package proxy

import (
	"net/netip"
	"sync"
	"time"
)

// failureLimiter is a bounded set of token buckets of failed logins, one
// per key (a client network, a user). A login reserves a token before the
// backend is asked, and settles it with the verdict: a failure spends it,
// anything else leaves it. So logins in flight cannot overdraw a bucket
// (tokens minus reservations never goes below zero), and a burst of
// correct logins is never refused: when the tokens are only held by
// logins in flight, the next one waits for one of them to settle. Memory
// is bounded however many keys attack: keys live in two generations of at
// most max/2 each, and the older generation is dropped whole when the
// newer one fills (a cheap approximation of least-recently-used). A key
// that is used is promoted into the newer generation with its bucket as
// it was.
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
	tokens  float64
	last    time.Time
	pending int           // reserved by logins in flight
	settled chan struct{} // closed (and replaced) when one of them settles
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

// reserve reserves a token of key's bucket for a login. It returns the
// bucket to settle, or, when every token left is reserved by logins in
// flight, a channel closed when one of them settles (try again then), or
// neither when the bucket is empty: the login must not be tried. A nil
// limiter always has tokens (and a nil bucket to settle).
func (l *failureLimiter) reserve(key string, now time.Time) (b *bucket, wait <-chan struct{}, ok bool) {
	if l == nil {
		return nil, nil, true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	b = l.lookup(key)
	if b == nil {
		b = &bucket{tokens: l.burst, last: now}
		l.insert(key, b)
	}
	b.tokens, b.last = l.refilled(b, now), now
	switch {
	case b.tokens-float64(b.pending) >= 1:
		b.pending++
		return b, nil, true
	case b.tokens >= 1:
		if b.settled == nil {
			b.settled = make(chan struct{})
		}
		return nil, b.settled, false
	}
	return nil, nil, false
}

// settle ends a reservation: failed spends its token.
func (l *failureLimiter) settle(b *bucket, now time.Time, failed bool) {
	if l == nil || b == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	b.pending--
	if failed {
		b.tokens, b.last = max(l.refilled(b, now)-1, 0), now
	}
	if b.settled != nil {
		close(b.settled)
		b.settled = nil
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
