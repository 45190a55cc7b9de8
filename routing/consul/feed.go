package consul

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

// The change feed: how an instance learns that a placement changed
// without listing every user.
//
// Every write imapgate makes that changes or deletes an existing
// placement (Pin, Unpin, Move, Forget, Announce, a re-placement after
// the old backend is gone) also appends the user's name to one of
// feedShards change-log keys, <prefix>/changes/<00..0f>, in the SAME
// Consul transaction, with check-and-set on the shard key (and on the
// user's key where the write is conditional). A shard's value is a
// bounded ring: the sequence number of its last entry and the last
// feedRing user names. With UsersWatch = WatchFeed every instance holds
// one blocking query per shard key; a change wakes only that shard's
// queries and costs each instance a read of one small value plus, if the
// user is in its cache, a read of the user's key: O(instances), not
// O(users). First placements (check-and-set over no entry) are not
// appended: no instance can hold an entry for a user that has none (there
// is no negative caching), and a racing instance's check-and-set fails
// and reads the winner.
//
// An instance that missed more than the ring holds (it rolled past the
// last sequence number seen, or the key went backwards: a restored
// cluster) resyncs: it drops the cached users without a live session and
// re-reads the others, 64 to a transaction.

const (
	// feedShards is the number of change-log keys. It is part of the data
	// model: every instance must agree on it.
	feedShards = 16
	// feedRing is how many entries a shard keeps: an instance may fall
	// this many changes of one shard behind before it must resync.
	feedRing = 256
	// feedVersion is the shard value's format.
	feedVersion = 1
	// txnMaxOps is Consul's limit of operations per transaction.
	txnMaxOps = 64
	// feedWriteTries bounds the retries of a write whose shard key
	// changed under it (another instance appended first).
	feedWriteTries = 20
)

// UsersWatch says how the router learns that a user's placement changed.
type UsersWatch uint8

const (
	// WatchFull, the zero value, holds a blocking listing of every user
	// entry (<prefix>/users/) and keeps them all in memory: any change
	// under users/, an operator's `consul kv put` included, reaches every
	// instance, but every change makes every instance list and decode the
	// whole prefix. For up to about 100,000 users.
	WatchFull UsersWatch = iota
	// WatchFeed reads a user's entry at their first login on the instance,
	// keeps a bounded cache (CacheSize) of the users seen, and learns of
	// changes from the change feed (<prefix>/changes/), whose cost does
	// not depend on the number of users. Placements changed by hand
	// (`consul kv put`) must be announced (Announce, `imapgate ctl
	// announce`). See the README.
	WatchFeed
)

// String returns the config file's name of w.
func (w UsersWatch) String() string {
	switch w {
	case WatchFull:
		return "full"
	case WatchFeed:
		return "feed"
	}
	return fmt.Sprintf("UsersWatch(%d)", uint8(w))
}

// ParseUsersWatch parses consul.users_watch: "" or "full", or "feed".
func ParseUsersWatch(s string) (UsersWatch, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "full":
		return WatchFull, nil
	case "feed":
		return WatchFeed, nil
	}
	return 0, fmt.Errorf("unknown users watch %q (want \"full\" or \"feed\")", s)
}

// feedValue is a shard key's JSON value.
type feedValue struct {
	Version int `json:"v"`
	// Seq is the sequence number of the last entry of Users.
	Seq uint64 `json:"seq"`
	// Users are the last changed users, oldest first: Users[i] has
	// sequence number Seq-len(Users)+1+i.
	Users []string `json:"users"`
}

func shardOf(user string) int {
	h := fnv.New32a()
	h.Write([]byte(user))
	return int(h.Sum32() % feedShards)
}

func (c *Consul) feedKey(shard int) string {
	return fmt.Sprintf("%s/changes/%02x", c.cfg.Prefix, shard)
}

func decodeFeed(b []byte) (feedValue, error) {
	var v feedValue
	if len(b) == 0 {
		return v, nil
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return v, err
	}
	if v.Version != feedVersion || uint64(len(v.Users)) > v.Seq {
		return v, fmt.Errorf("change feed version %d, %d users at seq %d", v.Version, len(v.Users), v.Seq)
	}
	return v, nil
}

// userWrite is one placement change written with the feed.
type userWrite struct {
	user    string
	backend string // "" with del
	flags   uint64
	del     bool
	// cas: check-and-set over index (0: the entry must not exist); else
	// unconditional.
	cas   bool
	index uint64
}

