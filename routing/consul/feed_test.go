package consul

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

func feedMode(cfg *ConsulConfig) { cfg.UsersWatch = WatchFeed }

// A move through the Operator reaches instances on the change feed and
// one on the full watch (a mixed fleet); a hand-made `consul kv put` is
// seen by the feed once announced; Forget deletes and evicts.
func TestFeedMoveEvicts(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", nil)
	r1, ev1 := f.router(feedMode)
	r2, ev2 := f.router(feedMode)
	r3, ev3 := f.router() // full watch
	waitFor(t, 5*time.Second, "both placeable", placeable(r1, "imap1", "imap2"))
	waitFor(t, 5*time.Second, "both placeable", placeable(r2, "imap1", "imap2"))
	const user = "mover@example.org"
	home := route(t, r1, user)
	for _, r := range []*Consul{r2, r3} {
		waitFor(t, 5*time.Second, "the placement everywhere", func() bool { return route(t, r, user) == home })
	}
	dest := map[string]string{"imap1": "imap2", "imap2": "imap1"}[home]

	start := time.Now()
	if err := r1.Move(context.Background(), user, dest); err != nil {
		t.Fatal(err)
	}
	for _, ev := range []*recEvictor{ev1, ev2, ev3} {
		ev.waitUser(t, user, dest, 2*time.Second)
	}
	t.Logf("three instances evicted %s %v after the move", user, time.Since(start))
	for _, r := range []*Consul{r1, r2, r3} {
		if got := route(t, r, user); got != dest {
			t.Errorf("after the move Route = %s, want %s", got, dest)
		}
	}

	// By hand: invisible to the feed until announced.
	f.kvPut("imapgate/users/"+user, home, 0)
	ev3.waitUser(t, user, home, 2*time.Second)
	if err := r3.Announce(context.Background(), user); err != nil {
		t.Fatal(err)
	}
	ev1.waitUser(t, user, home, 2*time.Second)
	ev2.waitUser(t, user, home, 2*time.Second)
	if got := route(t, r2, user); got != home {
		t.Errorf("after the announced put Route = %s, want %s", got, home)
	}

	// Forget: the entry goes, sessions off the hash's pick close.
	hash := r1.view.Load().def.Pick(user).ID
	if err := r2.Forget(context.Background(), user); err != nil {
		t.Fatal(err)
	}
	if got := f.kvGet("imapgate/users/" + user); got != "" {
		t.Errorf("after Forget the entry is %q", got)
	}
	if hash != home {
		ev1.waitUser(t, user, hash, 2*time.Second)
	}
	if got := route(t, r1, user); got != hash {
		t.Errorf("after Forget Route = %s, want the hash's %s", got, hash)
	}
}

// A feed instance holds nothing about users it never saw, and reads a
// user's entry once, at their first login.
func TestFeedReadsOnMiss(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", nil)
	for i := range 50 {
		f.kvPut(fmt.Sprintf("imapgate/users/u%02d@example.org", i), "imap2", 0)
	}
	r, _ := f.router(feedMode)
	waitFor(t, 5*time.Second, "both placeable", placeable(r, "imap1", "imap2"))
	if n := r.cache.len(); n != 0 {
		t.Fatalf("a fresh feed router caches %d users, want 0", n)
	}
	for range 3 {
		if got := route(t, r, "u07@example.org"); got != "imap2" {
			t.Fatalf("Route = %s, want the recorded imap2", got)
		}
	}
	if n := r.cache.len(); n != 1 {
		t.Errorf("after one user's logins the cache holds %d, want 1", n)
	}
	if n := counterValue(t, r.metrics.cacheMisses); n != 1 {
		t.Errorf("%v reads for three logins of one user, want 1", n)
	}
	// A new user: created with check-and-set, cached from the write.
	route(t, r, "new@example.org")
	if a, ok := r.cache.get("new@example.org"); !ok || a.index == 0 {
		t.Errorf("new user cached as %+v %v, want its entry with its index", a, ok)
	}
}

// The cache stays within CacheSize but never forgets a user with a live
// session: a move of such a user still evicts.
func TestFeedCacheBoundedKeepsLive(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", nil)
	book := newScaleBook()
	r, _ := f.router(feedMode, func(c *ConsulConfig) { c.CacheSize = 10; c.Evictor = book })
	mover, _ := f.router(feedMode)
	waitFor(t, 5*time.Second, "both placeable", placeable(r, "imap1", "imap2"))
	waitFor(t, 5*time.Second, "both placeable", placeable(mover, "imap1", "imap2"))
	const live = "live00@example.org"
	book.Add(live, route(t, r, live))
	for i := range 100 {
		route(t, r, fmt.Sprintf("u%03d@example.org", i))
	}
	waitFor(t, 5*time.Second, "the cache trimmed", func() bool { return r.cache.len() <= 10 })
	if !r.cache.has(live) {
		t.Fatal("the trim dropped a user with a live session")
	}
	from := book.On(live)[0]
	to := map[string]string{"imap1": "imap2", "imap2": "imap1"}[from]
	evicted := book.watch(live)
	if err := mover.Move(context.Background(), live, to); err != nil {
		t.Fatal(err)
	}
	select {
	case <-evicted:
	case <-time.After(2 * time.Second):
		t.Fatal("the live user's move did not evict within 2s")
	}
}

