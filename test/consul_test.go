package test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imapgate/imapgate/proxy"

	"github.com/imapgate/imapgate/routing/consul"

	"github.com/hashicorp/consul/api"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/imapgate/imapgate/internal/testenv"
	"github.com/imapgate/imapgate/routing"
)

// These tests run imapgate with the Consul router in front of real
// Dovecots registered in a real Consul with real TCP health checks, and
// judge every placement by asking the Dovecot itself where the session
// landed: each one answers a post-login ID with its own service ID
// (imap_id_send), so a session's backend is what the backend says, not
// what imapgate or the router believes.

const (
	consulService = "imap"
	// markerField is the ID field each test Dovecot answers with its
	// Consul service ID.
	markerField = "x-imapgate-backend"
)

// consulUsers are the accounts every test Dovecot has: one family per
// subtest, so that subtests sharing Consul's KV never meet.
func consulUsers() map[string]string {
	users := map[string]string{}
	for family, n := range map[string]int{
		"pinned": 3, "spread": 60, "new": 30, "race": 200, "mover": 1,
		"outage": 20, "outage-new": 1, "fail": 40, "fail-pinned": 1, "bench": 16,
	} {
		for i := range n {
			u := fmt.Sprintf("%s%03d@example.org", family, i)
			users[u] = consulPassword(u)
		}
	}
	return users
}

func consulPassword(user string) string { return "pw " + user }

// backendSpec is how one test Dovecot is registered: which of its ports
// imapgate uses, and the service Meta that tells imapgate so.
type backendSpec struct {
	id     string
	weight string
	sec    routing.Security
}

// The three backends cover every imapgate-security value.
var consulSpecs = []backendSpec{
	{"dovecot1", "1", routing.SecurityNone},
	{"dovecot2", "3", routing.SecurityTLS},
	{"dovecot3", "2", routing.SecurityStartTLS},
}

// consulEnv is one Consul server and a Dovecot per backendSpec, shared
// by the subtests of TestConsulRouting. A Dovecot is an instance of the
// imap service once join registers it (TestConsulRouting joins dovecot1
// and dovecot2 at the start; dovecot3 joins in SpreadByWeightAndStick).
type consulEnv struct {
	consul     *testenv.Consul
	api        *api.Client
	specs      []backendSpec
	dovecots   map[string]*testenv.Dovecot
	backendTLS *tls.Config // trusts every Dovecot's CA

	mu     sync.Mutex
	joined map[string]bool
}

func startConsulEnv(t testing.TB, specs []backendSpec) *consulEnv {
	t.Helper()
	testenv.Need(t, "dovecot", "consul")
	e := &consulEnv{
		consul:   testenv.StartConsul(t),
		specs:    specs,
		dovecots: map[string]*testenv.Dovecot{},
		joined:   map[string]bool{},
	}
	cfg := api.DefaultConfig()
	cfg.Address = e.consul.HTTPAddr
	client, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cfg.Transport.CloseIdleConnections) // for goleak
	e.api = client

	users := consulUsers()
	pool := x509.NewCertPool()
	for _, s := range specs {
		d := testenv.StartDovecot(t, testenv.DovecotOptions{
			Users:           users,
			TrustedNetworks: "127.0.0.0/8",
			Extra:           fmt.Sprintf("imap_id_send = name * %q %q", markerField, s.id),
		})
		e.dovecots[s.id] = d
		pool.AppendCertsFromPEM(d.CA.CertPEM)
	}
	e.backendTLS = &tls.Config{RootCAs: pool}
	return e
}

// join registers a Dovecot as an instance of the imap service with a TCP
// check on the port imapgate uses, every second, and waits until Consul
// has it passing.
func (e *consulEnv) join(t testing.TB, id string) {
	t.Helper()
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.joined[id] {
		return
	}
	i := slices.IndexFunc(e.specs, func(s backendSpec) bool { return s.id == id })
	spec, d := e.specs[i], e.dovecots[id]
	addr := d.Addr
	if spec.sec == routing.SecurityTLS {
		addr = d.TLSAddr
	}
	host, port := consulHostPort(t, addr)
	meta := map[string]string{
		consul.MetaWeight:   spec.weight,
		consul.MetaSecurity: spec.sec.String(),
	}
	if spec.sec != routing.SecurityNone {
		meta[consul.MetaTLSServerName] = "localhost" // the test CA's name
	}
	err := e.api.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: id, Name: consulService, Address: host, Port: port, Meta: meta,
		Check: &api.AgentServiceCheck{TCP: addr, Interval: "1s", Timeout: "500ms"},
	})
	if err != nil {
		t.Fatalf("register %s: %v", id, err)
	}
	// Checks start critical; the first one runs within the interval.
	consulWaitUntil(t, 10*time.Second, id+" passing in Consul", func() bool {
		entries, _, err := e.api.Health().Service(consulService, "", true, nil)
		return err == nil && slices.ContainsFunc(entries, func(s *api.ServiceEntry) bool { return s.Service.ID == id })
	})
	e.joined[id] = true
}

