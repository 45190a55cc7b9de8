package consul_test

// The model test attacks the routing invariant — a user is never served
// by two backends at once, and every imapgate instance agrees where each
// user lives — with a random, seeded schedule of what operations and
// failures do to a cluster: logins and IDLE sessions of many users
// through several imapgate instances, moves and pins through the
// operator interface and through raw KV writes, drains, backends failing
// their health check past the grace and coming back, place_rate
// exhaustion, Consul agent restarts (and, in TestModelStatic, static
// router reloads). After every step and once quiet it checks:
//
//   - no user has live sessions on two backends for longer than
//     splitWindow;
//   - once quiet, every live session is on the backend every instance
//     routes its user to, which is the one recorded in Consul;
//   - no placement exists for a user nobody logged in as with the right
//     password (wrong passwords and unknown names cost Consul nothing);
//   - no goroutine (goleak, TestMain) or file descriptor outlives it.
//
// The backends are go-imap memory servers that name themselves: a
// session's backend is what the backend says, not what imapgate thinks.
//
//	go test -run TestModel ./routing/                                  # short schedule, random seed
//	IMAPGATE_MODEL_STEPS=3000 go test -run TestModel -timeout 30m ./routing/
//	IMAPGATE_MODEL_SEED=1234 go test -run TestModel ./routing/         # replay a failure

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imapgate/imapgate/routing/consul"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/imapgate/imapgate/internal/memimap"
	"github.com/imapgate/imapgate/internal/testenv"
	"github.com/imapgate/imapgate/proxy"
	"github.com/imapgate/imapgate/routing"
)

const (
	// splitWindow is how long a user may have sessions on two backends
	// (a move or a failure reaching every instance and its evictions).
	splitWindow = 3 * time.Second
	// quietTimeout bounds the wait for the system to settle.
	quietTimeout = 20 * time.Second
	modelPass    = "pw"
	modelService = "imap"
	modelGrace   = time.Second
)

var subjectRE = regexp.MustCompile(`Hello from backend (\S+)`)

// modelSteps and modelSeed read the environment: a short schedule by
// default, a long one behind IMAPGATE_MODEL_STEPS.
func modelSteps(def int) int {
	if n, err := strconv.Atoi(os.Getenv("IMAPGATE_MODEL_STEPS")); err == nil && n > 0 {
		return n
	}
	return def
}

func modelSeed() uint64 {
	if n, err := strconv.ParseUint(os.Getenv("IMAPGATE_MODEL_SEED"), 10, 64); err == nil {
		return n
	}
	return uint64(time.Now().UnixNano())
}

// placer is what the model drives on each instance's router.
type placer interface {
	routing.Router
	routing.Operator
}

// mbackend is one IMAP backend: a memory server registered in Consul
// with a TTL check the model sets.
type mbackend struct {
	id       string
	mem      *memimap.Server
	critical bool
}

// mgate is one imapgate instance.
type mgate struct {
	r      placer
	close  func() // the router's
	srv    *proxy.Server
	addr   string
	served chan struct{}
}

// msession is one client session, by the backend's own word.
type msession struct {
	user    string
	gate    int
	backend string
	c       net.Conn
	closed  atomic.Bool
	ours    atomic.Bool // the client closed it (else imapgate did)
	done    chan struct{}
}

type model struct {
	t     *testing.T
	rng   *rand.Rand
	seed  uint64
	steps int

	consul *testenv.Consul // nil in the static model
	api    *api.Client
	apiTr  func()

	backends []*mbackend
	gates    []*mgate
	users    []string

	mu         sync.Mutex
	sessions   map[*msession]struct{}
	authed     map[string]bool // a login with the right password was tried
	operator   map[string]bool // an operator wrote an entry
	splitSince map[string]time.Time
	consulDown bool
	history    []string
	counts     map[string]int
	maxSplit   time.Duration
}

func newModel(t *testing.T, defSteps int) *model {
	seed := modelSeed()
	m := &model{
		t: t, seed: seed, steps: modelSteps(defSteps),
		rng:        rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		sessions:   map[*msession]struct{}{},
		authed:     map[string]bool{},
		operator:   map[string]bool{},
		splitSince: map[string]time.Time{},
		counts:     map[string]int{},
	}
	t.Logf("model seed %d, %d steps (replay: IMAPGATE_MODEL_SEED=%d IMAPGATE_MODEL_STEPS=%d go test -run '%s' ./routing/)",
		seed, m.steps, seed, m.steps, t.Name())
	for i := range 24 {
		m.users = append(m.users, fmt.Sprintf("u%02d@example.org", i))
	}
	m.users = append(m.users, "t1@tenant.example", "t2@tenant.example")
	return m
}

