package consul

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/imapgate/imapgate/routing"
	"github.com/imapgate/imapgate/routing/routingtest"
)

// commit is Route + Commit, failing the test on an error.
func commit(t testing.TB, r *Consul, user string, b *routing.Backend) string {
	t.Helper()
	got, err := r.Commit(context.Background(), user, b)
	if err != nil {
		t.Fatalf("Commit(%q, %s): %v", user, b.ID, err)
	}
	return got.ID
}

func (f *fixture) userKeys() []string {
	f.t.Helper()
	keys, _, err := f.api.KV().Keys("imapgate/users/", "", nil)
	if err != nil {
		f.t.Fatal(err)
	}
	return keys
}

// Defect 2: Route runs before the backend checks the password, so it must
// not write anything; only Commit (after the backend's OK) records.
func TestConsulRouteRecordsNothing(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", nil)
	r, _ := f.router(func(c *ConsulConfig) { c.PlaceRate = -1 })
	for i := range 100 {
		if _, err := r.Route(context.Background(), fmt.Sprintf("stranger%d@example.org", i)); err != nil {
			t.Fatal(err)
		}
	}
	if keys := f.userKeys(); len(keys) != 0 {
		t.Fatalf("Route of 100 unauthenticated names wrote %d KV entries: %v", len(keys), keys[:min(5, len(keys))])
	}
	id := route(t, r, "real@example.org") // Route + Commit: a login the backend accepted
	if got := f.kvGet("imapgate/users/real@example.org"); got != id {
		t.Errorf("committed user recorded as %q, served on %s", got, id)
	}
}

// Defect 1: a user re-placed while their backend was gone, without the
// re-placement being recorded, must not stay on the second backend once
// the first returns (new logins go back there).
func TestConsulUnrecordedRouteEvictedWhenBackendReturns(t *testing.T) {
	f := newFixture(t)
	b1 := f.backend("imap1", nil)
	f.backend("imap2", nil)
	// One placement per ~17 minutes, burst 1: the first commit takes the
	// token, the re-placement finds none.
	r, ev := f.router(func(c *ConsulConfig) { c.Grace = 500 * time.Millisecond; c.PlaceRate = 0.001 })
	waitFor(t, 5*time.Second, "both placeable", placeable(r, "imap1", "imap2"))
	const user = "returner@example.org"
	f.kvPut("imapgate/users/"+user, "imap1", 0)
	waitFor(t, 5*time.Second, "entry in view", func() bool { return route(t, r, user) == "imap1" })
	commit(t, r, "token-eater@example.org", r.view.Load().routable["imap2"])

	b1.down(t)
	select {
	case <-ev.backends:
	case <-time.After(10 * time.Second):
		t.Fatal("imap1 never declared gone")
	}
	if got := route(t, r, user); got != "imap2" {
		t.Fatalf("with imap1 gone the user is served on %s, want imap2", got)
	}
	if got := f.kvGet("imapgate/users/" + user); got != "imap1" {
		t.Fatalf("KV says %q: the re-placement was recorded, the test needs it unrecorded", got)
	}
	if r.unrecordedRoutes()[user].backend != "imap2" {
		t.Fatalf("unrecorded routes: %v", r.unrecordedRoutes())
	}

	for len(ev.users) > 0 { // the entry's first appearance evicted too
		<-ev.users
	}
	b1.up(t)
	ev.waitUser(t, user, "imap1", 10*time.Second)
	if got := route(t, r, user); got != "imap1" {
		t.Errorf("after imap1 returned new logins go to %s", got)
	}
}

// An unrecorded route (Consul down at login) is written in the background
// once Consul is back, without waiting for another login.
func TestConsulUnrecordedRouteRecordedLater(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", nil)
	r, _ := f.router(func(c *ConsulConfig) { c.PlaceTimeout = 300 * time.Millisecond })
	f.consul.Stop(t)
	waitFor(t, 10*time.Second, "the router to notice the outage", func() bool { return r.ViewAge() > 0 })
	const user = "offline@example.org"
	id := route(t, r, user)
	f.consul.Start(t)
	waitFor(t, 20*time.Second, "the route to be recorded", func() bool {
		p, _, err := f.api.KV().Get("imapgate/users/"+user, nil)
		return err == nil && p != nil && string(p.Value) == id
	})
	waitFor(t, 5*time.Second, "the route to leave the unrecorded set", func() bool { return len(r.unrecordedRoutes()) == 0 })
}

