package consul

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap/zaptest"
)

// readSnapshotFile decodes the snapshot at path (nil if it is missing or
// not yet complete).
func readSnapshotFile(t testing.TB, path string) *snapshotState {
	t.Helper()
	data, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	s, err := decodeSnapshot(data, nil)
	if err != nil {
		t.Fatalf("snapshot %s does not decode: %v", path, err)
	}
	return s
}

// TestConsulSnapshotStart: a router with Consul up writes a snapshot; a
// second one started while Consul is down serves the known users from it,
// reports degraded and records nothing; when Consul returns it catches up
// and evicts the sessions of a user moved while it was down.
func TestConsulSnapshotStart(t *testing.T) { runSnapshotStart(t, WatchFull) }

// TestFeedSnapshotStart is the same with the change feed: the snapshot
// holds the cached users, and once Consul answers the restarted router
// re-reads them (it cannot know what the feed said meanwhile).
func TestFeedSnapshotStart(t *testing.T) { runSnapshotStart(t, WatchFeed) }

func runSnapshotStart(t *testing.T, watch UsersWatch) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", nil)
	path := filepath.Join(t.TempDir(), "state", "consul-snapshot.json")
	snap := func(c *ConsulConfig) {
		c.SnapshotFile = path
		c.SnapshotInterval = 50 * time.Millisecond
		c.PlaceTimeout = 300 * time.Millisecond
		c.UsersWatch = watch
	}

	r1, _ := f.router(snap)
	waitFor(t, 10*time.Second, "both backends placeable", placeable(r1, "imap1", "imap2"))
	known := map[string]string{}
	for i := range 20 {
		u := fmt.Sprintf("s%d@example.org", i)
		known[u] = route(t, r1, u)
	}
	waitFor(t, 10*time.Second, "the snapshot to hold every user", func() bool {
		s := readSnapshotFile(t, path)
		return s != nil && len(s.users) == len(known) && len(s.states) == 2
	})
	r1.Close()
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("snapshot file mode: %v %v; want 0600 (it names users)", fi.Mode(), err)
	}

	// Move one user while no router watches: the snapshot still has the
	// old backend.
	mover := "s0@example.org"
	from := known[mover]
	to := "imap1"
	if from == to {
		to = "imap2"
	}
	f.kvPut("imapgate/users/"+mover, to, 0)
	f.consul.Stop(t)

	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	r2, ev := f.router(snap)
	if r2.SnapshotAge() <= 0 || r2.ViewAge() <= 0 {
		t.Fatalf("started without Consul: SnapshotAge %v ViewAge %v, want both > 0", r2.SnapshotAge(), r2.ViewAge())
	}
	if !r2.Ready() {
		t.Error("not Ready when serving from a snapshot")
	}
	for u, id := range known {
		if got := route(t, r2, u); got != id {
			t.Errorf("from the snapshot %s routed to %s, want %s", u, got, id)
		}
	}
	// A new user is served by hashing, as an unrecorded route (on the
	// feed: refused, since this instance cannot know whether the user
	// lives elsewhere).
	newbie := "newbie@example.org"
	if watch == WatchFeed {
		if _, err := r2.Route(context.Background(), newbie); !errors.Is(err, routing.ErrNoBackend) {
			t.Errorf("feed: a user not in the snapshot while Consul is down: err %v, want ErrNoBackend", err)
		}
	} else {
		nb := route(t, r2, newbie)
		if e, ok := r2.unrecordedRoutes()[newbie]; !ok || e.backend != nb {
			t.Errorf("new user while degraded: unrecorded routes %v, want %s → %s", r2.unrecordedRoutes(), newbie, nb)
		}
	}
	if got := counterValue(t, r2.metrics.snapshotWrites.WithLabelValues("ok")); got != 0 {
		t.Errorf("%v snapshot writes while degraded, want none", got)
	}
	if after, _ := os.ReadFile(path); string(after) != string(before) {
		t.Error("the snapshot file changed while serving from it")
	}

	f.consul.Start(t)
	ev.waitUser(t, mover, to, 20*time.Second)
	waitFor(t, 20*time.Second, "the router to leave degraded mode", func() bool { return r2.SnapshotAge() == 0 })
	// Right after Consul restarts its checks may be critical until they
	// run: wait for them before routing.
	waitFor(t, 10*time.Second, "both backends placeable again", placeable(r2, "imap1", "imap2"))
	if got := route(t, r2, mover); got != to {
		t.Errorf("after Consul returned %s routed to %s, want %s", mover, got, to)
	}
	// The newbie's unrecorded route is recorded late, or evicted if
	// Route's answer moved first (the critical checks); either way it is
	// settled, and the next login records it.
	waitFor(t, 10*time.Second, "the unrecorded route to settle", func() bool { return len(r2.unrecordedRoutes()) == 0 })
	if id := route(t, r2, newbie); f.kvGet("imapgate/users/"+newbie) != id {
		t.Errorf("new user served by %s, recorded as %q", id, f.kvGet("imapgate/users/"+newbie))
	}
	waitFor(t, 10*time.Second, "a fresh snapshot with the move", func() bool {
		s := readSnapshotFile(t, path)
		return s != nil && s.users[mover].backend == to && s.users[newbie].backend != ""
	})
}

