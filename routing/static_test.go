package routing

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"math"
	"strings"
	"testing"
)

func backends(ids ...string) map[string]*Backend {
	m := make(map[string]*Backend, len(ids))
	for i, id := range ids {
		m[id] = &Backend{Addr: fmt.Sprintf("10.0.0.%d:143", i+1)}
	}
	return m
}

func mustStatic(t testing.TB, cfg StaticConfig) *Static {
	t.Helper()
	s, err := NewStatic(cfg)
	if err != nil {
		t.Fatalf("NewStatic: %v", err)
	}
	return s
}

func TestStaticRoute(t *testing.T) {
	cfg := StaticConfig{
		Backends: backends("a", "b", "c", "d"),
		Users:    map[string]string{"Pinned@Example.org": "d", "bob@tenant.example": "a"},
		Domains:  map[string][]string{"Tenant.Example": {"c"}, "two.example": {"a", "b"}},
		Default:  []string{"a", "b"},
	}
	s := mustStatic(t, cfg)
	for _, tc := range []struct {
		user string
		in   []string // acceptable backends
	}{
		{"pinned@example.org", []string{"d"}},
		{"  PINNED@example.ORG ", []string{"d"}}, // normalized
		{"bob@tenant.example", []string{"a"}},    // pin beats domain
		{"carol@tenant.example", []string{"c"}},  // domain pool
		{"CAROL@TENANT.EXAMPLE", []string{"c"}},
		{"dave@two.example", []string{"a", "b"}},
		{"eve@elsewhere.example", []string{"a", "b"}}, // default pool, never c or d
		{"no-domain", []string{"a", "b"}},
		{"x@", []string{"a", "b"}},
	} {
		b, err := s.Route(context.Background(), tc.user)
		if err != nil {
			t.Errorf("Route(%q): %v", tc.user, err)
			continue
		}
		if !strings.Contains(strings.Join(tc.in, ","), b.ID) {
			t.Errorf("Route(%q) = %s, want one of %v", tc.user, b.ID, tc.in)
		}
	}
	if _, err := s.Route(context.Background(), "  "); !errors.Is(err, ErrNoBackend) {
		t.Errorf("Route(blank) error = %v, want ErrNoBackend", err)
	}
	// IDs were filled in from the keys.
	for id, b := range cfg.Backends {
		if b.ID != id {
			t.Errorf("backend %q got ID %q", id, b.ID)
		}
	}
}

func TestStaticDefaultAll(t *testing.T) {
	s := mustStatic(t, StaticConfig{Backends: backends("a", "b", "c")})
	seen := map[string]bool{}
	for i := range 1000 {
		b, err := s.Route(context.Background(), fmt.Sprintf("user%d@example.org", i))
		if err != nil {
			t.Fatal(err)
		}
		seen[b.ID] = true
	}
	if len(seen) != 3 {
		t.Errorf("empty Default used %d backends, want all 3", len(seen))
	}
}

