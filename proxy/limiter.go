package proxy

import (
	"net/netip"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// failureLimiter slows password guessing: it counts failed logins per
// client network and per user in token buckets, and refuses logins whose
// bucket is empty before the backend is even asked. Memory is bounded
// however many addresses attack: keys live in two generations of at most
// max/2 each, and the older generation is dropped whole when the newer one
// fills (a cheap approximation of least-recently-used).
type failureLimiter struct {
	mu    sync.Mutex
	every rate.Limit
	burst int
	max   int
	cur   map[string]*rate.Limiter
	old   map[string]*rate.Limiter
}

func newFailureLimiter(burst int, refill time.Duration, max int) *failureLimiter {
	if burst <= 0 {
		return nil
	}
	return &failureLimiter{
		every: rate.Every(refill),
		burst: burst,
		max:   max,
		cur:   make(map[string]*rate.Limiter),
	}
}

// allowed reports whether key may try to log in now. A nil limiter
// allows everything.
func (l *failureLimiter) allowed(key string, now time.Time) bool {
	if l == nil {
		return true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	lim := l.lookup(key)
	return lim == nil || lim.TokensAt(now) >= 1
}

// fail records a failed login for key.
func (l *failureLimiter) fail(key string, now time.Time) {
	if l == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	lim := l.lookup(key)
	if lim == nil {
		if len(l.cur) >= l.max/2 {
			l.old, l.cur = l.cur, make(map[string]*rate.Limiter, len(l.cur))
		}
		lim = rate.NewLimiter(l.every, l.burst)
		l.cur[key] = lim
	}
	lim.AllowN(now, 1)
}

// lookup finds key in either generation, promoting it to the current one.
func (l *failureLimiter) lookup(key string) *rate.Limiter {
	if lim, ok := l.cur[key]; ok {
		return lim
	}
	if lim, ok := l.old[key]; ok {
		delete(l.old, key)
		l.cur[key] = lim
		return lim
	}
	return nil
}

// size is how many keys are tracked.
func (l *failureLimiter) size() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.cur) + len(l.old)
}

// clientNetwork is the key of an address's failures: the address itself
// for IPv4, its /64 for IPv6 (one host usually has a whole /64).
func clientNetwork(a netip.Addr) string {
	if a.Is4() || a.Is4In6() {
		return a.Unmap().String()
	}
	p, _ := a.Prefix(64)
	return p.String()
}
