package proxy

import (
	"fmt"
	"github.com/imapgate/imapgate/internal/testenv"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imapgate/imapgate/routing"
)

// limitCounter is a Metrics that counts LimitHit and Login reasons.
type limitCounter struct {
	nopMetrics
	mu     sync.Mutex
	limits map[string]int
}

func (m *limitCounter) LimitHit(l string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.limits == nil {
		m.limits = map[string]int{}
	}
	m.limits[l]++
}

func (m *limitCounter) hits(l string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.limits[l]
}

// failNow records one failed login for key, as a login that reserved
// and failed would; it reports whether the bucket had a token.
func failNow(l *failureLimiter, key string, now time.Time) bool {
	b, _, ok := l.reserve(key, now)
	if ok {
		l.settle(b, now, true)
	}
	return ok
}

func TestFailureLimiterRefill(t *testing.T) {
	l := newFailureLimiter(2, time.Minute, 100)
	t0 := time.Unix(1_000_000, 0)
	for i, want := range []bool{true, true, false, false} {
		if got := failNow(l, "k", t0); got != want {
			t.Fatalf("failure %d at t0: had a token = %v, want %v", i, got, want)
		}
	}
	if failNow(l, "k", t0.Add(59*time.Second)) {
		t.Error("a token came back before one refill interval")
	}
	if !failNow(l, "k", t0.Add(61*time.Second)) {
		t.Error("no token after one refill interval")
	}
	if failNow(l, "k", t0.Add(62*time.Second)) {
		t.Error("one refill interval gave more than one token")
	}
	// Refills stop at the burst, however long the key was quiet.
	if got := l.tokens("k", t0.Add(24*time.Hour)); got != 2 {
		t.Errorf("tokens after a day = %v, want the burst 2", got)
	}
}

// TestFailureLimiterReservations: tokens held by logins in flight make
// the next login wait, not fail; a settled success costs nothing, a
// settled failure one token; the bucket is never overdrawn.
func TestFailureLimiterReservations(t *testing.T) {
	l := newFailureLimiter(2, time.Hour, 100)
	now := time.Unix(1_000_000, 0)
	a, _, ok1 := l.reserve("k", now)
	b, _, ok2 := l.reserve("k", now)
	if !ok1 || !ok2 {
		t.Fatal("two reservations with a burst of 2 refused")
	}
	_, wait, ok := l.reserve("k", now)
	if ok || wait == nil {
		t.Fatalf("third reservation: ok=%v wait=%v, want a wait", ok, wait != nil)
	}
	l.settle(a, now, false) // a success
	select {
	case <-wait:
	default:
		t.Fatal("a settled reservation did not wake the waiter")
	}
	c, _, ok := l.reserve("k", now)
	if !ok {
		t.Fatal("no token after a success released one")
	}
	l.settle(b, now, true)
	l.settle(c, now, true)
	if got := l.tokens("k", now); got != 0 {
		t.Errorf("after two failures of 2: %v tokens", got)
	}
	if _, wait, ok := l.reserve("k", now); ok || wait != nil {
		t.Error("an empty bucket with nothing in flight did not refuse")
	}
}

// TestFailureLimiterGenerations checks that a key in use survives the
// rotation of generations with its bucket as it was (promotion), and that
// a key nobody uses is forgotten after two rotations.
func TestFailureLimiterGenerations(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	l := newFailureLimiter(1, time.Hour, 4) // generations of 2 keys
	failNow(l, "a", now)                    // a is empty now
	failNow(l, "b", now)
	failNow(l, "c", now) // rotation: old = {a, b}, cur = {c}
	if failNow(l, "a", now) {
		t.Fatal("a key in the old generation lost its bucket")
	}
	// That look-up promoted a: cur = {c, a}. Two more keys rotate twice.
	failNow(l, "d", now) // rotation: old = {c, a}, cur = {d}
	if failNow(l, "a", now) {
		t.Fatal("a promoted key lost its bucket at the next rotation")
	}
	// a promoted again: cur = {d, a}; b was dropped with its generation.
	if got := l.tokens("b", now); got != 1 {
		t.Errorf("b, unused for two rotations, still tracked with %v tokens", got)
	}
	if n := l.size(); n > 4 {
		t.Errorf("%d keys tracked, bound 4", n)
	}
}

