package proxy

import (
	"context"
	"errors"
	"net/netip"
	"sync"
	"time"
)

// This file is the password-guessing policy, shared by every front end
// (IMAP here; POP3, ManageSieve and the like call the same three steps,
// with the session's network from Server.network at accept):
//
//	att, err := s.limiters.Load().begin(ctx, network, user)
//	if err != nil { ... }  // errLoginLimited: refuse at once, temporary
//	... ask the backend ...
//	att.succeeded()        // or att.failed() for refused credentials,
//	                       // att.abandoned() when there is no verdict
//
// The policy:
//
//   - Every client network (an IPv4 address, an IPv6 /64: Limits.IPv4Prefix
//     and IPv6Prefix) has a bucket of failed logins, at any users. A login
//     reserves a token before the backend is asked (failureLimiter); a
//     network with no token left is refused (NO [LIMIT]) without asking
//     the backend; one whose tokens are all reserved by logins in flight
//     waits for one of them to settle. This is what caps guessing: each
//     network gets IPFailures.Burst guesses, then one per
//     IPFailures.Refill.
//   - Every user has a bucket too, charged only by failures from networks
//     that have not logged in as that user lately (Limits.KnownNetworkTTL).
//     An empty user bucket never refuses: refusing would hand any attacker
//     a way to lock a user out. It slows instead: a login for that user
//     from a network not known for it waits Limits.UserSlowdown before the
//     backend is asked, and each such network may have one slowed login
//     for the user at a time (others are refused at once). The real user
//     from a known network is never slowed; from a fresh network it waits
//     UserSlowdown once, then its network is known.
//   - A failure spends the tokens its login reserved; a success releases
//     them and makes the network known for the user; a login without a
//     verdict on the credentials (backend unavailable, client gone)
//     releases them too.

// errLoginLimited is begin's refusal: too many recent failures.
var errLoginLimited = errors.New("too many failed logins, try again later")

// limiters are the failure limits, replaced together when they change.
type limiters struct {
	ip, user *failureLimiter // nil when off
	known    *knownNetworks  // nil when off
	slowdown time.Duration   // 0: none
	// slowed are the (user, network) pairs with a slowed login in flight.
	mu     sync.Mutex
	slowed map[string]struct{}
	// now is time.Now, a seam for tests.
	now func() time.Time
	// onSlow, if set, is told when a login starts its slow-down (tests).
	onSlow func()
}

func newLimiters(l Limits) *limiters {
	lim := &limiters{
		ip:       newFailureLimiter(l.IPFailures.Burst, l.IPFailures.Refill, l.FailureKeys),
		user:     newFailureLimiter(l.UserFailures.Burst, l.UserFailures.Refill, l.FailureKeys),
		slowed:   make(map[string]struct{}),
		now:      time.Now,
		slowdown: max(l.UserSlowdown, 0),
	}
	if l.KnownNetworkTTL > 0 && lim.user != nil {
		lim.known = &knownNetworks{ttl: l.KnownNetworkTTL, max: max(l.FailureKeys, 2), cur: map[string]time.Time{}}
	}
	return lim
}

// limiterConfig is what newLimiters reads: when it changes, a reload
// starts the limits afresh.
func limiterConfig(l Limits) [7]any {
	return [7]any{l.IPFailures, l.UserFailures, l.FailureKeys, l.UserSlowdown, l.KnownNetworkTTL, l.IPv4Prefix, l.IPv6Prefix}
}

// loginAttempt is one login between begin and its verdict.
type loginAttempt struct {
	l          *limiters
	pair       string  // user and network, for known and slowed
	ip, user   *bucket // reservations, nil when none
	slowedSlot bool
	done       bool
}

// reserveWait reserves a token of key in lim, waiting while the tokens
// left are held by logins in flight. ok=false: the bucket is empty.
func reserveWait(ctx context.Context, lim *failureLimiter, key string, now func() time.Time) (b *bucket, ok bool, err error) {
	for {
		b, wait, ok := lim.reserve(key, now())
		if ok || wait == nil {
			return b, ok, nil
		}
		select {
		case <-wait:
		case <-ctx.Done():
			return nil, false, ctx.Err()
		}
	}
}

// begin starts a login for user from network: it takes the tokens the
// login may cost, and waits out the user's slow-down when there is one
// (ctx ends the wait: begin then returns ctx's error). It returns
// errLoginLimited when the login must be refused without asking anyone.
func (l *limiters) begin(ctx context.Context, network netip.Prefix, user string) (*loginAttempt, error) {
	net := network.String()
	a := &loginAttempt{l: l, pair: user + "\x00" + net}
	ipb, ok, err := reserveWait(ctx, l.ip, net, l.now)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, errLoginLimited
	}
	a.ip = ipb
	if l.known.has(a.pair, l.now()) {
		return a, nil
	}
	ub, ok, err := reserveWait(ctx, l.user, user, l.now)
	if err != nil {
		a.abandoned()
		return nil, err
	}
	if ok {
		a.user = ub
		return a, nil
	}
	if l.slowdown <= 0 {
		return a, nil
	}
	l.mu.Lock()
	_, busy := l.slowed[a.pair]
	if !busy {
		l.slowed[a.pair] = struct{}{}
	}
	l.mu.Unlock()
	if busy {
		a.abandoned()
		return nil, errLoginLimited
	}
	a.slowedSlot = true
	if l.onSlow != nil {
		l.onSlow()
	}
	t := time.NewTimer(l.slowdown)
	defer t.Stop()
	select {
	case <-t.C:
		return a, nil
	case <-ctx.Done():
		a.abandoned()
		return nil, ctx.Err()
	}
}

// slowed reports whether the login waited out a slow-down.
func (a *loginAttempt) slowed() bool { return a.slowedSlot }

// succeeded records a successful login: its reservations cost nothing
// and the network becomes known for the user.
func (a *loginAttempt) succeeded() {
	if a.finish(false) {
		a.l.known.add(a.pair, a.l.now())
	}
}

// failed records credentials the backend refused: the reserved tokens
// are spent.
func (a *loginAttempt) failed() { a.finish(true) }

// abandoned records a login that got no verdict on its credentials (the
// backend was unavailable, the client left): it costs nothing.
func (a *loginAttempt) abandoned() { a.finish(false) }

// finish settles the attempt's reservations once (failed spends them);
// it reports whether this was the first call.
func (a *loginAttempt) finish(failed bool) bool {
	if a == nil || a.done {
		return false
	}
	a.done = true
	now := a.l.now()
	a.l.ip.settle(a.ip, now, failed)
	a.l.user.settle(a.user, now, failed)
	if a.slowedSlot {
		a.l.mu.Lock()
		delete(a.l.slowed, a.pair)
		a.l.mu.Unlock()
	}
	return true
}

// knownNetworks remembers which networks logged in as which user lately,
// bounded like failureLimiter (two generations).
type knownNetworks struct {
	mu       sync.Mutex
	ttl      time.Duration
	max      int
	cur, old map[string]time.Time // pair → last success
}

func (k *knownNetworks) has(pair string, now time.Time) bool {
	if k == nil {
		return false
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	t, ok := k.cur[pair]
	if !ok {
		t, ok = k.old[pair]
	}
	return ok && now.Sub(t) < k.ttl
}

func (k *knownNetworks) add(pair string, now time.Time) {
	if k == nil {
		return
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if _, ok := k.cur[pair]; !ok && len(k.cur) >= k.max/2 {
		k.old, k.cur = k.cur, make(map[string]time.Time, len(k.cur))
	}
	delete(k.old, pair)
	k.cur[pair] = now
}
