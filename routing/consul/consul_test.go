package consul

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap/zaptest"

	"github.com/imapgate/imapgate/internal/testenv"
	"github.com/imapgate/imapgate/routing"
)

// These tests run a real Consul server (testenv.StartConsul) and register
// backends with real TCP health checks pointed at listeners the test
// opens: closing a listener makes its check critical.

const testService = "imap"

type fixture struct {
	t      *testing.T
	consul *testenv.Consul
	api    *api.Client
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	c := testenv.StartConsul(t)
	f := &fixture{t: t, consul: c, api: newAPIClient(t, c.HTTPAddr)}
	return f
}

// newAPIClient returns a client whose connections are closed at cleanup,
// so goleak sees no transport goroutines.
func newAPIClient(t testing.TB, addr string) *api.Client {
	cfg := api.DefaultConfig()
	cfg.Address = addr
	client, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	tr := cfg.Transport
	t.Cleanup(tr.CloseIdleConnections)
	return client
}

type testBackend struct {
	ID   string
	port int
	mu   sync.Mutex
	ln   net.Listener
}

// backend opens a listener and registers it as an instance of the imap
// service with a 1s TCP check (Consul's minimum interval).
func (f *fixture) backend(id string, meta map[string]string, tags ...string) *testBackend {
	f.t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.t.Fatal(err)
	}
	b := &testBackend{ID: id, ln: ln, port: ln.Addr().(*net.TCPAddr).Port}
	go acceptAndClose(ln)
	f.t.Cleanup(func() { b.down(f.t) })
	err = f.api.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: id, Name: testService, Address: "127.0.0.1", Port: b.port, Meta: meta, Tags: tags,
		Check: &api.AgentServiceCheck{
			TCP: ln.Addr().String(), Interval: "1s", Timeout: "500ms", Status: api.HealthPassing,
		},
	})
	if err != nil {
		f.t.Fatalf("register %s: %v", id, err)
	}
	return b
}

func acceptAndClose(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		c.Close()
	}
}

// down closes the listener: the TCP check goes critical.
func (b *testBackend) down(t testing.TB) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ln != nil {
		b.ln.Close()
		b.ln = nil
	}
}

// up listens again on the same port.
func (b *testBackend) up(t testing.TB) {
	b.mu.Lock()
	defer b.mu.Unlock()
	ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(b.port))
	if err != nil {
		t.Fatal(err)
	}
	b.ln = ln
	go acceptAndClose(ln)
}

func (f *fixture) kvPut(key, value string, flags uint64) {
	f.t.Helper()
	if _, err := f.api.KV().Put(&api.KVPair{Key: key, Value: []byte(value), Flags: flags}, nil); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fixture) kvGet(key string) string {
	f.t.Helper()
	p, _, err := f.api.KV().Get(key, nil)
	if err != nil {
		f.t.Fatal(err)
	}
	if p == nil {
		return ""
	}
	return string(p.Value)
}

type userEviction struct{ user, keep string }

// recEvictor records evictions on channels, the signal tests wait on.
type recEvictor struct {
	users    chan userEviction
	backends chan string
}

func newRecEvictor() *recEvictor {
	return &recEvictor{users: make(chan userEviction, 100000), backends: make(chan string, 100)}
}

func (e *recEvictor) EvictUser(user, keep string) int {
	select {
	case e.users <- userEviction{user, keep}:
	default:
	}
	return 1
}

func (e *recEvictor) EvictBackend(id string) int {
	select {
	case e.backends <- id:
	default:
	}
	return 1
}

// waitUser waits for EvictUser(user, keep), skipping other users' events.
func (e *recEvictor) waitUser(t testing.TB, user, keep string, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case ev := <-e.users:
			if ev.user == user && ev.keep == keep {
				return
			}
		case <-deadline:
			t.Fatalf("no EvictUser(%q, %q) within %v", user, keep, timeout)
		}
	}
}