// A move that keeps the flags evicts; a flag change that keeps the
// backend (an unpin, a pin in place) evicts nobody.
func TestConsulEvictsOnBackendNotFlags(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", nil)
	r, ev := f.router()
	const user = "flags@example.org"
	f.kvPut("imapgate/users/"+user, "imap1", 0)
	waitFor(t, 5*time.Second, "entry in view", func() bool { return route(t, r, user) == "imap1" })

	f.kvPut("imapgate/users/"+user, "imap2", 0) // flags 0 → 0, backend changes
	ev.waitUser(t, user, "imap2", 3*time.Second)

	f.kvPut("imapgate/users/"+user, "imap2", FlagPinned) // flag changes, backend stays
	waitFor(t, 5*time.Second, "the pin in view", func() bool {
		a, ok := r.view.Load().users[user]
		return ok && a.pinned()
	})
	// The marker move after it proves the flag change was processed.
	f.kvPut("imapgate/users/marker@example.org", "imap1", 0)
	for {
		select {
		case e := <-ev.users:
			if e.user == user {
				t.Fatalf("a pin flag change without a move evicted %v", e)
			}
			if e.user != "marker@example.org" {
				continue
			}
		case <-time.After(5 * time.Second):
			t.Fatal("marker never seen")
		}
		break
	}
}

// A deleted entry evicts the user everywhere but where their next login
// lands (the hash).
func TestConsulDeleteEvicts(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", nil)
	r, ev := f.router()
	waitFor(t, 5*time.Second, "both placeable", placeable(r, "imap1", "imap2"))
	const user = "forgotten@example.org"
	hash := r.view.Load().def.Pick(user).ID
	other := map[string]string{"imap1": "imap2", "imap2": "imap1"}[hash]
	f.kvPut("imapgate/users/"+user, other, 0)
	waitFor(t, 5*time.Second, "entry in view", func() bool { return route(t, r, user) == other })
	if _, err := f.api.KV().Delete("imapgate/users/"+user, nil); err != nil {
		t.Fatal(err)
	}
	ev.waitUser(t, user, hash, 3*time.Second)
}

// Defect 6: a listing older than the one applied (a lagging server's
// stale answer) must not undo a move.
func TestConsulStaleListingIgnored(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", nil)
	r, ev := f.router()
	const user = "moved@example.org"
	f.kvPut("imapgate/users/"+user, "imap1", 0)
	waitFor(t, 5*time.Second, "entry in view", func() bool { return route(t, r, user) == "imap1" })
	old, meta, err := f.api.KV().List("imapgate/users/", nil)
	if err != nil {
		t.Fatal(err)
	}
	f.kvPut("imapgate/users/"+user, "imap2", 0)
	ev.waitUser(t, user, "imap2", 3*time.Second)

	// The listing from before the move arrives late, as from a follower.
	if err := r.takeListing(context.Background(), kvUsers, old, meta.LastIndex, false, time.Now()); err != nil {
		t.Fatal(err)
	}
	if got := route(t, r, user); got != "imap2" {
		t.Errorf("a stale listing moved the user back to %s", got)
	}
	select {
	case e := <-ev.users:
		t.Errorf("a stale listing evicted %v", e)
	default:
	}
}

// blockingEvictor blocks EvictUser for one user until released, like a
// kick stuck behind clients that do not read.
type blockingEvictor struct {
	*recEvictor
	stuck   string
	release chan struct{}
	once    sync.Once
	entered chan struct{}
}

func (e *blockingEvictor) EvictUser(user, keep string) int {
	if user == e.stuck {
		e.once.Do(func() { close(e.entered) })
		<-e.release
	}
	return e.recEvictor.EvictUser(user, keep)
}

// Defect 7 (the router's half): a slow eviction does not hold up the
// watch or the other users' evictions.
func TestConsulSlowEvictionDoesNotBlock(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", nil)
	be := &blockingEvictor{recEvictor: newRecEvictor(), stuck: "stuck@example.org",
		release: make(chan struct{}), entered: make(chan struct{})}
	defer close(be.release)
	r, _ := f.router(func(c *ConsulConfig) { c.Evictor = be })
	f.kvPut("imapgate/users/stuck@example.org", "imap1", 0)
	f.kvPut("imapgate/users/free@example.org", "imap1", 0)
	waitFor(t, 5*time.Second, "entries in view", func() bool { return len(r.view.Load().users) == 2 })

	f.kvPut("imapgate/users/stuck@example.org", "imap2", 0)
	select {
	case <-be.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("stuck user's eviction never started")
	}
	f.kvPut("imapgate/users/free@example.org", "imap2", 0)
	be.waitUser(t, "free@example.org", "imap2", 3*time.Second)
	if got := route(t, r, "free@example.org"); got != "imap2" {
		t.Errorf("view not updated while an eviction is stuck: %s", got)
	}
}