func TestNetworkOf(t *testing.T) {
	for _, tc := range []struct {
		addr   string
		v4, v6 int
		want   string
	}{
		{"192.0.2.7", 32, 64, "192.0.2.7/32"},
		{"192.0.2.7", 24, 64, "192.0.2.0/24"},
		{"::ffff:192.0.2.7", 32, 64, "192.0.2.7/32"},
		{"2001:db8:1:2:3:4:5:6", 32, 64, "2001:db8:1:2::/64"},
		{"2001:db8:1:2:3:4:5:6", 32, 48, "2001:db8:1::/48"},
		{"2001:db8:1:2:3:4:5:6", 32, 128, "2001:db8:1:2:3:4:5:6/128"},
	} {
		if got := networkOf(netip.MustParseAddr(tc.addr), tc.v4, tc.v6).String(); got != tc.want {
			t.Errorf("networkOf(%s, %d, %d) = %s, want %s", tc.addr, tc.v4, tc.v6, got, tc.want)
		}
	}
}

// limitHarness is a StartTLS listener whose clients may log in without
// TLS from 127/8, on the in-memory backend, counting backend asks.
func limitHarness(t *testing.T, mod func(*Options)) (*harness, *countingRouter, *limitCounter) {
	t.Helper()
	addr := startMemBackend(t)
	r := &countingRouter{b: &routing.Backend{ID: "mem1", Addr: addr}}
	m := &limitCounter{}
	h := newHarnessListeners(t, r, func(o *Options) {
		o.Metrics = m
		o.Limits.MaxAuthFailures = 100
		if mod != nil {
			mod(o)
		}
	}, Listener{Mode: StartTLS, InsecureAuth: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}})
	return h, r, m
}

// TestFailureLimitsNotRaced sends many wrong passwords at once: a login
// takes its token before the backend is asked, so no more reach the
// backend than the network's burst, however many are in flight.
func TestFailureLimitsNotRaced(t *testing.T) {
	h, r, _ := limitHarness(t, func(o *Options) {
		o.Limits.IPFailures = RateLimit{Burst: 2, Refill: time.Hour}
		o.Limits.UserFailures = RateLimit{Burst: 3, Refill: time.Hour}
	})
	const n = 40
	convs := make([]*conv, n)
	for i := range convs {
		convs[i] = dialFrom(t, h.startTLSAddr, net.IPv4(127, 0, 0, 1))
	}
	for _, c := range convs {
		c.Send("a LOGIN alice@example.org wrong\r\n")
	}
	limited := 0
	for _, c := range convs {
		l, _ := c.Tagged("a")
		switch {
		case strings.HasPrefix(l, "a NO [LIMIT]"):
			limited++
		case !strings.HasPrefix(l, "a NO [AUTHENTICATIONFAILED]"):
			t.Fatalf("answered %q", l)
		}
	}
	if asked := r.n.Load(); asked > 2 || limited != n-int(asked) {
		t.Errorf("%d parallel wrong logins with a burst of 2: the backend was asked %d times, %d refused", n, asked, limited)
	}
	// A success gives its token back: the right password still works
	// twice in a row from the limited network once a token refilled...
	// here none will (an hour), so the network stays refused.
	c := dialFrom(t, h.startTLSAddr, net.IPv4(127, 0, 0, 1))
	c.Send("b LOGIN alice@example.org alicepass\r\n")
	c.Expect("b NO [LIMIT]")
}

// TestConcurrentCorrectLoginsNotLimited: many correct logins at once from
// one network (an office behind NAT) are never refused, however small
// the burst: they wait for each other's verdict instead.
func TestConcurrentCorrectLoginsNotLimited(t *testing.T) {
	h, _, _ := limitHarness(t, func(o *Options) {
		o.Limits.IPFailures = RateLimit{Burst: 2, Refill: time.Hour}
		o.Limits.UserFailures = RateLimit{Burst: 2, Refill: time.Hour}
	})
	const n = 40
	convs := make([]*conv, n)
	for i := range convs {
		convs[i] = dialFrom(t, h.startTLSAddr, net.IPv4(127, 0, 0, 1))
	}
	for _, c := range convs {
		c.Send("a LOGIN alice@example.org alicepass\r\n")
	}
	for _, c := range convs {
		c.Expect("a OK")
	}
}