// An instance that missed more changes than a shard keeps (here: the
// shard jumps by far more than its ring) re-reads its live users and
// evicts those that moved meanwhile.
func TestFeedGapResyncs(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", nil)
	r, ev := f.router(feedMode)
	waitFor(t, 5*time.Second, "both placeable", placeable(r, "imap1", "imap2"))
	book := newScaleBook()
	r.cfg.Evictor = book // reads RoutedUsers; evictions still go to ev's counterpart below
	const user = "gap@example.org"
	home := route(t, r, user)
	book.Add(user, home)
	dest := map[string]string{"imap1": "imap2", "imap2": "imap1"}[home]
	evicted := book.watch(user)

	// A move by hand and a shard that jumped: as if thousands of changes
	// went by while this instance was away.
	f.kvPut("imapgate/users/"+user, dest, 0)
	key := r.feedKey(shardOf(user))
	val, _ := json.Marshal(feedValue{Version: feedVersion, Seq: 10000, Users: []string{"someone-else@example.org"}})
	if _, err := f.api.KV().Put(&api.KVPair{Key: key, Value: val}, nil); err != nil {
		t.Fatal(err)
	}
	select {
	case <-evicted:
	case <-time.After(2 * time.Second):
		t.Fatal("no eviction after a gap in the feed")
	}
	if n := counterValue(t, r.metrics.feedGaps); n != 1 {
		t.Errorf("feed gaps = %v, want 1", n)
	}
	_ = ev
}

func TestParseUsersWatch(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want UsersWatch
		err  bool
	}{{"", WatchFull, false}, {"full", WatchFull, false}, {" Feed ", WatchFeed, false}, {"cache", 0, true}} {
		got, err := ParseUsersWatch(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("ParseUsersWatch(%q) = %v, %v", tc.in, got, err)
		}
	}
}

// A re-placement after the old backend is gone goes through the feed: an
// instance that cached the user on the old backend follows it, so when
// the old backend returns the user is not split over both.
func TestFeedReplacementAnnounced(t *testing.T) {
	f := newFixture(t)
	b1 := f.backend("imap1", nil)
	f.backend("imap2", nil)
	grace := func(c *ConsulConfig) { c.Grace = time.Second }
	r1, _ := f.router(feedMode, grace)
	r2, _ := f.router(feedMode, grace)
	waitFor(t, 5*time.Second, "both placeable", placeable(r1, "imap1", "imap2"))
	waitFor(t, 5*time.Second, "both placeable", placeable(r2, "imap1", "imap2"))
	var user string
	for i := 0; user == ""; i++ {
		if u := fmt.Sprintf("r%d@example.org", i); route(t, r1, u) == "imap1" {
			user = u
		}
	}
	if got := route(t, r2, user); got != "imap1" {
		t.Fatalf("second instance routes %s to %s, want imap1", user, got)
	}

	b1.down(t)
	waitFor(t, 10*time.Second, "imap1 gone on the first instance", func() bool { return route(t, r1, user) == "imap2" })
	waitFor(t, 5*time.Second, "the second instance to follow the re-placement", func() bool {
		a, ok := r2.cache.get(user)
		return ok && a.backend == "imap2"
	})
	b1.up(t)
	waitFor(t, 10*time.Second, "imap1 back", placeable(r2, "imap1", "imap2"))
	if got := route(t, r2, user); got != "imap2" {
		t.Errorf("after imap1 returned the second instance routes %s to %s, want imap2 (where the first re-placed them)", user, got)
	}
}

// A hand-made put nobody announced is still caught: the periodic check
// re-reads the live users' entries and evicts, so such a change splits a
// user for at most VerifyInterval (here 300ms), not for ever.
func TestFeedVerifyCatchesUnannouncedPut(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", nil)
	r, ev := f.router(feedMode, func(c *ConsulConfig) { c.VerifyInterval = 300 * time.Millisecond })
	waitFor(t, 5*time.Second, "both placeable", placeable(r, "imap1", "imap2"))
	const user = "unannounced@example.org"
	home := route(t, r, user)
	other := map[string]string{"imap1": "imap2", "imap2": "imap1"}[home]
	f.kvPut("imapgate/users/"+user, other, 0)
	ev.waitUser(t, user, other, 5*time.Second)
	if got := route(t, r, user); got != other {
		t.Errorf("after the check Route = %s, want %s", got, other)
	}
	// The check evicts before it counts what it verified: wait for the
	// count rather than read it at once (a CI run read 0 a millisecond
	// before the check logged it).
	waitFor(t, 5*time.Second, "the check's count of verified users", func() bool { return counterValue(t, r.metrics.verified) >= 1 })

	// With Consul down the check fails (logged, nothing evicted, the loop
	// goes on); a put made while it was down is caught once it is back.
	f.consul.Stop(t)
	failed := r.metrics.watchErrors.WithLabelValues("verify")
	waitFor(t, 10*time.Second, "a failed check with Consul down", func() bool { return counterValue(t, failed) >= 1 })
	f.consul.Start(t)
	f.kvPut("imapgate/users/"+user, home, 0)
	ev.waitUser(t, user, home, 10*time.Second)
}
