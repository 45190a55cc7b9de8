package consul

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/imapgate/imapgate/routing"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/time/rate"
)

// Service Meta keys read from each backend instance in the Consul catalog.
const (
	// MetaWeight is the backend's weight in hashing, a positive integer.
	// Missing means 1.
	MetaWeight = "imapgate-weight"
	// MetaSecurity is how imapgate talks to the backend: "none" (default),
	// "tls" or "starttls".
	MetaSecurity = "imapgate-security"
	// MetaTLSServerName is the name to verify the backend's certificate
	// against. Missing means the host of the service address.
	MetaTLSServerName = "imapgate-tls-server-name"
	// MetaDrain set to "true" puts the backend in drain: no new users are
	// placed there, its existing users stay.
	MetaDrain = "imapgate-drain"
	// MetaProxyProtocol, "1" or "2", makes imapgate send a PROXY protocol
	// header of that version to the backend (Backend.ProxyProtocol).
	// Missing means none.
	MetaProxyProtocol = "imapgate-proxy-protocol"
)

// FlagPinned is the Consul KV flag that marks a user's entry as an
// operator's pin (consul kv put -flags=1). A pinned user is never moved
// by imapgate, even when their backend is gone; an unpinned entry is a
// placement that imapgate re-places once its backend has been down for
// longer than the grace.
const FlagPinned uint64 = 1

// ConsulConfig configures a Consul router. Only Service is required.
type ConsulConfig struct {
	// Client talks to Consul. If nil, one is built from api.DefaultConfig
	// (which reads CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_CACERT,
	// CONSUL_HTTP_SSL and the rest of the CONSUL_* environment) with
	// Address, Token and Datacenter below applied over it, and Close
	// releases its connections.
	Client *api.Client
	// Address of the Consul agent, "host:port" or a URL. Empty means the
	// environment's, else 127.0.0.1:8500. Ignored if Client is set.
	Address string
	// Token is the ACL token. Empty means the environment's. Ignored if
	// Client is set.
	Token string
	// Datacenter to query. Empty means the agent's. Ignored if Client is
	// set.
	Datacenter string

	// Service is the catalog service name of the IMAP backends ("imap").
	Service string
	// Tag, if set, keeps only the instances with this tag.
	Tag string
	// Prefix is the KV prefix of imapgate's data (see the README). Empty
	// means "imapgate". Leading and trailing slashes are ignored.
	Prefix string
	// BackendTLS is the template for Backend.TLS of backends whose
	// MetaSecurity is tls or starttls (root CAs, client certificates). It
	// is cloned per backend and ServerName set from MetaTLSServerName or
	// the service address. If nil, the system roots are used.
	BackendTLS *tls.Config

	// Evictor closes sessions when a user moves or a backend is gone. If
	// nil, nothing is closed and the moves are only logged.
	Evictor routing.Evictor
	// MoveHold holds a moved user's new logins for this long after the
	// move reaches this instance (their old sessions are closed at that
	// moment), so that the old backend has finished writing before the new
	// one opens the mailbox, like Director's move delay. Logins wait
	// within their context. Zero means no hold.
	MoveHold time.Duration
	// Grace is how long a backend may be critical or missing from the
	// catalog before its sessions are closed and its users re-placed, so
	// that a flapping check does not kick thousands of users. Zero means
	// 30s; negative means no grace at all.
	Grace time.Duration
	// WaitTime is the longest a blocking query waits for a change. Zero
	// means 5 minutes. Every wait that ends without a change still fetches
	// the whole users list, so keep it long.
	WaitTime time.Duration
	// RetryMax caps the back-off between failed Consul queries, which
	// starts at 250ms and doubles. Zero means 10s.
	RetryMax time.Duration
	// PlaceTimeout bounds the Consul writes and reads that place a new
	// user, on top of Route's context. Zero means 2s.
	PlaceTimeout time.Duration
	// PlaceRate limits how many new placements per second one instance
	// writes to Consul, with a burst of twice as many, because any
	// unauthenticated client can make imapgate route a made-up user name.
	// Over the limit, users are still routed by hashing but not recorded.
	// Zero means 100 per second; negative means no limit.
	PlaceRate float64

	// SnapshotFile is where the router keeps its last view confirmed by
	// Consul (backends, placements, domains, drains), so that a start
	// while Consul is unreachable can serve from it (see
	// consul_snapshot.go). Empty means no snapshot: such a start fails.
	SnapshotFile string
	// SnapshotMaxAge is the oldest snapshot a start without Consul
	// accepts. Zero means 24h.
	SnapshotMaxAge time.Duration
	// SnapshotInterval is the least time between two writes of the
	// snapshot. Zero means 5s.
	SnapshotInterval time.Duration

	// UsersWatch is how the router learns that a placement changed: the
	// zero value WatchFull lists every user at each change (up to about
	// 100,000 users); WatchFeed caches the users seen and follows the
	// change feed, at a cost per change independent of the number of
	// users, but placements changed by hand must be announced (Announce).
	// See the README's "Scaling".
	UsersWatch UsersWatch
	// CacheSize bounds the users a WatchFeed router keeps in memory (users
	// with a live session here are kept beyond it). Zero means 100,000.
	// Ignored with WatchFull, which holds every user.
	CacheSize int
	// VerifyInterval is how often a WatchFeed router re-reads the entries
	// of its live users, to catch a hand-made change nobody announced
	// (verify.go). Zero means 10 minutes; negative turns the check off.
	VerifyInterval time.Duration

	// Logger receives the router's log. Nil means no logging.
	Logger *zap.Logger
	// Registerer receives the router's metrics (imapgate_consul_*). Nil
	// means they are not registered.
	Registerer prometheus.Registerer
}