func (m *model) note(format string, args ...any) {
	s := fmt.Sprintf(format, args...)
	m.mu.Lock()
	m.history = append(m.history, time.Now().Format("15:04:05.000")+" "+s)
	if len(m.history) > 80 {
		m.history = m.history[len(m.history)-80:]
	}
	m.mu.Unlock()
}

func (m *model) fail(format string, args ...any) {
	m.t.Helper()
	m.mu.Lock()
	hist := strings.Join(m.history, "\n  ")
	m.mu.Unlock()
	m.t.Fatalf("model (seed %d; replay with IMAPGATE_MODEL_SEED=%d IMAPGATE_MODEL_STEPS=%d): %s\nlast steps:\n  %s",
		m.seed, m.seed, m.steps, fmt.Sprintf(format, args...), hist)
}

// startBackends starts n named memory servers with every user.
func (m *model) startBackends(n int) {
	users := map[string]string{}
	for _, u := range m.users {
		users[u] = modelPass
	}
	for i := range n {
		id := fmt.Sprintf("mb%d", i+1)
		mem, err := memimap.Start(id, users)
		if err != nil {
			m.t.Fatal(err)
		}
		m.backends = append(m.backends, &mbackend{id: id, mem: mem})
	}
}

// register puts the backends in the Consul catalog with TTL checks,
// passing. The tenant domain's pool is mb1 and mb2.
func (m *model) register() {
	for i, b := range m.backends {
		tags := []string{}
		if i < 2 {
			tags = append(tags, "tenant")
		}
		host, port, _ := net.SplitHostPort(b.mem.Addr)
		p, _ := strconv.Atoi(port)
		err := m.api.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: b.id, Name: modelService, Address: host, Port: p, Tags: tags,
			Check: &api.AgentServiceCheck{CheckID: "check-" + b.id, TTL: "1h", Status: api.HealthPassing},
		})
		if err != nil {
			m.t.Fatal(err)
		}
	}
	if _, err := m.api.KV().Put(&api.KVPair{Key: "imapgate/domains/tenant.example", Value: []byte("tag:tenant")}, nil); err != nil {
		m.t.Fatal(err)
	}
}

func (m *model) setHealth(b *mbackend, critical bool) error {
	status := api.HealthPassing
	if critical {
		status = api.HealthCritical
	}
	if err := m.api.Agent().UpdateTTL("check-"+b.id, "model", status); err != nil {
		return err
	}
	b.critical = critical
	return nil
}

// startGate starts one imapgate instance around router r.
func (m *model) startGate(r placer, closeR func(), ev *proxy.LateEvictor) {
	srv, err := proxy.NewServer(proxy.Options{
		Router: r,
		Logger: zap.NewNop(),
		Limits: proxy.Limits{
			AuthFailureDelay: -1, MaxAuthFailures: 100, MaxConnectionsPerIP: -1,
			IPFailures: proxy.RateLimit{Burst: -1}, UserFailures: proxy.RateLimit{Burst: -1},
		},
	})
	if err != nil {
		m.t.Fatal(err)
	}
	ev.Set(srv)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		m.t.Fatal(err)
	}
	g := &mgate{r: r, close: closeR, srv: srv, addr: ln.Addr().String(), served: make(chan struct{})}
	go func() {
		defer close(g.served)
		srv.Serve(ln, proxy.Listener{Mode: proxy.StartTLS, InsecureAuth: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}})
	}()
	m.gates = append(m.gates, g)
}

