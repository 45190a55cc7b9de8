package routing

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/imapgate/imapgate/routing/routingtest"
)

// usersOn finds n users whose hash over cfg's default pool is id.
func usersOn(t *testing.T, tb *Table, id string, n int) []string {
	t.Helper()
	var out []string
	for i := 0; len(out) < n && i < 10000; i++ {
		u := fmt.Sprintf("u%d@example.org", i)
		if b, _ := tb.Route(context.Background(), u); b.ID == id {
			out = append(out, u)
		}
	}
	if len(out) < n {
		t.Fatalf("found %d users on %s", len(out), id)
	}
	return out
}

// Defect 3: a drain sends its users to the next backend of their pool;
// the undrain must close those sessions, or new logins go home while the
// old sessions stay on the fallback.
func TestTableDrainAndUndrainEvict(t *testing.T) {
	book := routingtest.NewSessionBook()
	tb, err := NewTable(StaticConfig{Backends: backends("a", "b", "c")}, book, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	users := usersOn(t, tb, "a", 20)
	for _, u := range users {
		book.Add(u, "a")
	}
	if err := tb.SetDrain(ctx, "a", true); err != nil {
		t.Fatal(err)
	}
	for _, u := range users {
		if got := book.On(u); len(got) != 0 {
			t.Fatalf("%s still has sessions on %v after a was drained", u, got)
		}
		b, _ := tb.Route(ctx, u)
		if b.ID == "a" {
			t.Fatalf("%s routed to drained a", u)
		}
		book.Add(u, b.ID) // the client reconnects
	}
	if err := tb.SetDrain(ctx, "a", false); err != nil {
		t.Fatal(err)
	}
	for _, u := range users {
		if got := book.On(u); len(got) != 0 {
			t.Fatalf("%s still has sessions on %v after a was undrained: new logins go to a", u, got)
		}
		if b, _ := tb.Route(ctx, u); b.ID != "a" {
			t.Fatalf("%s routed to %s after the undrain", u, b.ID)
		}
	}
	if err := tb.SetDrain(ctx, "zz", true); !errors.Is(err, ErrUnknownBackend) {
		t.Errorf("drain of an unknown backend: %v", err)
	}
	tb2, _ := NewTable(StaticConfig{Backends: backends("a")}, nil, nil)
	if err := tb2.SetDrain(ctx, "a", true); !errors.Is(err, ErrLastInPool) {
		t.Errorf("drain of the last backend: %v", err)
	}
}

// Defect 4: a reload closes every session of a user on a backend the new
// table does not route them to, even when one of their sessions already
// landed on the new backend (the old scan visited that one first, marked
// the user done and left the others).
func TestTableReloadEvictsEveryMisroutedSession(t *testing.T) {
	book := routingtest.NewSessionBook()
	cfg := StaticConfig{Backends: backends("a", "b")}
	tb, err := NewTable(cfg, book, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	const user = "mover@example.org"
	for range 5 {
		book.Add(user, "a")
	}
	book.Add(user, "b") // a login that routed by the new table during the reload
	next := StaticConfig{Backends: cfg.Backends, Users: map[string]string{user: "b"}}
	n, err := tb.SetConfig(ctx, next)
	if err != nil {
		t.Fatal(err)
	}
	if got := book.On(user); !slices.Equal(got, []string{"b"}) || n != 5 {
		t.Fatalf("after the reload %s has sessions on %v (%d closed), want only b", user, got, n)
	}
}

func TestTableMoveAndWhere(t *testing.T) {
	book := routingtest.NewSessionBook()
	tb, err := NewTable(StaticConfig{Backends: backends("a", "b"), Users: map[string]string{"pinned@x": "a"}}, book, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	u := usersOn(t, tb, "a", 1)[0]
	book.Add(u, "a")
	if err := tb.Move(ctx, u, "b"); err != nil {
		t.Fatal(err)
	}
	if got := book.On(u); len(got) != 0 {
		t.Errorf("after the move %s has sessions on %v", u, got)
	}
	p, err := tb.Where(ctx, u)
	if err != nil || p.Backend != "b" || !p.Pinned || p.Hash != "a" || p.Recorded != "b" {
		t.Errorf("Where after a move: %+v, %v", p, err)
	}
	p, _ = tb.Where(ctx, "Pinned@X")
	if p.Backend != "a" || !p.Pinned || p.Reason != "pinned in [routing.users]" {
		t.Errorf("Where of a pinned user: %+v", p)
	}
	if err := tb.Move(ctx, u, "zz"); !errors.Is(err, ErrUnknownBackend) {
		t.Errorf("move to an unknown backend: %v", err)
	}
	// A reload keeps the move.
	if _, err := tb.SetConfig(ctx, StaticConfig{Backends: backends("a", "b")}); err != nil {
		t.Fatal(err)
	}
	if b, _ := tb.Route(ctx, u); b.ID != "b" {
		t.Errorf("after a reload the moved user routes to %s", b.ID)
	}
}