func (cfg *ConsulConfig) defaults() {
	if cfg.Grace == 0 {
		cfg.Grace = 30 * time.Second
	} else if cfg.Grace < 0 {
		cfg.Grace = 0
	}
	if cfg.WaitTime <= 0 {
		cfg.WaitTime = 5 * time.Minute
	}
	if cfg.RetryMax <= 0 {
		cfg.RetryMax = 10 * time.Second
	}
	if cfg.PlaceTimeout <= 0 {
		cfg.PlaceTimeout = 2 * time.Second
	}
	if cfg.PlaceRate == 0 {
		cfg.PlaceRate = 100
	}
	if cfg.SnapshotMaxAge <= 0 {
		cfg.SnapshotMaxAge = 24 * time.Hour
	}
	if cfg.SnapshotInterval <= 0 {
		cfg.SnapshotInterval = 5 * time.Second
	}
	if cfg.CacheSize <= 0 {
		cfg.CacheSize = 100000
	}
	if cfg.VerifyInterval == 0 {
		cfg.VerifyInterval = 10 * time.Minute
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	cfg.Prefix = strings.Trim(cfg.Prefix, "/")
	if cfg.Prefix == "" {
		cfg.Prefix = "imapgate"
	}
}

// Consul routes users with Consul as the shared source of truth, so that
// every imapgate instance sends a user to the same backend:
//
//   - backends are the passing instances of a catalog service, watched
//     with blocking queries;
//   - each user's backend is recorded under <prefix>/users/<user>; a new
//     user is placed by weighted rendezvous hashing over the passing,
//     non-draining backends (or their domain's pool) and the placement is
//     written with check-and-set, so racing instances agree;
//   - a changed entry (an operator's move) closes the user's sessions
//     everywhere through the Evictor: with WatchFull every instance
//     watches the whole users prefix; with WatchFeed each keeps the users
//     it has seen and follows the change feed (feed.go).
//
// Route answers from memory: a known user costs Consul nothing (with
// WatchFeed, one read the first time an instance sees the user). If
// Consul becomes unreachable, Route keeps answering from the last view.
type Consul struct {
	cfg     ConsulConfig
	log     *zap.Logger
	client  *api.Client
	ownHTTP *http.Transport // closed by Close if we built the client
	limit   *rate.Limiter   // nil: unlimited
	metrics *consulMetrics
	started time.Time

	view atomic.Pointer[consulView]

	// overlay holds this instance's own placements until the KV watch
	// brings them back (user → *overlayEntry), so that a user's second
	// login does not race the watch.
	overlay  sync.Map
	overlayN atomic.Int64

	// holds are the users whose logins wait after a move: user →
	// time.Time when the hold ends.
	holds sync.Map
	holdN atomic.Int64

	catalogHealth watchHealth
	kvHealth      [kvKinds]watchHealth

	// cache holds the users seen, with WatchFeed (nil with WatchFull);
	// feedHealth and feedSeq are the change feed's shards (feed.go);
	// feedResyncAtStart makes the feed re-read the cached users once
	// Consul answers (after a start from a snapshot).
	cache             *userCache
	feedHealth        [feedShards]watchHealth
	feedSeq           [feedShards]atomic.Uint64
	feedGen           [feedShards]atomic.Uint64 // bumped when a shard changes (fetchUser)
	feedResyncAtStart atomic.Bool

	mu       sync.Mutex // guards the fields below, and building views
	states   map[string]*backendState
	kvUsers  map[string]assignment
	kvDomain map[string]string
	kvDrain  map[string]bool

	// kvApplied is the index of the last listing applied per kind: an
	// older (stale) listing is never applied over a newer one.
	kvApplied [kvKinds]uint64

	// umu guards unrec, the routes served but not recorded (user →
	// route); see consul_commit.go.
	umu   sync.Mutex
	unrec map[string]unrecorded
	// changed wakes the reconciler after a view change.
	changed chan struct{}
	// evq are the evictions evictLoop has still to run.
	evmu   sync.Mutex
	evq    []evictJob
	evWake chan struct{}

	// snapAt is the time (unix ns) of the snapshot the router serves
	// from, 0 once Consul confirmed the view; snapDirty is set when the
	// view changed since the last write (or the last write is older than
	// snapshotRefresh); snapWake wakes snapshotLoop.
	snapAt      atomic.Int64
	snapDirty   atomic.Bool
	snapFailing atomic.Bool // the last write failed: log once per streak
	snapWake    chan struct{}

	cancel    context.CancelFunc
	wg        sync.WaitGroup
	closeOnce sync.Once
}

var (
	_ routing.Router    = (*Consul)(nil)
	_ routing.Committer = (*Consul)(nil)
)

// assignment is one user's entry in KV.
type assignment struct {
	backend string
	flags   uint64
	index   uint64 // ModifyIndex
}

func (a assignment) pinned() bool { return a.flags&FlagPinned != 0 }

type overlayEntry struct {
	backend string
	minIdx  uint64 // the view wins once its entry's index reaches this
	at      time.Time
}

// NewConsul connects to Consul, loads the catalog and the KV prefix, and
// starts watching both; it returns an error if Consul cannot be reached
// within ctx, so a misconfigured imapgate fails at start rather than at
// the first login, unless cfg.SnapshotFile holds a usable snapshot: then
// it starts from it, degraded (SnapshotAge, consul_snapshot.go), and the
// watches catch up when Consul answers. Call Close to stop the watches.
func NewConsul(ctx context.Context, cfg ConsulConfig) (*Consul, error) {
	if cfg.Service == "" {
		return nil, errors.New("routing: consul: no service name configured")
	}
	cfg.defaults()
	c := &Consul{
		cfg:      cfg,
		log:      cfg.Logger.With(zap.String("router", "consul"), zap.String("service", cfg.Service)),
		client:   cfg.Client,
		started:  time.Now(),
		states:   map[string]*backendState{},
		kvUsers:  map[string]assignment{},
		kvDomain: map[string]string{},
		kvDrain:  map[string]bool{},
		unrec:    map[string]unrecorded{},
		changed:  make(chan struct{}, 1),
		evWake:   make(chan struct{}, 1),
		snapWake: make(chan struct{}, 1),
	}
	if c.client == nil {
		client, tr, err := NewConsulClient(ConsulClientConfig{Address: cfg.Address, Token: cfg.Token, Datacenter: cfg.Datacenter})
		if err != nil {
			return nil, err
		}
		c.client, c.ownHTTP = client, tr
	}
	if cfg.UsersWatch == WatchFeed {
		c.cache = newUserCache(cfg.CacheSize)
	}
	if cfg.PlaceRate > 0 {
		c.limit = rate.NewLimiter(rate.Limit(cfg.PlaceRate), int(2*cfg.PlaceRate)+1)
	}
	c.metrics = newConsulMetrics(c)
	if cfg.Registerer != nil {
		if err := c.metrics.register(cfg.Registerer); err != nil {
			c.closeIdle()
			return nil, fmt.Errorf("routing: consul metrics: %w", err)
		}
	}

	st, err := c.load(ctx)
	if err != nil {
		err = fmt.Errorf("routing: consul at %s unreachable at start-up: %w", c.addr(), err)
		if serr := c.startFromSnapshot(err); serr != nil {
			c.metrics.unregister(cfg.Registerer)
			c.closeIdle()
			return nil, serr
		}
		st = startIndexes{}
	}
	c.startWatches(st)
	v := c.view.Load()
	c.log.Info("consul router ready",
		zap.Int("backends", len(v.routable)), zap.Int("placeable", v.def.Len()),
		zap.Int("users", c.userCount()), zap.String("users_watch", cfg.UsersWatch.String()), zap.String("prefix", cfg.Prefix))
	return c, nil
}

// startIndexes are where the watches start (zero: from scratch).
type startIndexes struct {
	catalog uint64
	kv      [kvKinds]uint64
	// feed, feedSeq: each change-feed shard's index and last sequence
	// number; feedKnown is false when they are unknown (a start from a
	// snapshot).
	feed, feedSeq [feedShards]uint64
	feedKnown     bool
}

// load reads the catalog and every KV sub-prefix once (with WatchFeed:
// not the users, only the change feed's shard keys) and returns the
// indexes the watches start from.
func (c *Consul) load(ctx context.Context) (st startIndexes, err error) {
	if st.catalog, err = c.fetchCatalog(ctx, 0); err != nil {
		return st, err
	}
	for kind := range kvKinds {
		if kind == kvUsers && c.cache != nil {
			continue
		}
		if st.kv[kind], err = c.fetchKV(ctx, kind, 0); err != nil {
			return st, err
		}
	}
	if c.cache != nil {
		if st.feed, st.feedSeq, err = c.loadFeed(ctx); err != nil {
			return st, err
		}
		st.feedKnown = true
	}
	return st, nil
}

// startWatches starts a watch on the catalog and each KV sub-prefix (or
// the change feed) from where the read left off, and the router's other
// loops.
func (c *Consul) startWatches(st startIndexes) {
	wctx, cancel := context.WithCancel(context.Background())
	c.cancel = cancel
	c.wg.Add(5)
	go c.snapshotLoop(wctx)
	go c.catalogLoop(wctx, st.catalog)
	go c.reconcileLoop(wctx)
	go c.evictLoop(wctx)
	for kind := range kvKinds {
		if kind == kvUsers && c.cache != nil {
			continue
		}
		c.wg.Add(1)
		go c.kvLoop(wctx, kind, st.kv[kind])
	}
	if c.cache != nil {
		c.wg.Add(1 + feedShards)
		go c.cacheTrimLoop(wctx)
		if c.cfg.VerifyInterval > 0 {
			c.wg.Add(1)
			go c.verifyLoop(wctx)
		}
		for s := range feedShards {
			go c.feedLoop(wctx, s, st.feed[s], st.feedSeq[s], st.feedKnown)
		}
	}
	go c.graceLoop(wctx)
}

// userCount is how many user entries the router holds in memory.
func (c *Consul) userCount() int {
	if c.cache != nil {
		return c.cache.len()
	}
	return len(c.view.Load().users)
}

func (c *Consul) addr() string {
	if c.cfg.Address != "" {
		return c.cfg.Address
	}
	return api.DefaultConfig().Address
}

func (c *Consul) closeIdle() {
	if c.ownHTTP != nil {
		c.ownHTTP.CloseIdleConnections()
	}
}

// Close stops the watches and waits for them. Route still answers
// afterwards, from a view that no longer changes.
func (c *Consul) Close() error {
	c.closeOnce.Do(func() {
		c.cancel()
		c.wg.Wait()
		if c.snapDirty.Load() {
			c.writeSnapshot()
		}
		c.metrics.unregister(c.cfg.Registerer)
		c.closeIdle()
	})
	return nil
}

// String describes c for logs.
func (c *Consul) String() string {
	return fmt.Sprintf("consul(service %q, prefix %q)", c.cfg.Service, c.cfg.Prefix)
}

func (c *Consul) userPath(user string) string { return c.cfg.Prefix + "/users/" + user }

// Route proposes user's backend; it never writes to Consul (Commit does,
// once the backend accepted the login). A user with an entry in KV goes
// to that backend, from memory, unless it has been gone for longer than
// the grace (then an unpinned user is re-placed by hashing, a pinned one
// gets ErrNoBackend). A user without an entry is placed by hashing over
// their pool. The answer depends only on the shared view (KV, catalog,
// drains, domains), so every instance with the same view agrees.
func (c *Consul) Route(ctx context.Context, user string) (*routing.Backend, error) {
	key := routing.NormalizeUser(user)
	if key == "" {
		return nil, fmt.Errorf("%w: empty user name", routing.ErrNoBackend)
	}
	if c.holdN.Load() > 0 {
		if err := c.waitHold(ctx, key); err != nil {
			return nil, err
		}
	}
	v := c.view.Load()
	a, ok := c.lookup(v, key)
	if c.cache != nil && !ok {
		// First time this instance sees the user (or forgot them): one
		// consistent read of their key. If it fails (Consul unreachable)
		// the user is refused, not guessed: they may be live on another
		// instance on a backend the hash does not pick, and nothing here
		// could tell when to evict a guess.
		var err error
		if a, ok, err = c.fetchUser(ctx, key); err != nil {
			c.metrics.placements.WithLabelValues("nobackend").Inc()
			c.log.Debug("cannot read user entry; refusing the login", zap.String("user", key), zap.Error(err))
			return nil, fmt.Errorf("%w: cannot look the user up in consul: %w", routing.ErrNoBackend, err)
		}
	}
	b, _, err := c.decide(v, key, a, ok)
	if err != nil {
		c.metrics.placements.WithLabelValues("nobackend").Inc()
	}
	return b, err
}

// answer is Route's decision for a normalised user in view v, with the
// user's entry (ok false: none).
func (c *Consul) answer(v *consulView, user string) (*routing.Backend, assignment, error) {
	a, ok := c.lookup(v, user)
	return c.decide(v, user, a, ok)
}

// decide is answer for user's entry a (ok false: none).
func (c *Consul) decide(v *consulView, user string, a assignment, ok bool) (*routing.Backend, assignment, error) {
	if ok {
		if b := v.routable[a.backend]; b != nil {
			return b, a, nil
		}
		if a.pinned() {
			return nil, a, fmt.Errorf("%w: user is pinned to unavailable backend %q", routing.ErrNoBackend, a.backend)
		}
	}
	if b := v.poolFor(user).Pick(user); b != nil {
		return b, a, nil
	}
	return nil, a, fmt.Errorf("%w: no passing backend to place the user on", routing.ErrNoBackend)
}

// waitHold waits until a move hold on user ends, or ctx does.
func (c *Consul) waitHold(ctx context.Context, user string) error {
	h, ok := c.holds.Load(user)
	if !ok {
		return nil
	}
	d := time.Until(h.(time.Time))
	if d <= 0 {
		return nil
	}
	if !sleepCtx(ctx, d) {
		return fmt.Errorf("%w: user is moving: %w", routing.ErrNoBackend, context.Cause(ctx))
	}
	return nil
}

// lookup finds user's assignment in the view or in this instance's newer
// placements.
func (c *Consul) lookup(v *consulView, user string) (assignment, bool) {
	if c.cache != nil {
		return c.cache.get(user)
	}
	a, ok := v.users[user]
	if c.overlayN.Load() > 0 {
		if o, found := c.overlay.Load(user); found {
			if e := o.(*overlayEntry); a.index < e.minIdx {
				return assignment{backend: e.backend, index: e.minIdx}, true
			}
		}
	}
	return a, ok
}

type casResult uint8

const (
	casWon casResult = iota
	casLost
	casWriteFailed
	casReadFailed
)

// cas writes user → id if the entry's ModifyIndex is still over (0: if it
// does not exist), and returns the entry's new ModifyIndex. Replacing an
// entry (over > 0) appends the user to the change feed in the same
// transaction; a first placement does not (feed.go says why). On a lost
// race it returns the current entry (a zero KVPair if it was deleted
// meanwhile).
func (c *Consul) cas(ctx context.Context, user, id string, over uint64) (casResult, uint64, *api.KVPair, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.PlaceTimeout)
	defer cancel()
	path := c.userPath(user)
	var idx uint64
	var err error
	if over == 0 {
		var ok bool
		var resp *api.TxnResponse
		ops := api.TxnOps{{KV: &api.KVTxnOp{Verb: api.KVCAS, Key: path, Value: []byte(id), Index: 0}}}
		ok, resp, _, err = c.client.Txn().Txn(ops, (&api.QueryOptions{}).WithContext(ctx))
		switch {
		case err != nil:
			return casWriteFailed, 0, nil, err
		case ok && len(resp.Results) == 1 && resp.Results[0].KV != nil:
			return casWon, resp.Results[0].KV.ModifyIndex, nil, nil
		}
	} else {
		idx, err = c.writeWithFeedIndex(ctx, userWrite{user: user, backend: id, cas: true, index: over})
		switch {
		case err == nil:
			return casWon, idx, nil, nil
		case !errors.Is(err, errUserCAS):
			return casWriteFailed, 0, nil, err
		}
	}
	// A default (leader) read, not a stale one: it must see the winner.
	gen := c.feedGen[shardOf(user)].Load()
	p, _, err := c.client.KV().Get(path, (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return casReadFailed, 0, nil, err
	}
	if p == nil {
		p = &api.KVPair{}
	} else if c.cache != nil && c.feedGen[shardOf(user)].Load() == gen {
		// The feed does not announce first placements: learn the winner
		// here (unless the feed announced a change meanwhile: then the
		// next lookup reads again).
		if val := strings.TrimSpace(string(p.Value)); val != "" {
			c.cache.put(user, assignment{backend: val, flags: p.Flags, index: p.ModifyIndex})
			c.viewChanged() // an unrecorded route may diverge now
		}
	}
	return casLost, 0, p, nil
}

// writeWithFeedIndex writes one user's change with the feed and returns
// its new ModifyIndex (without touching the cache: the caller remembers).
func (c *Consul) writeWithFeedIndex(ctx context.Context, w userWrite) (uint64, error) {
	idx, err := c.writeWithFeed(ctx, shardOf(w.user), []userWrite{w}, nil)
	if err != nil {
		return 0, err
	}
	return idx[w.user], nil
}

// remember keeps this instance's own placement (entry index idx) until
// the watch brings it back (WatchFull), or in the cache (WatchFeed).
func (c *Consul) remember(user, id string, idx uint64) {
	if c.cache != nil {
		c.cache.put(user, assignment{backend: id, index: idx})
		c.snapshotChanged()
		return
	}
	if _, loaded := c.overlay.Swap(user, &overlayEntry{backend: id, minIdx: idx, at: time.Now()}); !loaded {
		c.overlayN.Add(1)
	}
}

// Pin makes backendID the home of user, as an operator's pin: the entry
// is written unconditionally with FlagPinned, and every imapgate instance
// closes the user's sessions elsewhere once its watch sees the change
// (normally within a second). backendID must be a service ID the router
// knows.
func (c *Consul) Pin(ctx context.Context, user, backendID string) error {
	key := routing.NormalizeUser(user)
	if key == "" {
		return errors.New("routing: pin: empty user name")
	}
	c.mu.Lock()
	_, known := c.states[backendID]
	c.mu.Unlock()
	if !known {
		return fmt.Errorf("%w %q (pinning %q)", routing.ErrUnknownBackend, backendID, key)
	}
	if _, err := c.writeUser(ctx, userWrite{user: key, backend: backendID, flags: FlagPinned}); err != nil {
		return fmt.Errorf("routing: pin %q to %q: %w", key, backendID, err)
	}
	c.log.Info("user pinned", zap.String("user", key), zap.String("backend", backendID))
	return nil
}

// Unpin clears the pin flag of user's entry but leaves the user where
// they are, so nobody is kicked; from then on imapgate may re-place the
// user if their backend goes away. Unpinning a user without a pin is not
// an error.
func (c *Consul) Unpin(ctx context.Context, user string) error {
	key := routing.NormalizeUser(user)
	if key == "" {
		return errors.New("routing: unpin: empty user name")
	}
	kv := c.client.KV()
	for range 5 {
		p, _, err := kv.Get(c.userPath(key), (&api.QueryOptions{}).WithContext(ctx))
		if err != nil {
			return fmt.Errorf("routing: unpin %q: %w", key, err)
		}
		if p == nil || p.Flags&FlagPinned == 0 {
			return nil
		}
		_, err = c.writeUser(ctx, userWrite{user: key, backend: string(p.Value), flags: p.Flags &^ FlagPinned, cas: true, index: p.ModifyIndex})
		switch {
		case err == nil:
			c.log.Info("user unpinned", zap.String("user", key), zap.String("backend", string(p.Value)))
			return nil
		case !errors.Is(err, errUserCAS):
			return fmt.Errorf("routing: unpin %q: %w", key, err)
		}
	}
	return fmt.Errorf("routing: unpin %q: entry keeps changing", key)
}

// BackendState is a backend as the Consul router sees it, for the admin
// API.
type BackendState struct {
	*routing.Backend
	// Health is Consul's aggregated check status: "passing", "warning",
	// "critical", "maintenance", or "absent" once it left the catalog.
	Health string
	// Drain is true if the backend takes no new users (MetaDrain or
	// <prefix>/drain/<id>).
	Drain bool
	// Placeable is true if new users may be placed there: passing, not
	// draining, not gone.
	Placeable bool
	// DownSince is when it stopped passing or warning; zero if up.
	DownSince time.Time
	// Gone is true once it has been down for longer than the grace: its
	// sessions were closed and its unpinned users are being re-placed.
	Gone bool
	// Tags are the service instance's tags.
	Tags []string
	// Users is how many users the view assigns to it.
	Users int
}

// States returns a snapshot of every backend the router knows, sorted
// by ID. It counts users, so it costs a pass over the view: it is meant
// for the admin API, not for the login path.
func (c *Consul) States() []BackendState {
	users := map[string]int{}
	if c.cache != nil {
		c.cache.each(func(_ string, a assignment) { users[a.backend]++ })
	} else {
		for _, a := range c.view.Load().users {
			users[a.backend]++
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]BackendState, 0, len(c.states))
	for id, s := range c.states {
		drain := s.metaDrain || c.kvDrain[id]
		out = append(out, BackendState{
			Backend:   s.b,
			Health:    s.health,
			Drain:     drain,
			Placeable: s.placeable(drain),
			DownSince: s.downSince,
			Gone:      s.gone,
			Tags:      slices.Clone(s.tags),
			Users:     users[id],
		})
	}
	slices.SortFunc(out, func(a, b BackendState) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// Ready reports whether the router has a view with at least one backend
// it can route to. It stays true while Consul is unreachable.
func (c *Consul) Ready() bool {
	v := c.view.Load()
	return v != nil && len(v.routable) > 0
}

// ViewAge is how long the view may have been out of date: zero while both
// watches are connected to Consul (which pushes every change), else the
// time since the failing watch last heard from Consul.
func (c *Consul) ViewAge() time.Duration {
	age := c.catalogHealth.age()
	for i := range c.kvHealth {
		age = max(age, c.kvHealth[i].age())
	}
	for i := range c.feedHealth {
		age = max(age, c.feedHealth[i].age())
	}
	return age
}