// errUserCAS is writeWithFeed's answer when a user's check-and-set
// failed (another instance changed the entry first).
var errUserCAS = errors.New("user entry changed meanwhile")

// writeWithFeed writes the placement changes ws (all in one shard, at most
// txnMaxOps-1) together with their entries in that shard's change log, in
// one transaction. It returns each written user's new ModifyIndex (for a
// delete: the transaction's index), or errUserCAS if a user's
// check-and-set failed. Announce-only writes (announce) append to the log
// without touching users/.
func (c *Consul) writeWithFeed(ctx context.Context, shard int, ws []userWrite, announce []string) (map[string]uint64, error) {
	key := c.feedKey(shard)
	kv, txn := c.client.KV(), c.client.Txn()
	for range feedWriteTries {
		cur, _, err := kv.Get(key, (&api.QueryOptions{}).WithContext(ctx))
		if err != nil {
			return nil, err
		}
		var fv feedValue
		var idx uint64
		if cur != nil {
			idx = cur.ModifyIndex
			if fv, err = decodeFeed(cur.Value); err != nil {
				c.log.Warn("change feed key unreadable; starting it over (instances will resync)", zap.String("key", key), zap.Error(err))
				fv = feedValue{Seq: fv.Seq + 1} // a jump: readers resync
				fv.Users = nil
			}
		}
		fv.Version = feedVersion
		var ops api.TxnOps
		for _, w := range ws {
			op := &api.KVTxnOp{Key: c.userPath(w.user)}
			switch {
			case w.del && w.cas:
				op.Verb, op.Index = api.KVDeleteCAS, w.index
			case w.del:
				op.Verb = api.KVDelete
			case w.cas:
				op.Verb, op.Index, op.Value, op.Flags = api.KVCAS, w.index, []byte(w.backend), w.flags
			default:
				op.Verb, op.Value, op.Flags = api.KVSet, []byte(w.backend), w.flags
			}
			ops = append(ops, &api.TxnOp{KV: op})
			fv.Users = append(fv.Users, w.user)
			fv.Seq++
		}
		for _, u := range announce {
			fv.Users = append(fv.Users, u)
			fv.Seq++
		}
		if len(fv.Users) > feedRing {
			fv.Users = slices.Clone(fv.Users[len(fv.Users)-feedRing:])
		}
		val, _ := json.Marshal(&fv)
		ops = append(ops, &api.TxnOp{KV: &api.KVTxnOp{Verb: api.KVCAS, Key: key, Index: idx, Value: val}})
		ok, resp, _, err := txn.Txn(ops, (&api.QueryOptions{}).WithContext(ctx))
		if err != nil {
			return nil, err
		}
		if ok {
			// The feed key's new ModifyIndex is the transaction's index:
			// a delete's tombstone takes it.
			var txnIndex uint64
			if n := len(resp.Results); n > 0 && resp.Results[n-1].KV != nil {
				txnIndex = resp.Results[n-1].KV.ModifyIndex
			}
			out := make(map[string]uint64, len(ws))
			for i, w := range ws {
				if !w.del && i < len(resp.Results) && resp.Results[i].KV != nil {
					out[w.user] = resp.Results[i].KV.ModifyIndex
				} else {
					out[w.user] = txnIndex
				}
			}
			return out, nil
		}
		feedLost := false
		for _, e := range resp.Errors {
			if e.OpIndex == len(ops)-1 {
				feedLost = true
			} else {
				return nil, fmt.Errorf("%w: %s", errUserCAS, e.What)
			}
		}
		if !feedLost {
			return nil, errors.New("consul transaction refused without a reason")
		}
		// Another write appended to the shard first: read it again.
		if !sleepCtx(ctx, time.Duration(1+len(ops))*time.Millisecond) {
			return nil, ctx.Err()
		}
	}
	return nil, fmt.Errorf("change feed %s: too busy to append", key)
}

// writeUser is writeWithFeed for one user, and puts the result in the
// cache (so that this instance's answer changes at once).
func (c *Consul) writeUser(ctx context.Context, w userWrite) (uint64, error) {
	idx, err := c.writeWithFeed(ctx, shardOf(w.user), []userWrite{w}, nil)
	if err != nil {
		return 0, err
	}
	if c.cache != nil {
		// This instance's own change: its sessions move now, as the
		// others' do when the feed tells them.
		ev := c.cacheChange(nil, w.user, assignment{backend: w.backend, flags: w.flags, index: idx[w.user]}, !w.del, idx[w.user])
		c.evictUsers(ev)
		c.viewChanged()
	}
	return idx[w.user], nil
}