func TestNewStaticRejects(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  StaticConfig
		want string
	}{
		{"empty config", StaticConfig{}, "no backends"},
		{"nil backend", StaticConfig{Backends: map[string]*Backend{"a": nil}}, "nil"},
		{"ID mismatch", StaticConfig{Backends: map[string]*Backend{"a": {ID: "b", Addr: "x:1"}}}, "must match"},
		{"no address", StaticConfig{Backends: map[string]*Backend{"a": {}}}, "no address"},
		{"negative weight", StaticConfig{Backends: map[string]*Backend{"a": {Addr: "x:1", Weight: -1}}}, "negative weight"},
		{"pin to unknown", StaticConfig{Backends: backends("a"), Users: map[string]string{"u": "zz"}}, `unknown backend "zz"`},
		{"empty pin user", StaticConfig{Backends: backends("a"), Users: map[string]string{" ": "a"}}, "empty user"},
		{"double pin", StaticConfig{Backends: backends("a", "b"), Users: map[string]string{"U": "a", "u": "b"}}, "pinned twice"},
		{"domain unknown", StaticConfig{Backends: backends("a"), Domains: map[string][]string{"d": {"a", "zz"}}}, `unknown backend "zz"`},
		{"domain empty pool", StaticConfig{Backends: backends("a"), Domains: map[string][]string{"d": {}}}, "empty pool"},
		{"domain duplicate", StaticConfig{Backends: backends("a"), Domains: map[string][]string{"d": {"a", "a"}}}, "twice"},
		{"default unknown", StaticConfig{Backends: backends("a"), Default: []string{"zz"}}, `default pool: unknown backend "zz"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewStatic(tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("NewStatic error = %v, want it to mention %q", err, tc.want)
			}
		})
	}
}

// Two routers built independently (as on two imapgate instances, or
// before and after a restart) agree on every user. The pinned values also
// guard the hash function itself: changing it would move every user of
// every deployment.
func TestStaticStable(t *testing.T) {
	cfg := func() StaticConfig { return StaticConfig{Backends: backends("imap1", "imap2", "imap3")} }
	s1, s2 := mustStatic(t, cfg()), mustStatic(t, cfg())
	for i := range 10000 {
		u := fmt.Sprintf("user%d@example.org", i)
		b1, _ := s1.Route(context.Background(), u)
		b2, _ := s2.Route(context.Background(), u)
		if b1.ID != b2.ID {
			t.Fatalf("%s: %s vs %s", u, b1.ID, b2.ID)
		}
	}
	for _, u := range []string{"", "alice@example.org", "bob"} {
		f := fnv.New64a()
		f.Write([]byte(u))
		if got, want := hashString(u), fmix64(f.Sum64()); got != want {
			t.Errorf("hashString(%q) = %#x, want FNV-1a+fmix64 %#x", u, got, want)
		}
	}
	if got, want := hashString("alice@example.org"), uint64(0x2562c6bf020af5e0); got != want {
		t.Errorf("hashString changed: %#x, want %#x (this would move users)", got, want)
	}
}

func share(t *testing.T, s *Static, n int) map[string]int {
	t.Helper()
	counts := map[string]int{}
	for i := range n {
		b, err := s.Route(context.Background(), fmt.Sprintf("user%d@example.org", i))
		if err != nil {
			t.Fatal(err)
		}
		counts[b.ID]++
	}
	return counts
}

func TestStaticSpread(t *testing.T) {
	const n = 100000
	counts := share(t, mustStatic(t, StaticConfig{Backends: backends("a", "b", "c")}), n)
	for id, c := range counts {
		if f := float64(c) / n; math.Abs(f-1.0/3) > 0.03/3 { // ±3% of the fair share
			t.Errorf("backend %s got %.4f of users, want 1/3 ±3%%", id, f)
		}
	}
	t.Logf("equal weights: %v", counts)

	bs := backends("light", "heavy")
	bs["heavy"].Weight = 2
	counts = share(t, mustStatic(t, StaticConfig{Backends: bs}), n)
	if f := float64(counts["heavy"]) / n; math.Abs(f-2.0/3) > 0.01 {
		t.Errorf("weight 2 backend got %.4f of users, want ~2/3", f)
	}
	t.Logf("weights 1:2: %v", counts)
}

func TestStaticMinimalDisruption(t *testing.T) {
	const n = 100000
	s3 := mustStatic(t, StaticConfig{Backends: backends("a", "b", "c")})
	s4 := mustStatic(t, StaticConfig{Backends: backends("a", "b", "c", "d")})
	moved := 0
	for i := range n {
		u := fmt.Sprintf("user%d@example.org", i)
		b3, _ := s3.Route(context.Background(), u)
		b4, _ := s4.Route(context.Background(), u)
		if b3.ID == b4.ID {
			continue
		}
		if b4.ID != "d" {
			t.Fatalf("%s moved from %s to %s: only moves to the new backend are allowed", u, b3.ID, b4.ID)
		}
		moved++
	}
	if f := float64(moved) / n; math.Abs(f-0.25) > 0.01 {
		t.Errorf("adding a 4th backend moved %.4f of users, want ~1/4", f)
	}
}

func TestRendezvousTieBreak(t *testing.T) {
	// Order of the input never matters, and equal hashes (impossible to
	// produce on purpose, so simulated with duplicate keys) go to the
	// smallest ID.
	a, b := &Backend{ID: "a"}, &Backend{ID: "b"}
	r := NewPool([]*Backend{b, a})
	r.nodes[1].key = r.nodes[0].key
	if got := r.pick(42); got != a {
		t.Errorf("tie went to %s, want a", got.ID)
	}
	r.uniform = false
	if got := r.pick(42); got != a {
		t.Errorf("weighted tie went to %s, want a", got.ID)
	}
	if NewPool(nil).pick(1) != nil {
		t.Error("empty pool picked something")
	}
}

func TestStaticRouteAllocs(t *testing.T) {
	s := mustStatic(t, StaticConfig{Backends: backends("a", "b", "c"), Users: map[string]string{"p@x": "a"}})
	for _, u := range []string{"alice@example.org", "p@x"} {
		if n := testing.AllocsPerRun(100, func() { s.Route(context.Background(), u) }); n != 0 {
			t.Errorf("Route(%q) allocates %v times", u, n)
		}
	}
}

func BenchmarkStaticRoute(b *testing.B) {
	bs := backends("a", "b", "c", "d", "e", "f", "g", "h")
	bs["h"].Weight = 3
	s := mustStatic(b, StaticConfig{Backends: bs})
	users := make([]string, 1024)
	for i := range users {
		users[i] = fmt.Sprintf("user%d@example.org", i)
	}
	ctx := context.Background()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if _, err := s.Route(ctx, users[i&1023]); err != nil {
			b.Fatal(err)
		}
		i++
	}
}