// TestSuccessGivesTokensBack logs in right many times from one network
// with a burst of 1: successes cost nothing.
func TestSuccessGivesTokensBack(t *testing.T) {
	h, _, _ := limitHarness(t, func(o *Options) {
		o.Limits.IPFailures = RateLimit{Burst: 1, Refill: time.Hour}
		o.Limits.UserFailures = RateLimit{Burst: 1, Refill: time.Hour}
	})
	for i := 0; i < 5; i++ {
		c := dialFrom(t, h.startTLSAddr, net.IPv4(127, 0, 0, 1))
		c.Send("a LOGIN alice@example.org alicepass\r\n")
		c.Expect("a OK")
	}
	// The one failure the burst allows, then the network is refused.
	c := dialFrom(t, h.startTLSAddr, net.IPv4(127, 0, 0, 1))
	c.Send("a LOGIN alice@example.org wrong\r\n")
	c.Expect("a NO [AUTHENTICATIONFAILED]")
	c.Send("b LOGIN alice@example.org alicepass\r\n")
	c.Expect("b NO [LIMIT]")
}

// TestUserSprayCappedRealUserGetsIn sprays wrong passwords at one user
// from many networks. Each network is cut off after its burst (the spray
// stays capped), the user's bucket empties and slows further guesses from
// unknown networks, yet the real user logs in: at once from a network it
// used before, after the slow-down from a fresh one.
func TestUserSprayCappedRealUserGetsIn(t *testing.T) {
	h, r, m := limitHarness(t, func(o *Options) {
		o.Limits.IPFailures = RateLimit{Burst: 2, Refill: time.Hour}
		o.Limits.UserFailures = RateLimit{Burst: 3, Refill: time.Hour}
		o.Limits.UserSlowdown = 20 * time.Millisecond
	})
	home := net.IPv4(127, 5, 0, 1)
	c := dialFrom(t, h.startTLSAddr, home)
	c.Send("a LOGIN alice@example.org alicepass\r\n")
	c.Expect("a OK")
	r.n.Store(0)

	const networks, perNet = 30, 5
	limited := 0
	for i := 0; i < networks; i++ {
		c := dialFrom(t, h.startTLSAddr, net.IPv4(127, 1, 0, byte(1+i)))
		for j := 0; j < perNet; j++ {
			tag := fmt.Sprintf("s%d", j)
			c.Send(tag + " LOGIN alice@example.org wrong\r\n")
			l, _ := c.Tagged(tag)
			switch {
			case strings.HasPrefix(l, tag+" NO [LIMIT]"):
				limited++
			case !strings.HasPrefix(l, tag+" NO [AUTHENTICATIONFAILED]"):
				t.Fatalf("spray login answered %q", l)
			}
		}
	}
	asked := int(r.n.Load())
	t.Logf("%d guesses at one user from %d networks: %d reached the backend, %d refused, %d slowed", networks*perNet, networks, asked, limited, m.hits("user_slowdown"))
	if asked > networks*2 || asked+limited != networks*perNet {
		t.Errorf("the backend was asked %d times, cap %d", asked, networks*2)
	}
	// The user's bucket (3) ran dry: every guess after the third waited.
	if got, want := m.hits("user_slowdown"), asked-3; got != want {
		t.Errorf("%d logins slowed, want %d (all but the user's burst)", got, want)
	}

	// The real user, from home: not slowed.
	before := m.hits("user_slowdown")
	c = dialFrom(t, h.startTLSAddr, home)
	c.Send("b LOGIN alice@example.org alicepass\r\n")
	c.Expect("b OK")
	if m.hits("user_slowdown") != before {
		t.Error("a network that logged in as the user before was slowed")
	}
	// From a fresh network: slowed once, then in.
	c = dialFrom(t, h.startTLSAddr, net.IPv4(127, 9, 9, 9))
	c.Send("c LOGIN alice@example.org alicepass\r\n")
	c.Expect("c OK")
	if m.hits("user_slowdown") != before+1 {
		t.Error("a fresh network was not slowed while the user is attacked")
	}
	// Another user is not affected by alice's attack at all.
	c = dialFrom(t, h.startTLSAddr, net.IPv4(127, 9, 9, 10))
	c.Send("d LOGIN bob@example.org \"bob pass\"\r\n")
	c.Expect("d OK")
	if m.hits("user_slowdown") != before+1 {
		t.Error("another user was slowed")
	}
}