// Announce tells every instance that the placements of users changed
// outside imapgate (an operator's `consul kv put` or `consul kv delete`),
// so that instances on the change feed re-read them and evict their
// sessions elsewhere. It writes only the change feed.
func (c *Consul) Announce(ctx context.Context, users ...string) error {
	byShard := map[int][]string{}
	for _, u := range users {
		if k := routing.NormalizeUser(u); k != "" {
			byShard[shardOf(k)] = append(byShard[shardOf(k)], k)
		}
	}
	for shard, us := range byShard {
		for len(us) > 0 {
			n := min(len(us), feedRing)
			if _, err := c.writeWithFeed(ctx, shard, nil, us[:n]); err != nil {
				return fmt.Errorf("routing: consul: announcing changed users: %w", err)
			}
			us = us[n:]
		}
	}
	if c.cache != nil {
		// This instance reads them now too (if that fails, its feed
		// query does it again).
		if err := c.refreshUsers(ctx, users); err != nil {
			c.log.Debug("re-reading announced users failed; the change feed retries", zap.Error(err))
		}
	}
	return nil
}

// Forget deletes user's placement (what `consul kv delete` of their key
// does, announced on the change feed): their next login places them
// afresh, and their sessions are closed wherever that placement would
// not land.
func (c *Consul) Forget(ctx context.Context, user string) error {
	key := routing.NormalizeUser(user)
	if key == "" {
		return errors.New("routing: forget: empty user name")
	}
	if _, err := c.writeUser(ctx, userWrite{user: key, del: true}); err != nil {
		return fmt.Errorf("routing: forget %q: %w", key, err)
	}
	return nil
}

// feedLoop follows one shard of the change feed until ctx ends.
func (c *Consul) feedLoop(ctx context.Context, shard int, index uint64, seq uint64, known bool) {
	defer c.wg.Done()
	h := &c.feedHealth[shard]
	backoff := retryMin
	key := c.feedKey(shard)
	for {
		qctx, cancel := context.WithTimeout(ctx, c.blockingTimeout())
		q := &api.QueryOptions{AllowStale: true, WaitIndex: index, WaitTime: c.cfg.WaitTime}
		p, meta, err := c.client.KV().Get(key, q.WithContext(qctx))
		cancel()
		if ctx.Err() != nil {
			return
		}
		c.noteResult("changes", h, err)
		if err != nil {
			if !sleepCtx(ctx, backoff) {
				return
			}
			backoff, index = min(2*backoff, c.cfg.RetryMax), 0
			continue
		}
		backoff = retryMin
		c.noteMeta("changes", h, meta)
		if index != 0 && meta.LastIndex == index {
			c.noteCaughtUp()
			continue
		}
		next := nextIndex(index, meta.LastIndex)
		var fv feedValue
		if p != nil {
			if fv, err = decodeFeed(p.Value); err != nil {
				c.log.Warn("change feed key unreadable; resyncing", zap.String("key", key), zap.Error(err))
				if err := c.resync(ctx, shard, "unreadable change feed"); err != nil {
					backoff, index = c.feedRetry(ctx, h, err, backoff)
					continue
				}
				seq, known, index = 0, false, next
				continue
			}
		}
		first := fv.Seq - uint64(len(fv.Users)) + 1
		if !known || fv.Seq != seq {
			// Reads of this shard's users running now may predate the
			// change: fetchUser reads again.
			c.feedGen[shard].Add(1)
		}
		switch {
		case !known:
			// Start-up: nothing before now concerns us, unless we hold
			// users from a snapshot.
			if c.feedResyncAtStart.Load() {
				err = c.resync(ctx, shard, "start from a snapshot")
			}
		case fv.Seq < seq:
			err = c.resync(ctx, shard, "change feed went backwards (restored cluster?)")
		case fv.Seq > seq && first > seq+1:
			c.metrics.feedGaps.Inc()
			err = c.resync(ctx, shard, "missed more changes than the feed keeps")
		case fv.Seq > seq:
			err = c.refreshUsers(ctx, fv.Users[len(fv.Users)-int(fv.Seq-seq):])
		}
		if err != nil {
			// Not applied: the same entries (or a resync) come again
			// with the next answer; until then the cache keeps the old
			// entries and Commit writes nothing.
			backoff, index = c.feedRetry(ctx, h, err, backoff)
			continue
		}
		seq, known, index = fv.Seq, true, next
		c.feedSeq[shard].Store(seq)
		c.noteCaughtUp()
	}
}