// The placement a lost race answers is the winner's, even when the
// instances would pick differently (deterministic: the entry exists
// before the loser writes).
func TestConsulCommitLosesRaceToDifferentBackend(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", nil)
	r, _ := f.router()
	waitFor(t, 5*time.Second, "both placeable", placeable(r, "imap1", "imap2"))
	for i := range 5 {
		user := fmt.Sprintf("loser%d@example.org", i)
		if _, _, err := f.api.KV().CAS(&api.KVPair{Key: "imapgate/users/" + user, Value: []byte("imap2")}, nil); err != nil {
			t.Fatal(err)
		}
		got, err := r.record(context.Background(), user, r.view.Load().routable["imap1"], 0)
		if err != nil || got.ID != "imap2" {
			t.Fatalf("record after losing: %v, %v; want the winner imap2", got, err)
		}
	}
}

// Found by the model test: deleting the entry of a user whose session is
// on the backend the hash picks left that session without a record, so
// nothing would evict it once the hash moved. It is now an unrecorded
// route: recorded again in the background (or evicted on divergence).
func TestConsulDeletedEntryWithSessionIsRecordedAgain(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", nil)
	book := routingtest.NewSessionBook()
	r, _ := f.router(func(c *ConsulConfig) { c.Evictor = book })
	waitFor(t, 5*time.Second, "both placeable", placeable(r, "imap1", "imap2"))
	const user = "kept@example.org"
	hash := r.view.Load().def.Pick(user).ID
	f.kvPut("imapgate/users/"+user, hash, 0)
	waitFor(t, 5*time.Second, "entry in view", func() bool { return route(t, r, user) == hash })
	book.Add(user, hash)
	if _, err := f.api.KV().Delete("imapgate/users/"+user, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the entry to be written again", func() bool { return f.kvGet("imapgate/users/"+user) == hash })
	if got := book.On(user); !slices.Equal(got, []string{hash}) {
		t.Errorf("sessions after the delete: %v", got)
	}
}

func TestConsulOperator(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", nil)
	r, ev := f.router(func(c *ConsulConfig) { c.PlaceRate = -1 })
	ctx := context.Background()
	waitFor(t, 5*time.Second, "both placeable", placeable(r, "imap1", "imap2"))

	const user = "op@example.org"
	p, err := r.Where(ctx, user)
	if err != nil || p.Recorded != "" || p.Backend == "" || p.Backend != p.Hash || p.Pool != "default pool" {
		t.Fatalf("Where of a new user: %+v, %v", p, err)
	}
	home := route(t, r, user)
	if p, _ = r.Where(ctx, user); p.Recorded != home || p.Pinned || !strings.HasPrefix(p.Reason, "placed in consul KV ("+home+" is passing)") {
		t.Errorf("Where after a login: %+v", p)
	}
	dest := map[string]string{"imap1": "imap2", "imap2": "imap1"}[home]
	if err := r.Move(ctx, user, dest); err != nil {
		t.Fatal(err)
	}
	ev.waitUser(t, user, dest, 3*time.Second)
	if p, _ = r.Where(ctx, user); p.Backend != dest || !p.Pinned || !strings.HasPrefix(p.Reason, "pinned in consul KV") {
		t.Errorf("Where after a move: %+v", p)
	}
	if err := r.Move(ctx, user, "nope"); !errors.Is(err, routing.ErrUnknownBackend) {
		t.Errorf("Move to an unknown backend: %v", err)
	}

	if err := r.SetDrain(ctx, "imap1", true); err != nil {
		t.Fatal(err)
	}
	for _, b := range r.Backends(ctx) {
		if b.ID == "imap1" && (!b.Drain || b.Placeable || !b.Up) {
			t.Errorf("drained imap1: %+v", b)
		}
	}
	if got := f.kvGet("imapgate/drain/imap1"); got != "true" {
		t.Errorf("drain key = %q", got)
	}
	if err := r.SetDrain(ctx, "imap1", false); err != nil {
		t.Fatal(err)
	}
	if err := r.SetDrain(ctx, "nope", true); !errors.Is(err, routing.ErrUnknownBackend) {
		t.Errorf("drain of an unknown backend: %v", err)
	}
}