// login logs user in through gate gi. With keep, the session stays in
// IDLE; else it logs out at once. It returns the backend that served it,
// or "" if the login was refused or the session was closed meanwhile.
func (m *model) login(gi int, user, pass string, keep bool) string {
	if pass == modelPass && slices.Contains(m.users, user) {
		m.mu.Lock()
		m.authed[routing.NormalizeUser(user)] = true
		m.mu.Unlock()
	}
	c, err := net.DialTimeout("tcp", m.gates[gi].addr, 5*time.Second)
	if err != nil {
		m.fail("dial gate %d: %v", gi, err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	lines := func(tag string) ([]string, error) {
		var out []string
		for {
			l, err := br.ReadString('\n')
			if err != nil {
				return out, err
			}
			l = strings.TrimRight(l, "\r\n")
			out = append(out, l)
			if strings.HasPrefix(l, tag+" ") {
				return out, nil
			}
		}
	}
	fail := func() string { c.Close(); return "" }
	if _, err := br.ReadString('\n'); err != nil {
		m.fail("gate %d greeting: %v", gi, err)
	}
	fmt.Fprintf(c, "a LOGIN %s %s\r\n", user, pass)
	ls, err := lines("a")
	if err != nil || !strings.HasPrefix(ls[len(ls)-1], "a OK") {
		m.count("login refused")
		return fail()
	}
	fmt.Fprintf(c, "s SELECT INBOX\r\nf FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n")
	if _, err := lines("s"); err != nil {
		m.count("closed while logging in")
		return fail()
	}
	ls, err = lines("f")
	if err != nil {
		m.count("closed while logging in")
		return fail()
	}
	backend := ""
	for _, l := range ls {
		if mm := subjectRE.FindStringSubmatch(l); mm != nil {
			backend = mm[1]
		}
	}
	if backend == "" {
		m.fail("no backend name in %q", ls)
	}
	m.count("login ok")
	if !keep {
		fmt.Fprintf(c, "z LOGOUT\r\n")
		lines("z")
		c.Close()
		return backend
	}
	fmt.Fprintf(c, "i IDLE\r\n")
	if l, err := br.ReadString('\n'); err != nil || !strings.HasPrefix(l, "+") {
		return fail()
	}
	c.SetDeadline(time.Time{})
	s := &msession{user: routing.NormalizeUser(user), gate: gi, backend: backend, c: c, done: make(chan struct{})}
	m.mu.Lock()
	m.sessions[s] = struct{}{}
	m.mu.Unlock()
	go func() {
		defer close(s.done)
		for {
			if _, err := br.ReadString('\n'); err != nil {
				c.Close()
				s.closed.Store(true)
				if !s.ours.Load() {
					m.count("sessions closed by imapgate")
				}
				return
			}
		}
	}()
	return backend
}

func (m *model) count(what string) {
	m.mu.Lock()
	m.counts[what]++
	m.mu.Unlock()
}

// live returns the sessions still open, forgetting the closed ones.
func (m *model) live() []*msession {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []*msession
	for s := range m.sessions {
		if s.closed.Load() {
			delete(m.sessions, s)
			continue
		}
		out = append(out, s)
	}
	return out
}

func (m *model) logoutOne() {
	ss := m.live()
	if len(ss) == 0 {
		return
	}
	s := ss[m.rng.IntN(len(ss))]
	m.note("logout %s from %s (gate %d)", s.user, s.backend, s.gate)
	s.ours.Store(true)
	s.c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(s.c, "DONE\r\nz LOGOUT\r\n")
	s.c.Close()
	<-s.done
}

// checkSplit fails if a user has been on two backends for longer than
// splitWindow.
func (m *model) checkSplit() {
	now := time.Now()
	on := map[string]map[string]bool{}
	for _, s := range m.live() {
		if on[s.user] == nil {
			on[s.user] = map[string]bool{}
		}
		on[s.user][s.backend] = true
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for u := range m.splitSince {
		if len(on[u]) < 2 {
			delete(m.splitSince, u)
		}
	}
	for u, bs := range on {
		if len(bs) < 2 {
			continue
		}
		since, ok := m.splitSince[u]
		if !ok {
			m.splitSince[u] = now
			m.counts["transient splits seen"]++
			continue
		}
		d := now.Sub(since)
		m.maxSplit = max(m.maxSplit, d)
		if d > splitWindow {
			m.mu.Unlock()
			m.fail("%s has been on %v for %v", u, slices.Sorted(func(y func(string) bool) {
				for b := range bs {
					if !y(b) {
						return
					}
				}
			}), d.Round(time.Millisecond))
		}
	}
}

// checkRecords fails if Consul holds a placement for a user nobody
// logged in as with the right password and no operator wrote.
func (m *model) checkRecords() {
	if m.consul == nil || m.consulDown {
		return
	}
	keys, _, err := m.api.KV().Keys("imapgate/users/", "", nil)
	if err != nil {
		m.fail("listing users: %v", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, k := range keys {
		u := strings.TrimPrefix(k, "imapgate/users/")
		if !m.authed[u] && !m.operator[u] {
			m.mu.Unlock()
			m.fail("consul has a placement for %s, who never logged in with the right password", u)
		}
	}
}

// quiet brings every backend back, waits until every instance agrees on
// every user with a live session and every session is where its user is
// placed (and recorded), and fails if that does not happen in
// quietTimeout.
func (m *model) quiet() {
	if m.consul != nil {
		for _, b := range m.backends {
			if b.critical {
				if err := m.setHealth(b, false); err != nil {
					m.fail("health: %v", err)
				}
			}
		}
	}
	start := time.Now()
	var why string
	for time.Since(start) < quietTimeout {
		m.checkSplit()
		if why = m.settled(); why == "" {
			m.note("quiet after %v", time.Since(start).Round(time.Millisecond))
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	m.fail("not settled %v after the last step: %s", quietTimeout, why)
}

// settled says what is not settled yet ("" when everything is).
func (m *model) settled() string {
	var kv map[string]string
	if m.consul != nil {
		pairs, _, err := m.api.KV().List("imapgate/users/", nil)
		if err != nil {
			return "consul: " + err.Error()
		}
		kv = map[string]string{}
		for _, p := range pairs {
			kv[strings.TrimPrefix(p.Key, "imapgate/users/")] = string(p.Value)
		}
	}
	ctx := context.Background()
	for _, s := range m.live() {
		var where []string
		for _, g := range m.gates {
			p, err := g.r.Where(ctx, s.user)
			if err != nil {
				return err.Error()
			}
			where = append(where, p.Backend)
		}
		for _, w := range where {
			if w != where[0] {
				var why []string
				for _, g := range m.gates {
					p, _ := g.r.Where(ctx, s.user)
					why = append(why, fmt.Sprintf("%+v %s", p, consul.CacheEntry(g.r.(*consul.Consul), s.user)))
				}
				pair, _, _ := m.api.KV().Get("imapgate/users/"+s.user, nil)
				idx := uint64(0)
				if pair != nil {
					idx = pair.ModifyIndex
				}
				return fmt.Sprintf("instances disagree on %s: %v (consul records %q at %d; %s)", s.user, where, kv[s.user], idx, strings.Join(why, "; "))
			}
		}
		if s.backend != where[0] {
			return fmt.Sprintf("%s has a session on %s (gate %d) but is routed to %s", s.user, s.backend, s.gate, where[0])
		}
		if kv != nil && kv[s.user] != s.backend {
			return fmt.Sprintf("%s has a session on %s but consul records %q", s.user, s.backend, kv[s.user])
		}
	}
	return ""
}

// closeAll ends every client session, instance and backend.
func (m *model) closeAll() {
	for _, s := range m.live() {
		s.ours.Store(true)
		s.c.Close()
		<-s.done
	}
	for _, g := range m.gates {
		g.srv.Close()
		<-g.served
		g.close()
	}
	m.gates = nil
	for _, b := range m.backends {
		b.mem.Close()
	}
	m.backends = nil
	if m.apiTr != nil {
		m.apiTr()
	}
}

// openFDs counts the open descriptors but pipes: the runtime keeps a pool
// of splice pipes that its finalizers close, which is not a leak.
func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd")
	}
	n := 0
	for _, e := range ents {
		if l, _ := os.Readlink("/proc/self/fd/" + e.Name()); !strings.HasPrefix(l, "pipe:") {
			n++
		}
	}
	return n
}

// fdList names the open descriptors, for the failure message.
func fdList() []string {
	ents, _ := os.ReadDir("/proc/self/fd")
	var out []string
	for _, e := range ents {
		l, _ := os.Readlink("/proc/self/fd/" + e.Name())
		out = append(out, e.Name()+"→"+l)
	}
	return out
}

// pick returns a random element.
func pick[T any](rng *rand.Rand, xs []T) T { return xs[rng.IntN(len(xs))] }

// weighted runs one of the actions, chosen by weight.
type action struct {
	w  int
	fn func()
}

func (m *model) run(actions []action) {
	total := 0
	for _, a := range actions {
		total += a.w
	}
	n := m.rng.IntN(total)
	for _, a := range actions {
		if n < a.w {
			a.fn()
			return
		}
		n -= a.w
	}
}

func TestModelConsul(t *testing.T) { runModelConsul(t, false) }

// TestModelConsulFeed runs the same schedule on a fleet where two
// instances follow the change feed (consul.WatchFeed) and one the full
// users watch, as during the switch to the feed; hand-made KV writes are
// announced (Announce), the documented operator story.
func TestModelConsulFeed(t *testing.T) { runModelConsul(t, true) }

func runModelConsul(t *testing.T, feed bool) {
	m := newModel(t, 150)
	m.consul = testenv.StartConsul(t)
	fds := openFDs(t)
	t.Logf("descriptors before: %v", fdList())
	cfg := api.DefaultConfig()
	cfg.Address = m.consul.HTTPAddr
	client, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	m.api, m.apiTr = client, cfg.Transport.CloseIdleConnections
	m.startBackends(3)
	m.register()
	t.Cleanup(m.closeAll)

	for i := range 3 {
		ev := &proxy.LateEvictor{}
		rate := -1.0
		if i == 0 {
			rate = 1 // place_rate exhaustion: most placements here wait to be recorded
		}
		watch := consul.WatchFull
		if feed && i < 2 {
			watch = consul.WatchFeed
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		r, err := consul.NewConsul(ctx, consul.ConsulConfig{
			Address: m.consul.HTTPAddr, Service: modelService, Evictor: ev,
			Grace: modelGrace, RetryMax: 300 * time.Millisecond, PlaceTimeout: 500 * time.Millisecond,
			PlaceRate: rate, Logger: zap.NewNop(), UsersWatch: watch,
		})
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		m.startGate(r, func() { r.Close() }, ev)
	}
	waitAll := func(cond func(placer) bool) {
		for end := time.Now().Add(10 * time.Second); ; {
			ok := true
			for _, g := range m.gates {
				ok = ok && cond(g.r)
			}
			if ok {
				return
			}
			if time.Now().After(end) {
				m.fail("instances did not see the backends")
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitAll(func(r placer) bool {
		n := 0
		for _, b := range r.Backends(context.Background()) {
			if b.Placeable {
				n++
			}
		}
		return n == len(m.backends)
	})

	restarts := 0
	maxRestarts := max(1, m.steps/150)
	ctx := context.Background()
	passing := func() []*mbackend {
		var out []*mbackend
		for _, b := range m.backends {
			if !b.critical {
				out = append(out, b)
			}
		}
		return out
	}
	// announce is `imapgate ctl announce USER` after a hand-made change,
	// through a random instance; needed only by the feed's instances.
	announce := func(u string) {
		if !feed {
			return
		}
		g := m.rng.IntN(len(m.gates))
		if err := m.gates[g].r.(*consul.Consul).Announce(ctx, u); err != nil {
			m.note("  announce via gate %d failed: %v", g, err)
		}
	}
	consulActions := []action{
		{5, func() { // operator move through a random instance
			u, b, g := pick(m.rng, m.users), pick(m.rng, m.backends), m.rng.IntN(len(m.gates))
			m.note("move %s to %s via gate %d", u, b.id, g)
			m.count("operator moves")
			mctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			m.mu.Lock()
			m.operator[u] = true
			m.mu.Unlock()
			if err := m.gates[g].r.Move(mctx, u, b.id); err != nil {
				m.note("  move refused: %v", err)
			}
		}},
		{5, func() { // consul kv put: a placement (or a pin)
			u, b := pick(m.rng, m.users), pick(m.rng, m.backends)
			flags := uint64(0)
			if m.rng.IntN(3) == 0 {
				flags = consul.FlagPinned
			}
			m.note("kv put %s %s flags=%d", u, b.id, flags)
			m.count("kv puts")
			m.mu.Lock()
			m.operator[u] = true
			m.mu.Unlock()
			if _, err := m.api.KV().Put(&api.KVPair{Key: "imapgate/users/" + u, Value: []byte(b.id), Flags: flags}, nil); err != nil {
				m.fail("kv put: %v", err)
			}
			announce(u)
		}},
		{3, func() { // consul kv delete
			u := pick(m.rng, m.users)
			m.note("kv delete %s", u)
			m.count("kv deletes")
			if _, err := m.api.KV().Delete("imapgate/users/"+u, nil); err != nil {
				m.fail("kv delete: %v", err)
			}
			announce(u)
		}},
		{2, func() { // unpin
			u := pick(m.rng, m.users)
			m.note("unpin %s", u)
			if err := m.gates[0].r.(*consul.Consul).Unpin(ctx, u); err != nil {
				m.fail("unpin: %v", err)
			}
		}},
		{4, func() { // drain or undrain through a random instance
			b, on, g := pick(m.rng, m.backends), m.rng.IntN(2) == 0, m.rng.IntN(len(m.gates))
			m.note("drain %s=%v via gate %d", b.id, on, g)
			m.count("drains/undrains")
			dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			if err := m.gates[g].r.SetDrain(dctx, b.id, on); err != nil {
				m.fail("drain: %v", err)
			}
		}},
		{3, func() { // a backend fails its check past the grace
			up := passing()
			if len(up) < 2 {
				return
			}
			b := pick(m.rng, up)
			m.note("backend %s critical", b.id)
			m.count("backends failed")
			if err := m.setHealth(b, true); err != nil {
				m.fail("health: %v", err)
			}
		}},
		{4, func() { // a failed backend comes back
			for _, b := range m.backends {
				if b.critical {
					m.note("backend %s passing again", b.id)
					if err := m.setHealth(b, false); err != nil {
						m.fail("health: %v", err)
					}
					return
				}
			}
		}},
		{2, func() { // a flap shorter than the grace
			up := passing()
			if len(up) < 2 {
				return
			}
			b := pick(m.rng, up)
			m.note("backend %s flaps", b.id)
			m.count("flaps")
			m.setHealth(b, true)
			time.Sleep(modelGrace / 4)
			m.setHealth(b, false)
		}},
		{2, func() { // a burst of logins on the rate-limited instance
			m.note("burst on gate 0")
			m.count("rate bursts")
			for range 6 {
				m.login(0, pick(m.rng, m.users), modelPass, m.rng.IntN(2) == 0)
			}
		}},
		{1, func() { // the Consul agent restarts
			if restarts >= maxRestarts {
				return
			}
			restarts++
			m.note("consul stop")
			m.count("consul restarts")
			m.consul.Stop(t)
			m.consulDown = true
			for range 4 + m.rng.IntN(6) {
				m.loginStep()
				m.checkSplit()
			}
			m.note("consul start")
			m.consul.Start(t)
			m.consulDown = false
			for _, b := range m.backends {
				if err := m.setHealth(b, b.critical); err != nil {
					m.fail("health after restart: %v", err)
				}
			}
		}},
	}
	failAction, restartAction := consulActions[5], consulActions[9]
	failed := false
	for i := range m.steps {
		switch {
		case i == m.steps/3 && !failed:
			failAction.fn() // every schedule has a backend gone past the grace...
		case i == m.steps/2 && restarts == 0:
			restartAction.fn() // ...and a Consul restart
		case m.rng.IntN(100) < 55:
			m.loginStep()
		case m.rng.IntN(100) < 25:
			m.logoutOne()
		default:
			m.run(consulActions)
		}
		for _, b := range m.backends {
			failed = failed || b.critical
		}
		m.checkSplit()
		if i%10 == 0 {
			m.checkRecords()
		}
		if i%50 == 49 {
			m.quiet()
		}
		time.Sleep(time.Duration(m.rng.IntN(40)) * time.Millisecond)
	}
	m.quiet()
	m.checkRecords()
	t.Logf("model: %d steps clean; %v; longest transient split %v", m.steps, m.counts, m.maxSplit.Round(time.Millisecond))

	m.closeAll()
	waitFDs(t, fds)
}

// hotUser picks a user, half the time among the first six: users with
// several sessions at once are where splits show.
func (m *model) hotUser() string {
	if m.rng.IntN(2) == 0 {
		return m.users[m.rng.IntN(6)]
	}
	return pick(m.rng, m.users)
}

// loginStep is a login of a random kind through a random instance.
func (m *model) loginStep() {
	g := m.rng.IntN(len(m.gates))
	switch n := m.rng.IntN(100); {
	case n < 6:
		u := fmt.Sprintf("ghost%d@example.org", m.rng.IntN(1000))
		m.note("login unknown %s via gate %d", u, g)
		if b := m.login(g, u, modelPass, false); b != "" {
			m.fail("unknown user %s logged in on %s", u, b)
		}
	case n < 12:
		u := pick(m.rng, m.users)
		m.note("login %s with a wrong password via gate %d", u, g)
		if b := m.login(g, u, "wrong", false); b != "" {
			m.fail("wrong password for %s logged in on %s", u, b)
		}
	case n < 20:
		// The same user at once through every instance: placement races
		// between real proxies.
		u := m.hotUser()
		if m.rng.IntN(3) == 0 {
			u = fmt.Sprintf("u%02d@example.org", 12+m.rng.IntN(12)) // often not placed yet
		}
		got := make([]string, len(m.gates))
		var wg sync.WaitGroup
		for i := range m.gates {
			wg.Go(func() { got[i] = m.login(i, u, modelPass, true) })
		}
		wg.Wait()
		m.note("login %s via every gate at once: %q", u, got)
		m.count("simultaneous logins")
	default:
		u := m.hotUser()
		if len(m.live()) > 40 {
			m.logoutOne()
		}
		keep := n < 80
		b := m.login(g, u, modelPass, keep)
		m.note("login %s via gate %d: %q (idle %v)", u, g, b, keep)
	}
}

// waitFDs waits until the process has no more descriptors open than it
// had at the start (closed connections may take a moment to be
// released by their goroutines).
func waitFDs(t *testing.T, want int) {
	t.Helper()
	var n int
	for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if n = openFDs(t); n <= want {
			return
		}
	}
	t.Errorf("%d file descriptors open after the model, %d before: %v", n, want, fdList())
}

// TestModelStatic runs the schedule against instances with the static
// router (routing.Table), each given the same drains, moves and reloads
// one after the other, as an operator applies them to every instance.
func TestModelStatic(t *testing.T) {
	m := newModel(t, 120)
	fds := openFDs(t)
	m.startBackends(3)
	t.Cleanup(m.closeAll)
	table := func(pins map[string]string, tenant []string) routing.StaticConfig {
		bs := map[string]*routing.Backend{}
		for _, b := range m.backends {
			bs[b.id] = &routing.Backend{ID: b.id, Addr: b.mem.Addr}
		}
		return routing.StaticConfig{Backends: bs, Users: pins, Domains: map[string][]string{"tenant.example": tenant}}
	}
	ids := []string{"mb1", "mb2", "mb3"}
	for range 3 {
		ev := &proxy.LateEvictor{}
		tb, err := routing.NewTable(table(nil, []string{"mb1", "mb2"}), ev, zap.NewNop())
		if err != nil {
			t.Fatal(err)
		}
		m.startGate(tb, func() {}, ev)
	}
	ctx := context.Background()
	each := func(what string, fn func(*routing.Table) error) {
		m.note("%s on every instance", what)
		m.count("static changes")
		for _, g := range m.gates {
			if err := fn(g.r.(*routing.Table)); err != nil {
				m.note("  refused: %v", err)
			}
			m.checkSplit()
			time.Sleep(time.Duration(m.rng.IntN(30)) * time.Millisecond)
		}
	}
	actions := []action{
		{4, func() {
			id, on := pick(m.rng, ids), m.rng.IntN(2) == 0
			each(fmt.Sprintf("drain %s=%v", id, on), func(tb *routing.Table) error { return tb.SetDrain(ctx, id, on) })
		}},
		{3, func() {
			u, id := pick(m.rng, m.users), pick(m.rng, ids)
			each(fmt.Sprintf("move %s to %s", u, id), func(tb *routing.Table) error { return tb.Move(ctx, u, id) })
		}},
		{3, func() {
			pins := map[string]string{}
			for range m.rng.IntN(6) {
				pins[pick(m.rng, m.users)] = pick(m.rng, ids)
			}
			tenant := []string{pick(m.rng, ids)}
			if m.rng.IntN(2) == 0 {
				tenant = append(tenant, pick(m.rng, ids))
			}
			tenant = slices.Compact(slices.Sorted(slices.Values(tenant)))
			cfg := table(pins, tenant)
			each(fmt.Sprintf("reload with pins %v and tenant pool %v", pins, tenant), func(tb *routing.Table) error {
				_, err := tb.SetConfig(ctx, cfg)
				return err
			})
		}},
	}
	for i := range m.steps {
		if m.rng.IntN(100) < 60 {
			m.loginStep()
		} else if m.rng.IntN(100) < 30 {
			m.logoutOne()
		} else {
			m.run(actions)
		}
		m.checkSplit()
		if i%30 == 29 {
			m.quiet()
		}
		time.Sleep(time.Duration(m.rng.IntN(30)) * time.Millisecond)
	}
	m.quiet()
	t.Logf("model: %d steps clean; %v; longest transient split %v", m.steps, m.counts, m.maxSplit.Round(time.Millisecond))
	m.closeAll()
	waitFDs(t, fds)
}