func consulHostPort(t testing.TB, addr string) (string, int) {
	t.Helper()
	ap, err := net.ResolveTCPAddr("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return ap.IP.String(), ap.Port
}

// kv returns user's entry in Consul (nil if none).
func (e *consulEnv) kv(t testing.TB, user string) *api.KVPair {
	t.Helper()
	p, _, err := e.api.KV().Get("imapgate/users/"+user, nil)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func (e *consulEnv) kvBackend(t testing.TB, user string) string {
	t.Helper()
	if p := e.kv(t, user); p != nil {
		return string(p.Value)
	}
	return ""
}

// gate is one imapgate instance: a proxy.Server whose router is its own
// consul.Consul, and which that router evicts through.
type gate struct {
	r   *consul.Consul
	h   *harness
	reg *prometheus.Registry
}

// gate starts an imapgate instance. Cleanup closes the server, then the
// router.
func (e *consulEnv) gate(t testing.TB, mod func(*consul.ConsulConfig), srvMod func(*proxy.Options)) *gate {
	t.Helper()
	ev := &proxy.LateEvictor{}
	g := &gate{reg: prometheus.NewRegistry()}
	cfg := consul.ConsulConfig{
		Address:    e.consul.HTTPAddr,
		Service:    consulService,
		BackendTLS: e.backendTLS,
		Evictor:    ev,
		RetryMax:   500 * time.Millisecond,
		Logger:     zaptest.NewLogger(t).Named("router"),
		Registerer: g.reg,
	}
	if mod != nil {
		mod(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := consul.NewConsul(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	g.r = r
	// The cleartext listener lets loopback clients log in without TLS,
	// for tests whose subject is not the client's TLS (loginPlain).
	g.h = newHarnessListeners(t, r, srvMod, proxy.Listener{Mode: proxy.StartTLS, InsecureAuth: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}})
	ev.Set(g.h.srv)
	return g
}

// waitPlaceable waits until the router places new users on exactly ids.
func (g *gate) waitPlaceable(t testing.TB, ids ...string) {
	t.Helper()
	consulWaitUntil(t, 10*time.Second, fmt.Sprintf("the router to place on %v", ids), func() bool {
		var got []string
		for _, b := range g.r.States() {
			if b.Placeable {
				got = append(got, b.ID)
			}
		}
		return slices.Equal(got, ids)
	})
}

func (g *gate) backend(id string) consul.BackendState {
	for _, b := range g.r.States() {
		if b.ID == id {
			return b
		}
	}
	return consul.BackendState{}
}

// counter reads one of the router's counters.
func (g *gate) counter(t testing.TB, name, label, value string) float64 {
	t.Helper()
	mfs, err := g.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetName() == label && lp.GetValue() == value {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

// login logs user in through g and asks the backend who it is.
func (g *gate) login(user string) (*gateSession, error) {
	// Dovecot and imapgate lower-case the name; the password file is
	// keyed by the lower-case name.
	return gateLogin(g.h.tlsAddr, g.h.clientTLS, user, consulPassword(strings.ToLower(user)), true)
}

// loginPlain is login over cleartext: half the TLS handshakes, which
// dominate the CPU of a login in this process.
func (g *gate) loginPlain(user string) (*gateSession, error) {
	return gateLogin(g.h.startTLSAddr, nil, user, consulPassword(strings.ToLower(user)), true)
}

// mustLogin is login for the test goroutine.
func (g *gate) mustLogin(t testing.TB, user string) *gateSession {
	t.Helper()
	s, err := g.login(user)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.close)
	return s
}

// landsOn logs user in, checks where, and logs out.
func (g *gate) landsOn(t testing.TB, user string) string {
	t.Helper()
	s := g.mustLogin(t, user)
	if err := s.logout(); err != nil {
		t.Fatalf("%s: %v", user, err)
	}
	return s.backend
}

// landsOnRetrying is landsOn for a login that may be refused (or
// kicked) once, as a client retries a temporary failure.
func (g *gate) landsOnRetrying(t testing.TB, user string) string {
	t.Helper()
	var err error
	for range 5 {
		var s *gateSession
		if s, err = g.login(user); err == nil {
			if err = s.logout(); err == nil {
				return s.backend
			}
		}
	}
	t.Fatalf("%s: %v", user, err)
	return ""
}

// gateSession is a client session through imapgate. Its methods return
// errors instead of failing the test so that workers can use them.
type gateSession struct {
	user    string
	backend string // what the backend said its service ID is
	c       net.Conn
	br      *bufio.Reader
}

var markerRE = regexp.MustCompile(`"` + markerField + `" "([^"]+)"`)

// loginRefusedError is a login imapgate answered with NO.
type loginRefusedError struct{ line string }

func (e *loginRefusedError) Error() string { return "login refused: " + e.line }

// gateLogin logs in, over TLS unless cfg is nil, and, if askBackend, asks
// the backend who it is.
func gateLogin(addr string, cfg *tls.Config, user, pass string, askBackend bool) (*gateSession, error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	var c net.Conn
	var err error
	if cfg != nil {
		c, err = tls.DialWithDialer(&d, "tcp", addr, cfg)
	} else {
		c, err = d.Dial("tcp", addr)
	}
	if err != nil {
		return nil, err
	}
	s := &gateSession{user: user, c: c, br: bufio.NewReader(c)}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if l, err := s.readLine(); err != nil || !strings.HasPrefix(l, "* OK") {
		c.Close()
		return nil, fmt.Errorf("greeting %q: %v", l, err)
	}
	l, _, err := s.cmd("a", fmt.Sprintf("LOGIN %q %q", user, pass))
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("login %s: %w", user, err)
	}
	if !strings.HasPrefix(l, "a OK") {
		c.Close()
		return nil, &loginRefusedError{l}
	}
	if !askBackend {
		return s, nil
	}
	l, untagged, err := s.cmd("i", "ID NIL")
	if err != nil || !strings.HasPrefix(l, "i OK") {
		c.Close()
		return nil, fmt.Errorf("ID after login of %s: %q, %v", user, l, err)
	}
	for _, u := range untagged {
		if m := markerRE.FindStringSubmatch(u); m != nil {
			s.backend = m[1]
		}
	}
	if s.backend == "" {
		c.Close()
		return nil, fmt.Errorf("%s: the backend's ID answer %q has no %s", user, untagged, markerField)
	}
	return s, nil
}

func (s *gateSession) readLine() (string, error) {
	l, err := s.br.ReadString('\n')
	return strings.TrimRight(l, "\r\n"), err
}

// cmd sends one command and reads up to its tagged answer.
func (s *gateSession) cmd(tag, line string) (tagged string, untagged []string, err error) {
	if _, err := io.WriteString(s.c, tag+" "+line+"\r\n"); err != nil {
		return "", nil, err
	}
	for {
		l, err := s.readLine()
		if err != nil {
			return "", untagged, fmt.Errorf("after %q: %w", untagged, err)
		}
		if strings.HasPrefix(l, tag+" ") {
			return l, untagged, nil
		}
		untagged = append(untagged, l)
	}
}

func (s *gateSession) noop() error {
	l, _, err := s.cmd("n", "NOOP")
	if err == nil && !strings.HasPrefix(l, "n OK") {
		err = fmt.Errorf("NOOP: %q", l)
	}
	return err
}

func (s *gateSession) logout() error {
	defer s.c.Close()
	l, _, err := s.cmd("z", "LOGOUT")
	if err == nil && !strings.HasPrefix(l, "z OK") {
		err = fmt.Errorf("LOGOUT: %q", l)
	}
	return err
}

func (s *gateSession) close() { s.c.Close() }

// waitClosed reads until the server hangs up and returns what it said
// meanwhile (nothing, or a BYE); it fails if the session is still open
// after timeout.
func (s *gateSession) waitClosed(timeout time.Duration) ([]string, error) {
	s.c.SetReadDeadline(time.Now().Add(timeout))
	var lines []string
	for {
		l, err := s.readLine()
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return lines, fmt.Errorf("session of %s on %s still open after %v (read %q)", s.user, s.backend, timeout, lines)
			}
			return lines, nil
		}
		lines = append(lines, l)
	}
}

// consulWaitUntil polls cond, for state that has no signal to wait on (the
// router's view of Consul).
func consulWaitUntil(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(timeout); !cond(); {
		if time.Now().After(end) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func consulUser(family string, i int) string { return fmt.Sprintf("%s%03d@example.org", family, i) }

// TestConsulRouting shares one Consul and three Dovecots between its
// subtests; they run in order and each uses its own users.
func TestConsulRouting(t *testing.T) {
	e := startConsulEnv(t, consulSpecs)
	e.join(t, "dovecot1")
	e.join(t, "dovecot2")

	t.Run("PinnedUser", func(t *testing.T) { testConsulPinnedUser(t, e) })
	t.Run("SpreadByWeightAndStick", func(t *testing.T) { testConsulSpreadAndStick(t, e) })
	t.Run("RacingInstances", func(t *testing.T) { testConsulRacingInstances(t, e) })
	t.Run("PinChangeKicks", func(t *testing.T) { testConsulPinChangeKicks(t, e) })
	t.Run("ConsulOutage", func(t *testing.T) { testConsulOutage(t, e) })
	// Last: it stops a Dovecot.
	t.Run("BackendFails", func(t *testing.T) { testConsulBackendFails(t, e) })
}

// staticPick is where weighted rendezvous hashing alone would put user
// over dovecot1 and dovecot2; the README promises the static router and
// the Consul router hash alike.
func staticPick(t testing.TB, user string) string {
	t.Helper()
	s, err := routing.NewStatic(routing.StaticConfig{Backends: map[string]*routing.Backend{
		"dovecot1": {Addr: "127.0.0.1:1", Weight: 1},
		"dovecot2": {Addr: "127.0.0.1:2", Weight: 3},
	}})
	if err != nil {
		t.Fatal(err)
	}
	b, err := s.Route(context.Background(), user)
	if err != nil {
		t.Fatal(err)
	}
	return b.ID
}

func otherDovecot(id string) string {
	if id == "dovecot1" {
		return "dovecot2"
	}
	return "dovecot1"
}

func testConsulPinnedUser(t *testing.T, e *consulEnv) {
	// pinned000 is pinned before imapgate starts, pinned001 while it runs
	// (and logs in before the router's watch can have seen the pin), each
	// to the backend hashing would not have chosen.
	early, late := consulUser("pinned", 0), consulUser("pinned", 1)
	pin := func(user string) string {
		to := otherDovecot(staticPick(t, user))
		if _, err := e.api.KV().Put(&api.KVPair{Key: "imapgate/users/" + user, Value: []byte(to), Flags: consul.FlagPinned}, nil); err != nil {
			t.Fatal(err)
		}
		return to
	}
	earlyTo := pin(early)
	g := e.gate(t, nil, nil)
	lateTo := pin(late)
	// The first login may race the pin: Route proposes the hash, the
	// commit loses to the pin and the client is told to retry (or the
	// watch kicks the session); the retry lands on the pin.
	if got := g.landsOnRetrying(t, late); got != lateTo {
		t.Errorf("%s pinned to %s a moment ago landed on %s", late, lateTo, got)
	}
	local, _, _ := strings.Cut(early, "@")
	for _, u := range []string{early, "P" + local[1:] + "@Example.ORG"} {
		if got := g.landsOn(t, u); got != earlyTo {
			t.Errorf("%s pinned to %s landed on %s", u, earlyTo, got)
		}
	}
	// The pinned Dovecot's own log has the login.
	e.dovecots[earlyTo].WaitLog(t, "Login: user=<"+early+">")
	// imapgate did not overwrite the pins.
	for u, to := range map[string]string{early: earlyTo, late: lateTo} {
		if p := e.kv(t, u); p == nil || string(p.Value) != to || p.Flags != consul.FlagPinned {
			t.Errorf("%s's entry after login: %+v", u, p)
		}
	}
	// An unpinned user is placed where hashing says, and recorded.
	free := consulUser("pinned", 2)
	if got, want := g.landsOn(t, free), staticPick(t, free); got != want {
		t.Errorf("unpinned %s landed on %s, hashing says %s", free, got, want)
	}
	if p := e.kv(t, free); p == nil || p.Flags != 0 || string(p.Value) != staticPick(t, free) {
		t.Errorf("unpinned %s recorded as %+v", free, p)
	}
}

// consulLoginAll logs users in through g with a few workers and returns where
// each landed, by the backend's own word.
func consulLoginAll(t *testing.T, g *gate, users []string, workers int) map[string]string {
	t.Helper()
	var mu sync.Mutex
	got := map[string]string{}
	ch := make(chan string)
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for u := range ch {
				s, err := g.login(u)
				if err != nil {
					t.Error(err)
					continue
				}
				if err := s.logout(); err != nil {
					t.Errorf("%s: %v", u, err)
				}
				mu.Lock()
				got[u] = s.backend
				mu.Unlock()
			}
		})
	}
	for _, u := range users {
		ch <- u
	}
	close(ch)
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	return got
}

func consulFamily(name string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = consulUser(name, i)
	}
	return out
}