// snapshotJSON is a valid snapshot for service imap, prefix imapgate,
// with mod applied.
func snapshotJSON(t testing.TB, addr string, mod func(*snapshotFile)) []byte {
	t.Helper()
	f := snapshotFile{
		Format: snapshotFormat, Version: snapshotVersion, Service: testService, Prefix: "imapgate",
		Taken: time.Now().Add(-time.Minute).UTC(),
		Backends: []snapshotBackend{
			{ID: "imap1", Addr: addr, Security: "none", Weight: 1, Health: api.HealthPassing},
			{ID: "imap2", Addr: "127.0.0.1:2", Security: "tls", TLSServerName: "mail.example.org", Weight: 2,
				Health: api.HealthCritical, DownSince: time.Now().Add(-2 * time.Minute)},
		},
		Users:   []snapshotUser{{User: "alice@example.org", Backend: "imap1", Index: 7}},
		Domains: map[string]string{},
		Drain:   map[string]bool{},
	}
	if mod != nil {
		mod(&f)
	}
	data, err := json.Marshal(&f)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func closedAddr(t testing.TB) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// TestConsulSnapshotRefused: without a usable snapshot a start without
// Consul fails as before, and says why the snapshot was not used.
func TestConsulSnapshotRefused(t *testing.T) {
	consul := closedAddr(t)
	valid := snapshotJSON(t, "127.0.0.1:1", nil)
	for _, tc := range []struct {
		name string
		data []byte // nil: no file
		want string // in the error; "" means the start succeeds
	}{
		{"valid", valid, ""},
		{"missing", nil, "no snapshot"},
		{"too old", snapshotJSON(t, "127.0.0.1:1", func(f *snapshotFile) { f.Taken = time.Now().Add(-25 * time.Hour) }), "older than the 24h0m0s allowed"},
		{"future", snapshotJSON(t, "127.0.0.1:1", func(f *snapshotFile) { f.Taken = time.Now().Add(time.Hour) }), "in the future"},
		{"truncated", valid[:len(valid)/2], "not a snapshot"},
		{"garbage", []byte("\x00\x01 not json"), "not a snapshot"},
		{"empty", []byte{}, "not a snapshot"},
		{"other prefix", snapshotJSON(t, "127.0.0.1:1", func(f *snapshotFile) { f.Prefix = "other" }), `prefix "other"`},
		{"other service", snapshotJSON(t, "127.0.0.1:1", func(f *snapshotFile) { f.Service = "pop3" }), `service "pop3"`},
		{"other format", snapshotJSON(t, "127.0.0.1:1", func(f *snapshotFile) { f.Format = "x" }), "format"},
		{"newer version", snapshotJSON(t, "127.0.0.1:1", func(f *snapshotFile) { f.Version = 2 }), "version 2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "snap.json")
			if tc.data != nil {
				if err := os.WriteFile(path, tc.data, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			r, err := NewConsul(ctx, ConsulConfig{Address: consul, Service: testService, SnapshotFile: path,
				RetryMax: 100 * time.Millisecond, Logger: zaptest.NewLogger(t)})
			if tc.want == "" {
				if err != nil {
					t.Fatalf("start from a valid snapshot: %v", err)
				}
				defer r.Close()
				if r.SnapshotAge() < time.Minute || !r.Ready() {
					t.Errorf("SnapshotAge %v Ready %v, want ≥ 1m and true", r.SnapshotAge(), r.Ready())
				}
				if got := route(t, r, "alice@example.org"); got != "imap1" {
					t.Errorf("alice routed to %s, want imap1", got)
				}
				return
			}
			if err == nil {
				r.Close()
				t.Fatalf("start succeeded, want an error with %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "unreachable at start-up") {
				t.Errorf("error %q, want it to contain %q and name Consul", err, tc.want)
			}
		})
	}
}

// TestDecodeSnapshot: what the decoder refuses in a file that parses.
func TestDecodeSnapshot(t *testing.T) {
	for _, tc := range []struct {
		name string
		mod  func(*snapshotFile)
		want string
	}{
		{"ok", nil, ""},
		{"no service", func(f *snapshotFile) { f.Service = "" }, "without service"},
		{"no time", func(f *snapshotFile) { f.Taken = time.Time{} }, "without service"},
		{"backend without ID", func(f *snapshotFile) { f.Backends[0].ID = "" }, "no ID"},
		{"bad addr", func(f *snapshotFile) { f.Backends[0].Addr = "nohost" }, "bad address"},
		{"bad port", func(f *snapshotFile) { f.Backends[0].Addr = "h:99999" }, "bad port"},
		{"bad security", func(f *snapshotFile) { f.Backends[0].Security = "rot13" }, "unknown backend security"},
		{"zero weight", func(f *snapshotFile) { f.Backends[0].Weight = 0 }, "weight 0"},
		{"bad proxy protocol", func(f *snapshotFile) { f.Backends[0].ProxyProtocol = 3 }, "proxy protocol 3"},
		{"bad health", func(f *snapshotFile) { f.Backends[0].Health = "great" }, "unknown health"},
		{"down without since", func(f *snapshotFile) { f.Backends[1].DownSince = time.Time{} }, "without a down_since"},
		{"duplicate backend", func(f *snapshotFile) { f.Backends[1].ID = "imap1" }, "listed twice"},
		{"user not normalised", func(f *snapshotFile) { f.Users[0].User = "Alice@Example.org" }, "bad user"},
		{"user without backend", func(f *snapshotFile) { f.Users[0].Backend = " " }, "bad user"},
		{"duplicate user", func(f *snapshotFile) { f.Users = append(f.Users, f.Users[0]) }, "listed twice"},
		{"domain not normalised", func(f *snapshotFile) { f.Domains["Example.ORG"] = "tag:x" }, "not normalised"},
		{"drain without ID", func(f *snapshotFile) { f.Drain[""] = true }, "without a backend ID"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := decodeSnapshot(snapshotJSON(t, "127.0.0.1:1", tc.mod), nil)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				b := s.states["imap2"].b
				if b.Security != routing.SecurityTLS || b.TLS == nil || b.TLS.ServerName != "mail.example.org" || b.Weight != 2 {
					t.Errorf("imap2 restored as %+v", b)
				}
				if a := s.users["alice@example.org"]; a.backend != "imap1" || a.index != 7 {
					t.Errorf("alice restored as %+v", a)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want %q", err, tc.want)
			}
		})
	}
	if _, err := decodeSnapshot(append(snapshotJSON(t, "127.0.0.1:1", nil), "{}"...), nil); err == nil {
		t.Error("data after the object accepted")
	}
	if _, err := decodeSnapshot([]byte(`{"format":"imapgate-consul-snapshot","version":1,"surprise":1}`), nil); err == nil {
		t.Error("unknown field accepted")
	}
}

// FuzzDecodeSnapshot: the decoder reads a file from disk; whatever it
// holds, decoding never panics, and what it accepts is usable.
func FuzzDecodeSnapshot(f *testing.F) {
	f.Add(snapshotJSON(f, "127.0.0.1:1", nil))
	f.Add(snapshotJSON(f, "[::1]:143", func(s *snapshotFile) { s.Domains["example.org"] = "tag:a" }))
	f.Add([]byte(`{"format":"imapgate-consul-snapshot","version":1}`))
	f.Add([]byte(`{"users":[{"u":"","b":""}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := decodeSnapshot(data, nil)
		if err != nil {
			return
		}
		for id, st := range s.states {
			if st.b == nil || st.b.ID != id || st.b.Weight < 1 || st.b.Addr == "" {
				t.Fatalf("accepted unusable backend %q: %+v", id, st.b)
			}
		}
		for u, a := range s.users {
			if u == "" || a.backend == "" {
				t.Fatalf("accepted unusable user %q: %+v", u, a)
			}
		}
		// A restored view can be built from whatever was accepted.
		c := &Consul{log: zaptest.NewLogger(t), changed: make(chan struct{}, 1), snapWake: make(chan struct{}, 1)}
		c.states, c.kvUsers, c.kvDomain, c.kvDrain = s.states, s.users, s.domains, s.drain
		c.buildView()
		for u := range s.users {
			c.answer(c.view.Load(), u)
		}
	})
}

// BenchmarkConsulSnapshot measures what a snapshot of 100,000 users costs:
// encoding and writing it (atomic, fsync) and reading it back at start.
func BenchmarkConsulSnapshot(b *testing.B) {
	const users = 100000
	c := &Consul{cfg: ConsulConfig{Service: testService, Prefix: "imapgate"}, states: map[string]*backendState{}}
	for i := range 10 {
		id := fmt.Sprintf("imap%d", i)
		c.states[id] = &backendState{b: &routing.Backend{ID: id, Addr: fmt.Sprintf("10.0.0.%d:143", i+1), Weight: 1}, health: api.HealthPassing}
	}
	c.kvUsers = make(map[string]assignment, users)
	for i := range users {
		c.kvUsers[fmt.Sprintf("user%d@example.org", i)] = assignment{backend: fmt.Sprintf("imap%d", i%10), index: uint64(i + 1)}
	}
	path := filepath.Join(b.TempDir(), "snap.json")
	b.Run("write", func(b *testing.B) {
		for b.Loop() {
			data, err := c.encodeSnapshot(time.Now())
			if err != nil {
				b.Fatal(err)
			}
			if err := writeFileAtomic(path, data); err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(len(data)))
		}
	})
	data, err := os.ReadFile(path)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("read", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			if _, err := decodeSnapshot(data, nil); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// TestConsulSnapshotRefresh: a view that does not change is still written
// again (else a steady instance's snapshot would age past SnapshotMaxAge
// while Consul confirms it), and a snapshot that cannot be written costs
// routing nothing.
func TestConsulSnapshotRefresh(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	path := filepath.Join(t.TempDir(), "snap.json")
	r, _ := f.router(func(c *ConsulConfig) {
		c.SnapshotFile = path
		c.SnapshotInterval = 50 * time.Millisecond
		c.SnapshotMaxAge = 400 * time.Millisecond // rewritten every 100ms
	})
	waitFor(t, 10*time.Second, "a first snapshot", func() bool { return readSnapshotFile(t, path) != nil })
	first := readSnapshotFile(t, path).taken
	waitFor(t, 5*time.Second, "the unchanged view to be written again", func() bool {
		return readSnapshotFile(t, path).taken.After(first)
	})
	if r.SnapshotAge() != 0 {
		t.Errorf("SnapshotAge %v with Consul up, want 0", r.SnapshotAge())
	}

	bad, _ := f.router(func(c *ConsulConfig) {
		c.SnapshotFile = "/dev/null/snap.json"
		c.SnapshotInterval = 50 * time.Millisecond
	})
	waitFor(t, 5*time.Second, "a failed write counted", func() bool {
		return counterValue(t, bad.metrics.snapshotWrites.WithLabelValues("error")) > 0
	})
	if got := route(t, bad, "alice@example.org"); got != "imap1" {
		t.Errorf("alice routed to %s", got)
	}
}