// feedRetry marks a shard failing after changes it could not apply,
// waits, and returns the next back-off and the index to query (0: answer
// at once).
func (c *Consul) feedRetry(ctx context.Context, h *watchHealth, err error, backoff time.Duration) (time.Duration, uint64) {
	c.noteResult("changes", h, err)
	sleepCtx(ctx, backoff)
	return min(2*backoff, c.cfg.RetryMax), 0
}

// feedFailing reports whether any shard's query is failing.
func (c *Consul) feedFailing() bool {
	for i := range c.feedHealth {
		if c.feedHealth[i].failing.Load() {
			return true
		}
	}
	return false
}

// usersFailing reports whether the router cannot currently hear about
// placement changes: Commit then writes nothing.
func (c *Consul) usersFailing() bool {
	if c.cache != nil {
		return c.feedFailing()
	}
	return c.kvHealth[kvUsers].failing.Load()
}

// resync re-reads the users of one feed shard this instance must keep
// right (live sessions, unrecorded routes) and drops the shard's other
// cached entries: whatever the shard's changes were, the cache is right
// again for that shard.
func (c *Consul) resync(ctx context.Context, shard int, why string) error {
	start := time.Now()
	live := c.liveUsers()
	keep := map[string]bool{}
	for u := range live {
		if shardOf(u) == shard {
			keep[u] = true
		}
	}
	dropped := c.cache.retainShard(shard, keep)
	users := make([]string, 0, len(keep))
	for u := range keep {
		users = append(users, u)
	}
	// refreshUsers reads only users it holds: make sure it holds these.
	for _, u := range users {
		if !c.cache.has(u) {
			c.cache.del(u, 0)
		}
	}
	if err := c.refreshUsers(ctx, users); err != nil {
		return err
	}
	c.metrics.feedResyncs.Inc()
	c.log.Info("change feed resync", zap.Int("shard", shard), zap.String("why", why), zap.Int("reread", len(users)),
		zap.Int("dropped", dropped), zap.Duration("took", time.Since(start)))
	return nil
}

// liveUsers are the users whose entries this instance must not forget:
// those with sessions here and those served unrecorded.
// An Evictor that cannot list its users (not a routing.UserLister) makes
// every cached user count as live.
func (c *Consul) liveUsers() map[string]bool {
	live := c.routedHere()
	if _, ok := c.cfg.Evictor.(routing.UserLister); !ok {
		c.cache.each(func(u string, _ assignment) { live[u] = true })
	}
	c.umu.Lock()
	for u := range c.unrec {
		live[u] = true
	}
	c.umu.Unlock()
	return live
}

// refreshUsers re-reads those of users that this instance caches or
// serves unrecorded, updates the cache and evicts the sessions that are
// now on the wrong backend. A failed read is returned (the users read
// before it are applied): the caller must try again, the entries not
// re-read stay as they were.
func (c *Consul) refreshUsers(ctx context.Context, users []string) error {
	var want []string
	seen := map[string]bool{}
	unrec := c.unrecordedRoutes()
	for _, u := range users {
		u = routing.NormalizeUser(u)
		if u == "" || seen[u] {
			continue
		}
		seen[u] = true
		if _, ok := unrec[u]; ok || c.cache.has(u) {
			want = append(want, u)
		}
	}
	if len(want) == 0 {
		return nil
	}
	var ev []kvEviction
	defer func() {
		c.evictUsers(ev)
		c.viewChanged() // reconcile the unrecorded routes against the news
	}()
	for len(want) > 0 {
		n := min(len(want), txnMaxOps)
		got, err := c.readUsers(ctx, want[:n])
		if err != nil {
			return fmt.Errorf("re-reading %d changed users: %w", len(want), err)
		}
		for _, u := range want[:n] {
			r := got[u]
			ev = c.cacheChange(ev, u, r.a, r.ok, r.index)
		}
		want = want[n:]
	}
	return nil
}

// cacheChange stores user's entry as just read or written (ok false: it
// has none, as of index) and appends to ev the eviction the change
// implies: a new backend closes the sessions elsewhere; a deleted entry
// closes them everywhere but where the next placement lands.
func (c *Consul) cacheChange(ev []kvEviction, user string, a assignment, ok bool, index uint64) []kvEviction {
	old, had, applied := c.cache.apply(user, a, ok, index)
	if !applied {
		return ev // the cache knows something newer
	}
	c.snapshotChanged()
	switch {
	case ok && (!had || old.backend != a.backend):
		ev = append(ev, kvEviction{user: user, keep: a.backend, moved: had})
	case !ok && had:
		if b := c.view.Load().poolFor(user).Pick(user); b == nil {
			ev = append(ev, kvEviction{user, "", true, true})
		} else {
			ev = append(ev, kvEviction{user, b.ID, b.ID != old.backend, true})
		}
	}
	return ev
}