func testConsulSpreadAndStick(t *testing.T, e *consulEnv) {
	g := e.gate(t, nil, nil)
	g.waitPlaceable(t, "dovecot1", "dovecot2")
	users := consulFamily("spread", 60)
	first := consulLoginAll(t, g, users, 6)
	counts := map[string]int{}
	index := map[string]uint64{}
	for _, u := range users {
		counts[first[u]]++
		p := e.kv(t, u)
		if p == nil || string(p.Value) != first[u] {
			t.Fatalf("%s landed on %s, KV says %+v", u, first[u], p)
		}
		index[u] = p.ModifyIndex
	}
	// Weights 1 and 3: the hash is fixed, so this split is too; the
	// bounds only say it follows the weights.
	t.Logf("60 users over dovecot1 (weight 1) and dovecot2 (weight 3): %v", counts)
	if f := float64(counts["dovecot2"]) / 60; f < 0.6 || f > 0.9 {
		t.Errorf("dovecot2 (weight 3 of 4) got %.2f of the users: %v", f, counts)
	}

	e.join(t, "dovecot3")
	g.waitPlaceable(t, "dovecot1", "dovecot2", "dovecot3")
	again := consulLoginAll(t, g, users, 6)
	for _, u := range users {
		if again[u] != first[u] {
			t.Errorf("%s moved from %s to %s after dovecot3 joined", u, first[u], again[u])
		}
		if p := e.kv(t, u); p.ModifyIndex != index[u] {
			t.Errorf("%s's entry was rewritten after dovecot3 joined: %+v", u, p)
		}
	}
	// New users now go to dovecot3 too (weight 2 of 6).
	fresh := consulLoginAll(t, g, consulFamily("new", 30), 6)
	n3 := 0
	for _, id := range fresh {
		if id == "dovecot3" {
			n3++
		}
	}
	t.Logf("30 new users after the join: %d on dovecot3", n3)
	if n3 < 4 {
		t.Errorf("only %d of 30 new users on the new backend (weight 2 of 6)", n3)
	}
}