// TestUserBucketChargedAndOneSlowedPerNetwork: failures from distinct
// networks (no network over its own limit) empty the user's bucket, after
// which a fresh network's login waits; a second one from that network
// while it waits is refused at once.
func TestUserBucketChargedAndOneSlowedPerNetwork(t *testing.T) {
	slowed := make(chan struct{}, 10)
	h, r, _ := limitHarness(t, func(o *Options) {
		o.Limits.IPFailures = RateLimit{Burst: 10, Refill: time.Hour}
		o.Limits.UserFailures = RateLimit{Burst: 3, Refill: time.Hour}
		o.Limits.UserSlowdown = time.Hour
	})
	h.srv.limiters.Load().onSlow = func() { slowed <- struct{}{} }
	for i := 0; i < 3; i++ {
		c := dialFrom(t, h.startTLSAddr, net.IPv4(127, 2, 0, byte(1+i)))
		c.Send("a LOGIN alice@example.org wrong\r\n")
		c.Expect("a NO [AUTHENTICATIONFAILED]")
	}
	select {
	case <-slowed:
		t.Fatal("slowed within the user's burst")
	default:
	}
	first := dialFrom(t, h.startTLSAddr, net.IPv4(127, 3, 0, 1))
	first.Send("a LOGIN alice@example.org alicepass\r\n")
	select { // it waits (an hour) before the backend is asked
	case <-slowed:
	case <-time.After(10 * time.Second):
		t.Fatal("a login from a fresh network was not slowed after the user's bucket emptied")
	}
	second := dialFrom(t, h.startTLSAddr, net.IPv4(127, 3, 0, 1))
	second.Send("b LOGIN alice@example.org alicepass\r\n")
	second.Expect("b NO [LIMIT]")
	if got := r.n.Load(); got != 3 {
		t.Errorf("backend asked %d times, want the 3 failures only", got)
	}
	// Closing the server ends the wait without asking the backend.
	h.srv.Close()
	first.ExpectClosed("* BYE")
	if got := r.n.Load(); got != 3 {
		t.Errorf("a slowed login reached the backend after Close (%d asks)", got)
	}
}

// TestConnectionsPerNetwork fills the per-network connection limit from
// two IPv6 addresses of one /64 (as a load balancer's PROXY header says):
// they count together, the next /64 does not.
func TestConnectionsPerNetwork(t *testing.T) {
	addr := startMemBackend(t)
	h := newHarnessListeners(t, fixedRouter(&routing.Backend{ID: "mem1", Addr: addr}), func(o *Options) {
		o.Limits.MaxConnectionsPerIP = 2
	}, Listener{Mode: StartTLS, ProxyProtocolFrom: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}})
	from := func(src string) *conv {
		c := dialConv(t, h.startTLSAddr, nil)
		c.Send("PROXY TCP6 " + src + " 2001:db8::ff 40000 143\r\n")
		return c
	}
	a := from("2001:db8:1:2::1")
	a.Expect("* OK")
	from("2001:db8:1:2:ffff::2").Expect("* OK")
	from("2001:db8:1:2::3").Expect("* BYE [UNAVAILABLE] Too many connections")
	from("2001:db8:1:3::1").Expect("* OK")
	// A connection that ends frees its place in its network.
	a.Send("x LOGOUT\r\n")
	a.Expect("* BYE")
	a.Expect("x OK")
	a.ExpectClosed("* BYE")
	testenv.WaitFor(t, func() bool {
		h.srv.mu.Lock()
		defer h.srv.mu.Unlock()
		return h.srv.perIP[netip.MustParsePrefix("2001:db8:1:2::/64")] == 1
	})
	from("2001:db8:1:2::4").Expect("* OK")
}

// dialFrom connects to an IMAP listener from a loopback source address
// and reads the greeting.
func dialFrom(t *testing.T, addr string, src net.IP) *conv {
	t.Helper()
	c := testenv.DialConvFrom(t, addr, src, nil)
	c.Expect("* OK")
	return c
}