func (f *fixture) router(mods ...func(*ConsulConfig)) (*Consul, *recEvictor) {
	f.t.Helper()
	ev := newRecEvictor()
	cfg := ConsulConfig{
		Address:  f.consul.HTTPAddr,
		Service:  testService,
		Evictor:  ev,
		Grace:    time.Second,
		RetryMax: 200 * time.Millisecond,
		Logger:   zaptest.NewLogger(f.t),
	}
	for _, m := range mods {
		m(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := NewConsul(ctx, cfg)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { r.Close() })
	return r, ev
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(timeout); !cond(); {
		if time.Now().After(end) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func placeable(r *Consul, ids ...string) func() bool {
	return func() bool {
		got := map[string]bool{}
		for _, b := range r.States() {
			if b.Placeable {
				got[b.ID] = true
			}
		}
		for _, id := range ids {
			if !got[id] {
				return false
			}
		}
		return len(got) == len(ids)
	}
}

// route is a successful login: Route, then Commit if the router records
// placements. It returns the backend the user is served by.
func route(t testing.TB, r routing.Router, user string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	b, err := r.Route(ctx, user)
	if err != nil {
		t.Fatalf("Route(%q): %v", user, err)
	}
	if cm, ok := r.(routing.Committer); ok {
		if b, err = cm.Commit(ctx, user, b); err != nil {
			t.Fatalf("Commit(%q): %v", user, err)
		}
	}
	return b.ID
}

func TestConsulPinnedUser(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", map[string]string{MetaSecurity: "starttls", MetaWeight: "5", MetaProxyProtocol: "2"})
	f.kvPut("imapgate/users/alice@example.org", "imap2", FlagPinned)
	f.kvPut("imapgate/users/bob@example.org", "imap1", 0) // an operator's plain put: a placement
	r, _ := f.router()

	if got := route(t, r, "Alice@Example.org"); got != "imap2" {
		t.Errorf("pinned alice routed to %s", got)
	}
	if got := route(t, r, "bob@example.org"); got != "imap1" {
		t.Errorf("placed bob routed to %s", got)
	}
	b, _ := r.Route(context.Background(), "alice@example.org")
	if b.Security != routing.SecurityStartTLS || b.Weight != 5 || b.ProxyProtocol != 2 || b.Addr == "" {
		t.Errorf("meta not applied: %+v", b)
	}
	if !r.Ready() || r.ViewAge() != 0 {
		t.Errorf("Ready=%v ViewAge=%v, want true, 0", r.Ready(), r.ViewAge())
	}

	// Pin through the API, and refuse unknown backends.
	if err := r.Pin(context.Background(), "bob@example.org", "imap2"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "bob's pin to reach the view", func() bool { return route(t, r, "bob@example.org") == "imap2" })
	if err := r.Pin(context.Background(), "bob@example.org", "nope"); err == nil {
		t.Error("Pin to an unknown backend succeeded")
	}
	if err := r.Unpin(context.Background(), "bob@example.org"); err != nil {
		t.Fatal(err)
	}
	p, _, _ := f.api.KV().Get("imapgate/users/bob@example.org", nil)
	if p == nil || string(p.Value) != "imap2" || p.Flags&FlagPinned != 0 {
		t.Errorf("after Unpin: %+v, want imap2 without the pin flag", p)
	}
}

func TestConsulSpreadByWeightAndStick(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", map[string]string{MetaWeight: "3"})
	r, _ := f.router(func(c *ConsulConfig) { c.PlaceRate = -1 })

	const n = 2000
	placed := map[string]string{}
	counts := map[string]int{}
	for i := range n {
		u := fmt.Sprintf("user%d@example.org", i)
		placed[u] = route(t, r, u)
		counts[placed[u]]++
	}
	if f := float64(counts["imap2"]) / n; math.Abs(f-0.75) > 0.04 {
		t.Errorf("weight 3 backend got %.3f of users, want ~0.75 (%v)", f, counts)
	}
	for u, id := range placed {
		if got := f.kvGet("imapgate/users/" + u); got != id {
			t.Fatalf("KV has %s → %q, Route said %s", u, got, id)
		}
	}

	f.backend("imap3", map[string]string{MetaWeight: "4"})
	waitFor(t, 5*time.Second, "imap3 to be placeable", placeable(r, "imap1", "imap2", "imap3"))
	for u, id := range placed {
		if got := route(t, r, u); got != id {
			t.Fatalf("%s moved from %s to %s after a backend joined", u, id, got)
		}
	}
	// A second instance started now agrees on every existing user.
	r2, _ := f.router()
	for u, id := range placed {
		if got := route(t, r2, u); got != id {
			t.Fatalf("second instance routes %s to %s, first to %s", u, got, id)
		}
	}
	newOn3 := 0
	for i := range 200 {
		if route(t, r, fmt.Sprintf("new%d@example.org", i)) == "imap3" {
			newOn3++
		}
	}
	if newOn3 < 50 {
		t.Errorf("only %d of 200 new users went to the new backend (weight 4 of 8)", newOn3)
	}
}

// Two instances commit the same new users to different backends at the
// same moment (as instances with different views would): each user ends
// up on one backend, the one in KV, whichever instance asks.
func TestConsulRacingInstances(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", nil)
	f.backend("imap3", map[string]string{MetaWeight: "2"})
	r1, _ := f.router(func(c *ConsulConfig) { c.PlaceRate = -1 })
	r2, _ := f.router(func(c *ConsulConfig) { c.PlaceRate = -1 })
	waitFor(t, 5*time.Second, "all backends placeable", func() bool {
		return placeable(r1, "imap1", "imap2", "imap3")() && placeable(r2, "imap1", "imap2", "imap3")()
	})

	const n = 200
	got := [2][n]string{}
	var wg sync.WaitGroup
	for i, r := range []*Consul{r1, r2} {
		propose := r.view.Load().routable[[]string{"imap1", "imap2"}[i]]
		for w := range 8 { // 8 workers per instance, interleaved users
			wg.Go(func() {
				for u := w; u < n; u += 8 {
					b, err := r.Commit(context.Background(), fmt.Sprintf("race%d@example.org", u), propose)
					if err != nil {
						t.Error(err)
						return
					}
					got[i][u] = b.ID
				}
			})
		}
	}
	wg.Wait()
	raced := counterValue(t, r1.metrics.placements.WithLabelValues("raced")) +
		counterValue(t, r2.metrics.placements.WithLabelValues("raced"))
	t.Logf("%v of %d placements lost a CAS race and used the winner's entry", raced, n)
	if raced == 0 {
		t.Error("no placement raced: the test did not test the race")
	}
	for u := range n {
		user := fmt.Sprintf("race%d@example.org", u)
		kv := f.kvGet("imapgate/users/" + user)
		if got[0][u] != got[1][u] || got[0][u] != kv {
			t.Errorf("%s: instance 1 says %s, instance 2 says %s, KV says %s", user, got[0][u], got[1][u], kv)
		}
	}
}

// The CAS-lost path deterministically: another instance's entry already
// exists but this one has not seen it yet.
func TestConsulPlaceLosesRace(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", nil)
	r, _ := f.router()
	const user = "late@example.org"
	mine := r.view.Load().def.Pick(user).ID
	other := map[string]string{"imap1": "imap2", "imap2": "imap1"}[mine]
	f.kvPut("imapgate/users/"+user, other, 0)
	b, err := r.record(context.Background(), user, r.view.Load().routable[mine], 0)
	if err != nil || b.ID != other {
		t.Fatalf("record = %v, %v; want the winner %s", b, err, other)
	}
	if got := route(t, r, user); got != other {
		t.Errorf("then Route = %s, want %s", got, other)
	}
}

func TestConsulPinChangeEvicts(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", nil)
	r1, ev1 := f.router()
	r2, ev2 := f.router()
	const user = "mover@example.org"
	home := route(t, r1, user)
	if got := route(t, r2, user); got != home {
		t.Fatalf("instances disagree: %s vs %s", home, got)
	}
	dest := map[string]string{"imap1": "imap2", "imap2": "imap1"}[home]

	start := time.Now()
	if err := r1.Pin(context.Background(), user, dest); err != nil {
		t.Fatal(err)
	}
	ev1.waitUser(t, user, dest, 2*time.Second)
	ev2.waitUser(t, user, dest, 2*time.Second)
	t.Logf("both instances evicted %s %v after the pin", user, time.Since(start))
	for _, r := range []*Consul{r1, r2} {
		if got := route(t, r, user); got != dest {
			t.Errorf("after the move Route = %s, want %s", got, dest)
		}
	}

	// An operator's `consul kv put` moves the user back the same way.
	f.kvPut("imapgate/users/"+user, home, 0)
	ev2.waitUser(t, user, home, 2*time.Second)
	if got := route(t, r2, user); got != home {
		t.Errorf("after kv put Route = %s, want %s", got, home)
	}
}

func TestConsulBackendGoneAfterGrace(t *testing.T) {
	f := newFixture(t)
	b1 := f.backend("imap1", nil)
	f.backend("imap2", nil)
	r, ev := f.router(func(c *ConsulConfig) { c.Grace = 1500 * time.Millisecond })

	var on1 []string
	for i := 0; len(on1) < 20; i++ {
		u := fmt.Sprintf("u%d@example.org", i)
		if route(t, r, u) == "imap1" {
			on1 = append(on1, u)
		}
	}
	pinned := "pinned@example.org"
	f.kvPut("imapgate/users/"+pinned, "imap1", FlagPinned)
	waitFor(t, 5*time.Second, "pin in view", func() bool { return route(t, r, pinned) == "imap1" })

	b1.down(t)
	start := time.Now()
	select {
	case id := <-ev.backends:
		if id != "imap1" {
			t.Fatalf("EvictBackend(%s), want imap1", id)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no EvictBackend after the check went critical")
	}
	if d := time.Since(start); d < 1500*time.Millisecond {
		t.Errorf("evicted %v after the listener closed, before the grace", d)
	}
	for _, u := range on1 {
		if got := route(t, r, u); got != "imap2" {
			t.Errorf("%s routed to %s after imap1 was gone", u, got)
		}
		if got := f.kvGet("imapgate/users/" + u); got != "imap2" {
			t.Errorf("%s re-placed, but KV says %q", u, got)
		}
	}
	if _, err := r.Route(context.Background(), pinned); !errors.Is(err, routing.ErrNoBackend) {
		t.Errorf("user pinned to a gone backend: err = %v, want ErrNoBackend", err)
	}
}

func TestConsulFlapWithinGrace(t *testing.T) {
	f := newFixture(t)
	b1 := f.backend("imap1", nil)
	f.backend("imap2", nil)
	r, ev := f.router(func(c *ConsulConfig) { c.Grace = 20 * time.Second })
	var u string
	for i := 0; u == ""; i++ {
		if c := fmt.Sprintf("f%d@example.org", i); route(t, r, c) == "imap1" {
			u = c
		}
	}
	b1.down(t)
	waitFor(t, 10*time.Second, "imap1 critical", func() bool { return !placeable(r, "imap1", "imap2")() })
	if got := route(t, r, u); got != "imap1" {
		t.Errorf("within the grace, %s routed to %s, want its home imap1", u, got)
	}
	if got := route(t, r, "fresh@example.org"); got != "imap2" {
		t.Errorf("new user placed on %s while imap1 is critical", got)
	}
	b1.up(t)
	waitFor(t, 10*time.Second, "imap1 passing again", placeable(r, "imap1", "imap2"))
	select {
	case id := <-ev.backends:
		t.Errorf("EvictBackend(%s) for a flap shorter than the grace", id)
	default:
	}
}

func TestConsulDrainAndDomains(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil, "tenant-a")
	f.backend("imap2", nil, "tenant-a")
	f.backend("imap3", map[string]string{MetaDrain: "true"})
	f.kvPut("imapgate/domains/a.example", "tag:tenant-a", 0)
	f.kvPut("imapgate/domains/b.example", "imap3, imap2", 0)
	f.kvPut("imapgate/users/old@example.org", "imap3", 0)
	r, _ := f.router(func(c *ConsulConfig) { c.PlaceRate = -1 })

	counts := map[string]int{}
	for i := range 300 {
		counts[route(t, r, fmt.Sprintf("d%d@example.org", i))]++
	}
	if counts["imap3"] != 0 || counts["imap1"] == 0 || counts["imap2"] == 0 {
		t.Errorf("default pool with imap3 draining: %v", counts)
	}
	if got := route(t, r, "old@example.org"); got != "imap3" {
		t.Errorf("existing user of a draining backend moved to %s", got)
	}
	for i := range 50 {
		if got := route(t, r, fmt.Sprintf("x%d@b.example", i)); got != "imap2" {
			t.Fatalf("b.example user on %s; its pool is imap3 (draining) and imap2", got)
		}
		if got := route(t, r, fmt.Sprintf("x%d@a.example", i)); got == "imap3" {
			t.Fatalf("a.example user on %s, outside tag tenant-a", got)
		}
	}

	// Drain through KV too; then an empty pool is ErrNoBackend, not a
	// spill into the default pool.
	f.kvPut("imapgate/drain/imap2", "true", 0)
	waitFor(t, 5*time.Second, "imap2 drained", placeable(r, "imap1"))
	if _, err := r.Route(context.Background(), "new@b.example"); !errors.Is(err, routing.ErrNoBackend) {
		t.Errorf("domain pool fully drained: err = %v, want ErrNoBackend", err)
	}
	for _, b := range r.States() {
		if b.ID == "imap2" && (!b.Drain || b.Placeable || b.Health != api.HealthPassing) {
			t.Errorf("Backends() imap2 = %+v", b)
		}
	}
}

func TestConsulRestart(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", nil)
	r, _ := f.router(func(c *ConsulConfig) { c.PlaceTimeout = 300 * time.Millisecond })
	known := map[string]string{}
	for i := range 50 {
		u := fmt.Sprintf("k%d@example.org", i)
		known[u] = route(t, r, u)
	}

	f.consul.Stop(t)
	waitFor(t, 10*time.Second, "the router to notice the outage", func() bool { return r.ViewAge() > 0 })
	for u, id := range known {
		start := time.Now()
		if got := route(t, r, u); got != id {
			t.Errorf("during the outage %s routed to %s, want %s", u, got, id)
		}
		if d := time.Since(start); d > time.Millisecond {
			t.Errorf("Route(%s) took %v during the outage; it must not touch Consul", u, d)
		}
	}
	if !r.Ready() {
		t.Error("not Ready during the outage")
	}
	// A new user is still routed (by hash, unrecorded), within PlaceTimeout.
	start := time.Now()
	if _, err := r.Route(context.Background(), "newcomer@example.org"); err != nil {
		t.Errorf("new user during the outage: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("new user's Route took %v during the outage", d)
	}

	f.consul.Start(t)
	waitFor(t, 15*time.Second, "the router to reconnect", func() bool { return r.ViewAge() == 0 })
	for u, id := range known {
		if got := route(t, r, u); got != id {
			t.Errorf("after the restart %s routed to %s, want %s", u, got, id)
		}
	}
	// The newcomer is recorded at its next login.
	id := route(t, r, "newcomer@example.org")
	if got := f.kvGet("imapgate/users/newcomer@example.org"); got != id {
		t.Errorf("newcomer recorded as %q after the restart, routed to %s", got, id)
	}
}

func TestConsulUnreachableAtStart(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	_, err = NewConsul(ctx, ConsulConfig{Address: addr, Service: testService})
	if err == nil {
		t.Fatal("NewConsul succeeded with no agent")
	}
	t.Logf("error: %v", err)
	if _, err := NewConsul(ctx, ConsulConfig{Address: addr}); err == nil {
		t.Error("NewConsul without a service name succeeded")
	}
}

func TestRegister(t *testing.T) {
	f := newFixture(t)
	health := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go health.Serve(ln)
	defer health.Close()

	ctx := context.Background()
	dereg, err := Register(ctx, f.api, RegisterConfig{
		Name: "imapgate", ID: "gw1", Address: "127.0.0.1",
		Ports:     map[string]int{"imap": 1143, "imaps": 1993},
		CheckHTTP: "http://" + ln.Addr().String() + "/healthz",
		Interval:  time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "both instances passing", func() bool {
		entries, _, err := f.api.Health().Service("imapgate", "", true, nil)
		return err == nil && len(entries) == 2
	})
	entries, _, _ := f.api.Health().Service("imapgate", "imaps", true, nil)
	if len(entries) != 1 || entries[0].Service.Port != 1993 || entries[0].Service.ID != "gw1-imaps" {
		t.Errorf("imaps instance: %+v", entries)
	}
	if err := dereg(ctx); err != nil {
		t.Fatal(err)
	}
	svcs, err := f.api.Agent().Services()
	if err != nil {
		t.Fatal(err)
	}
	for id := range svcs {
		if slices.Contains([]string{"gw1-imap", "gw1-imaps"}, id) {
			t.Errorf("%s still registered after deregister", id)
		}
	}
	if _, err := Register(ctx, f.api, RegisterConfig{Name: "x", ID: "y", Ports: map[string]int{"imap": 143}}); err == nil {
		t.Error("Register without a check URL succeeded")
	}
}

func TestConsulMoveHold(t *testing.T) {
	f := newFixture(t)
	f.backend("imap1", nil)
	f.backend("imap2", nil)
	const hold = 800 * time.Millisecond
	r, ev := f.router(func(c *ConsulConfig) { c.MoveHold = hold })
	const user = "held@example.org"
	home := route(t, r, user)
	dest := map[string]string{"imap1": "imap2", "imap2": "imap1"}[home]
	if err := r.Pin(context.Background(), user, dest); err != nil {
		t.Fatal(err)
	}
	ev.waitUser(t, user, dest, 2*time.Second)
	evicted := time.Now()

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := r.Route(ctx, user); !errors.Is(err, routing.ErrNoBackend) {
		t.Errorf("Route during the hold with a short context: %v, want ErrNoBackend", err)
	}
	if got := route(t, r, user); got != dest {
		t.Errorf("after the hold Route = %s, want %s", got, dest)
	}
	if d := time.Since(evicted); d < hold-100*time.Millisecond {
		t.Errorf("login answered %v after the move, before the %v hold", d, hold)
	}
	// Others are not held.
	start := time.Now()
	route(t, r, "bystander@example.org")
	if d := time.Since(start); d > hold/2 {
		t.Errorf("an unrelated user waited %v", d)
	}
}

func counterValue(t testing.TB, c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