func testConsulRacingInstances(t *testing.T, e *consulEnv) {
	quiet := func(o *proxy.Options) { o.Logger = zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)) }
	a, b := e.gate(t, nil, quiet), e.gate(t, nil, quiet)
	users := consulFamily("race", 200)
	start := time.Now()
	var wg sync.WaitGroup
	ch := make(chan string)
	var mu sync.Mutex
	landed := map[string][2]string{}
	for range 20 {
		wg.Go(func() {
			for u := range ch {
				// Both instances log the new user in at once and keep both
				// sessions open until each has said where it is.
				var pair [2]*gateSession
				var errs [2]error
				var both sync.WaitGroup
				for i, g := range []*gate{a, b} {
					both.Go(func() { pair[i], errs[i] = g.loginPlain(u) })
				}
				both.Wait()
				if errs[0] != nil || errs[1] != nil {
					t.Errorf("%s: %v / %v", u, errs[0], errs[1])
				}
				var where [2]string
				for i, s := range pair {
					if s != nil {
						where[i] = s.backend
						if err := s.logout(); err != nil {
							t.Errorf("%s: %v", u, err)
						}
					}
				}
				mu.Lock()
				landed[u] = where
				mu.Unlock()
			}
		})
	}
	for _, u := range users {
		ch <- u
	}
	close(ch)
	wg.Wait()
	took := time.Since(start)

	pairs, _, err := e.api.KV().List("imapgate/users/race", nil)
	if err != nil {
		t.Fatal(err)
	}
	kv := map[string]string{}
	for _, p := range pairs {
		kv[strings.TrimPrefix(p.Key, "imapgate/users/")] = string(p.Value)
	}
	if len(pairs) != len(users) {
		t.Errorf("KV has %d race entries, want %d", len(pairs), len(users))
	}
	counts := map[string]int{}
	for _, u := range users {
		w := landed[u]
		if w[0] != w[1] || w[0] != kv[u] {
			t.Errorf("%s: instance A's session on %s, B's on %s, KV says %q", u, w[0], w[1], kv[u])
		}
		counts[w[0]]++
	}
	raced := a.counter(t, "imapgate_consul_placements_total", "result", "raced") +
		b.counter(t, "imapgate_consul_placements_total", "result", "raced")
	created := a.counter(t, "imapgate_consul_placements_total", "result", "created") +
		b.counter(t, "imapgate_consul_placements_total", "result", "created")
	t.Logf("400 logins of 200 new users through two instances in %v: %v; placements created %v, lost the CAS race %v",
		took.Round(time.Millisecond), counts, created, raced)
	if created != float64(len(users)) {
		t.Errorf("%v placements created, want one per user (%d)", created, len(users))
	}
}