// readUsers reads users' entries (at most txnMaxOps), consistently,
// readUsersParallel at a time. Consul 1.13's transactions have no
// "get-or-empty" (a get of a missing key fails the whole transaction), so
// these are single reads. A missing entry is !ok with the index Consul
// answered at: every later write has a higher one.
func (c *Consul) readUsers(ctx context.Context, users []string) (map[string]userRead, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.PlaceTimeout)
	defer cancel()
	type result struct {
		user string
		r    userRead
		err  error
	}
	results := make(chan result, len(users))
	sem := make(chan struct{}, readUsersParallel)
	for _, u := range users {
		sem <- struct{}{}
		go func() {
			defer func() { <-sem }()
			p, meta, err := c.client.KV().Get(c.userPath(u), consistentRead(ctx))
			res := result{user: u, err: err}
			if err == nil {
				res.r.index = meta.LastIndex
				if p != nil {
					if val := strings.TrimSpace(string(p.Value)); val != "" {
						res.r.a, res.r.ok = assignment{backend: val, flags: p.Flags, index: p.ModifyIndex}, true
					} else {
						res.r.index = max(res.r.index, p.ModifyIndex)
					}
				}
			}
			results <- res
		}()
	}
	out := make(map[string]userRead, len(users))
	var errs []error
	for range users {
		r := <-results
		if r.err != nil {
			errs = append(errs, r.err)
			continue
		}
		out[r.user] = r.r
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return out, nil
}

// consistentRead are the options of a read that must see every write
// acknowledged before it. Consul's default mode is not enough: a server
// that has just become leader (a restarted single server, a new leader
// after an election) answers from its state machine before it has
// applied the log it inherited, and a feed instance that resynced from
// such an answer (start from a snapshot, TestFeedSnapshotStart) kept a
// placement moved before the restart for good, since no change-feed entry
// comes for it again. A consistent read is refused until the leader is
// ready for it ("Not ready to serve consistent reads"), and then retried.
func consistentRead(ctx context.Context) *api.QueryOptions {
	return (&api.QueryOptions{RequireConsistent: true}).WithContext(ctx)
}

// userRead is one user's entry as read: a (ok), or none as of index.
type userRead struct {
	a     assignment
	ok    bool
	index uint64
}

// readUsersParallel bounds the reads one refresh runs at once.
const readUsersParallel = 8

// fetchUser reads one user's entry for Route's cache miss (consistent: it
// must see the last move) and caches it. ok is false if there is none.
//
// A read races the feed: if the user's shard announced a change while
// the read ran, the feed skipped the user (not cached yet) and the read
// may be older than the change; then it is read again (twice at most,
// then answered without caching: Commit's check-and-set settles it).
func (c *Consul) fetchUser(ctx context.Context, user string) (assignment, bool, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.PlaceTimeout)
	defer cancel()
	gen := &c.feedGen[shardOf(user)]
	for try := 0; ; try++ {
		g := gen.Load()
		p, _, err := c.client.KV().Get(c.userPath(user), consistentRead(ctx))
		if err != nil {
			return assignment{}, false, err
		}
		c.metrics.cacheMisses.Inc()
		val := ""
		if p != nil {
			val = strings.TrimSpace(string(p.Value))
		}
		if val == "" {
			return assignment{}, false, nil
		}
		a := assignment{backend: val, flags: p.Flags, index: p.ModifyIndex}
		if gen.Load() == g {
			c.cache.put(user, a)
			c.snapshotChanged()
			return a, true, nil
		}
		if try == 2 {
			return a, true, nil
		}
	}
}

// loadFeed reads each shard key once at start-up and returns the indexes
// and sequence numbers the feed loops start from.
func (c *Consul) loadFeed(ctx context.Context) (idx, seq [feedShards]uint64, err error) {
	for s := range feedShards {
		p, meta, err := c.client.KV().Get(c.feedKey(s), (&api.QueryOptions{}).WithContext(ctx))
		if err != nil {
			return idx, seq, err
		}
		idx[s] = nextIndex(0, meta.LastIndex)
		if p != nil {
			fv, err := decodeFeed(p.Value)
			if err == nil {
				seq[s] = fv.Seq
			}
		}
	}
	return idx, seq, nil
}