func testConsulPinChangeKicks(t *testing.T, e *consulEnv) {
	a, b := e.gate(t, nil, nil), e.gate(t, nil, nil)
	user := consulUser("mover", 0)
	sa, sb := a.mustLogin(t, user), b.mustLogin(t, user)
	home := sa.backend
	if sb.backend != home {
		t.Fatalf("instances disagree: %s vs %s", home, sb.backend)
	}
	for _, s := range []*gateSession{sa, sb} {
		if l, _, err := s.cmd("s", "SELECT INBOX"); err != nil || !strings.HasPrefix(l, "s OK") {
			t.Fatalf("SELECT: %q %v", l, err)
		}
	}
	dest := "dovecot1"
	if home == dest {
		dest = "dovecot2"
	}

	// The move: an API pin on instance A must close the sessions on both.
	start := time.Now()
	if err := a.r.Pin(context.Background(), user, dest); err != nil {
		t.Fatal(err)
	}
	for name, s := range map[string]*gateSession{"A": sa, "B": sb} {
		lines, err := s.waitClosed(5 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		took := time.Since(start)
		t.Logf("instance %s's session on %s closed %v after the pin, saying %q", name, home, took.Round(time.Millisecond), lines)
		if took > 2*time.Second {
			t.Errorf("instance %s kicked the moved user after %v, want within 2s", name, took)
		}
		if len(lines) == 0 || !strings.HasPrefix(lines[0], "* BYE [UNAVAILABLE]") {
			t.Errorf("instance %s: the kicked client read %q, want * BYE [UNAVAILABLE]", name, lines)
		}
	}
	for name, g := range map[string]*gate{"A": a, "B": b} {
		if got := g.landsOn(t, user); got != dest {
			t.Errorf("after the pin, login through %s landed on %s, want %s", name, got, dest)
		}
	}

	// An operator's plain `consul kv put` moves the user back the same way.
	s := b.mustLogin(t, user)
	start = time.Now()
	if _, err := e.api.KV().Put(&api.KVPair{Key: "imapgate/users/" + user, Value: []byte(home)}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.waitClosed(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	t.Logf("kv put moved the user back; session closed after %v", time.Since(start).Round(time.Millisecond))
	if got := a.landsOn(t, user); got != home {
		t.Errorf("after kv put, login landed on %s, want %s", got, home)
	}
}

func testConsulOutage(t *testing.T, e *consulEnv) {
	g := e.gate(t, func(c *consul.ConsulConfig) {
		c.Grace = 5 * time.Second
		c.PlaceTimeout = 500 * time.Millisecond
	}, nil)
	users := consulFamily("outage", 20)
	known := consulLoginAll(t, g, users, 4)
	live := g.mustLogin(t, users[0])

	e.consul.Stop(t)
	consulWaitUntil(t, 10*time.Second, "the router to notice the outage", func() bool { return g.r.ViewAge() > 0 })
	var slowest time.Duration
	for _, u := range users {
		t0 := time.Now()
		got := g.landsOn(t, u)
		slowest = max(slowest, time.Since(t0))
		if got != known[u] {
			t.Errorf("during the outage %s landed on %s, before on %s", u, got, known[u])
		}
	}
	t.Logf("20 known users logged in during the outage, slowest login %v", slowest.Round(time.Microsecond))
	newcomer := consulUser("outage-new", 0)
	t0 := time.Now()
	placed := g.landsOn(t, newcomer)
	t.Logf("a new user logged in during the outage in %v (on %s, by hash, unrecorded)", time.Since(t0).Round(time.Millisecond), placed)
	if err := live.noop(); err != nil {
		t.Errorf("a session open across the outage: %v", err)
	}

	t0 = time.Now()
	e.consul.Start(t)
	consulWaitUntil(t, 20*time.Second, "the router to reconnect", func() bool { return g.r.ViewAge() == 0 })
	t.Logf("router back %v after Start was called", time.Since(t0).Round(time.Millisecond))
	for _, u := range users {
		if got := g.landsOn(t, u); got != known[u] {
			t.Errorf("after the outage %s landed on %s, before on %s", u, got, known[u])
		}
	}
	if got := g.landsOn(t, newcomer); got != placed {
		t.Errorf("the newcomer moved from %s to %s after the outage", placed, got)
	}
	if got := e.kvBackend(t, newcomer); got != placed {
		t.Errorf("the newcomer is recorded as %q after the outage, lives on %s", got, placed)
	}
	if err := live.noop(); err != nil {
		t.Errorf("a session open across the outage and the restart: %v", err)
	}
	// A restarted agent starts its checks critical until each has run
	// once (every second): the router must follow them back.
	consulWaitUntil(t, 10*time.Second, "every backend placeable after the restart", func() bool {
		for _, b := range g.r.States() {
			if !b.Placeable {
				return false
			}
		}
		return true
	})
	// The watches are live again, not just connected: a move made now
	// reaches the session that lived through the outage.
	dest := "dovecot1"
	if live.backend == dest {
		dest = "dovecot2"
	}
	if err := g.r.Pin(context.Background(), live.user, dest); err != nil {
		t.Fatal(err)
	}
	if _, err := live.waitClosed(5 * time.Second); err != nil {
		t.Fatalf("a move after the restart: %v", err)
	}
	if got := g.landsOn(t, live.user); got != dest {
		t.Errorf("moved after the restart to %s, landed on %s", dest, got)
	}
}

func testConsulBackendFails(t *testing.T, e *consulEnv) {
	const grace = 2 * time.Second
	g := e.gate(t, func(c *consul.ConsulConfig) { c.Grace = grace }, nil)
	e.mu.Lock()
	all := slices.Sorted(maps.Keys(e.joined))
	e.mu.Unlock()
	g.waitPlaceable(t, all...)

	// Live sessions on dovecot1 and dovecot2.
	on := map[string][]*gateSession{}
	for i := 0; len(on["dovecot1"]) < 2 || len(on["dovecot2"]) < 2; i++ {
		if i == 40 {
			t.Fatalf("40 users placed, not two each on dovecot1 and dovecot2: %v", on)
		}
		s := g.mustLogin(t, consulUser("fail", i))
		on[s.backend] = append(on[s.backend], s)
	}
	pinned := consulUser("fail-pinned", 0)
	if _, err := e.api.KV().Put(&api.KVPair{Key: "imapgate/users/" + pinned, Value: []byte("dovecot1"), Flags: consul.FlagPinned}, nil); err != nil {
		t.Fatal(err)
	}

	t.Run("CheckCriticalWhileServing", func(t *testing.T) {
		// Maintenance mode makes dovecot1's health critical in Consul
		// while Dovecot keeps serving, so what closes its sessions can
		// only be imapgate, after the grace.
		start := time.Now()
		if err := e.api.Agent().EnableServiceMaintenance("dovecot1", "test"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { e.api.Agent().DisableServiceMaintenance("dovecot1") })
		for _, s := range on["dovecot1"] {
			lines, err := s.waitClosed(grace + 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			took := time.Since(start)
			t.Logf("%s kicked from dovecot1 %v after it went critical: %q", s.user, took.Round(time.Millisecond), lines)
			if took < grace {
				t.Errorf("%s kicked %v after dovecot1 went critical, inside the %v grace", s.user, took, grace)
			}
			if len(lines) == 0 || !strings.HasPrefix(lines[0], "* BYE [UNAVAILABLE]") {
				t.Errorf("%s read %q, want imapgate's * BYE [UNAVAILABLE]", s.user, lines)
			}
			if got := g.landsOn(t, s.user); got == "dovecot1" || got != e.kvBackend(t, s.user) {
				t.Errorf("%s's next login landed on %s, KV says %s", s.user, got, e.kvBackend(t, s.user))
			}
		}
		for _, s := range on["dovecot2"] {
			if err := s.noop(); err != nil {
				t.Errorf("%s on dovecot2: %v", s.user, err)
			}
		}
		if _, err := g.login(pinned); !refusedWith(err, "NO [UNAVAILABLE]") {
			t.Errorf("user pinned to the gone backend: %v, want NO [UNAVAILABLE]", err)
		}
		if err := e.api.Agent().DisableServiceMaintenance("dovecot1"); err != nil {
			t.Fatal(err)
		}
		g.waitPlaceable(t, all...)
		if got := g.landsOn(t, pinned); got != "dovecot1" {
			t.Errorf("pinned user on %s once dovecot1 is back", got)
		}
	})

	t.Run("DovecotStops", func(t *testing.T) {
		s := on["dovecot2"][0]
		e.dovecots["dovecot2"].Stop(t)
		start := time.Now()
		// Dovecot closes its own sessions as it stops; imapgate relays
		// that at once.
		lines, err := s.waitClosed(5 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s's session ended with Dovecot: %q", s.user, lines)
		// Within the grace the user still belongs to dovecot2: a quick
		// NO [UNAVAILABLE], never a second home.
		if again, err := g.login(s.user); err == nil {
			again.close()
			t.Errorf("%s logged in on %s inside the grace", s.user, again.backend)
		} else if b := g.backend("dovecot2"); !b.Gone && !refusedWith(err, "NO [UNAVAILABLE]") {
			t.Errorf("login inside the grace: %v, want NO [UNAVAILABLE]", err)
		}
		consulWaitUntil(t, 15*time.Second, "dovecot2 gone", func() bool { return g.backend("dovecot2").Gone || g.backend("dovecot2").ID == "" })
		t.Logf("dovecot2 declared gone %v after it stopped", time.Since(start).Round(time.Millisecond))
		for _, s := range on["dovecot2"] {
			got := g.landsOn(t, s.user)
			if got == "dovecot2" || got != e.kvBackend(t, s.user) {
				t.Errorf("%s's login after the grace landed on %s, KV says %s", s.user, got, e.kvBackend(t, s.user))
			}
		}
	})
}

func refusedWith(err error, prefix string) bool {
	var r *loginRefusedError
	return errors.As(err, &r) && strings.HasPrefix(strings.TrimPrefix(r.line, "a "), prefix)
}

// BenchmarkConsulLogin measures whole logins through imapgate with the
// Consul router in front of two cleartext Dovecots: TCP connect, TLS
// handshake with imapgate (no resumption), LOGIN relayed to the Dovecot
// the router names, LOGOUT. The users are placed before timing starts, so
// each login's route is a lookup in memory. cpu-us/login is this
// process's CPU, imapgate's and the client's together (not Dovecot's or
// Consul's); "handshake-only" is the same connection with no login (TLS,
// greeting, LOGOUT answered by imapgate), the part of the cost that has
// nothing to do with routing or the backend.
func BenchmarkConsulLogin(b *testing.B) {
	e := startConsulEnv(b, []backendSpec{{"dovecot1", "1", routing.SecurityNone}, {"dovecot2", "1", routing.SecurityNone}})
	e.join(b, "dovecot1")
	e.join(b, "dovecot2")
	g := e.gate(b, func(c *consul.ConsulConfig) { c.Logger = nil }, func(o *proxy.Options) { o.Logger = zap.NewNop() })
	users := consulFamily("bench", 16)
	for _, u := range users {
		g.landsOn(b, u)
	}
	login := func(u string) error {
		s, err := gateLogin(g.h.tlsAddr, g.h.clientTLS, u, consulPassword(u), false)
		if err != nil {
			return err
		}
		return s.logout()
	}
	handshake := func(string) error {
		c, err := tls.Dial("tcp", g.h.tlsAddr, g.h.clientTLS)
		if err != nil {
			return err
		}
		s := &gateSession{c: c, br: bufio.NewReader(c)}
		if l, err := s.readLine(); err != nil || !strings.HasPrefix(l, "* OK") {
			c.Close()
			return fmt.Errorf("greeting %q: %v", l, err)
		}
		return s.logout()
	}
	report := func(b *testing.B, start time.Time, cpu0 time.Duration) {
		elapsed, cpu := time.Since(start), testenv.SelfCPU(b)-cpu0
		b.ReportMetric(float64(b.N)/elapsed.Seconds(), "logins/s")
		b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-us/login")
	}
	for _, bc := range []struct {
		name     string
		parallel bool
		once     func(string) error
	}{
		{"serial", false, login},
		{"parallel", true, login},
		{"handshake-only", false, handshake},
	} {
		b.Run(bc.name, func(b *testing.B) {
			var next atomic.Int64
			cpu0, start := testenv.SelfCPU(b), time.Now()
			if !bc.parallel {
				for b.Loop() {
					if err := bc.once(users[next.Add(1)%int64(len(users))]); err != nil {
						b.Fatal(err)
					}
				}
				report(b, start, cpu0)
				return
			}
			b.SetParallelism(4) // 4 clients per core
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if err := bc.once(users[next.Add(1)%int64(len(users))]); err != nil {
						b.Error(err)
						return
					}
				}
			})
			report(b, start, cpu0)
		})
	}
}
