package tls

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// Session ticket keys shared by a fleet.
//
// A client that reconnects (Thunderbird, Apple Mail and K-9 all do, often)
// resumes its TLS session with the ticket the server gave it, which skips
// the certificate and its signature. Behind a load balancer the next
// connection often lands on another instance, which can only resume it if
// it holds the key the ticket was sealed with. TicketKeys keeps the keys
// in a store every instance reads (Consul KV, or a file on a shared or
// local disk) and rotates them:
//
//   - every key is created with an activation time Lead in the future, so
//     every instance has read it before any instance seals a ticket with
//     it;
//   - the newest active key seals new tickets, every stored key (older
//     ones and the next one) opens them;
//   - a new key is added when the newest one became active Rotation ago,
//     and the oldest beyond Keep is dropped, so a ticket resumes for about
//     Rotation × (Keep − 1) and a leaked key exposes at most that window.
//
// Two instances rotating at once race on the store's compare-and-swap;
// the loser reads the winner's keys. If the store cannot be reached the
// keys in use are kept (tickets simply stop resuming once they expire
// from every instance's view); nothing fails a handshake.

// TicketKey is one session ticket key and when it starts sealing tickets.
type TicketKey struct {
	Key    [32]byte  `json:"key"`
	Active time.Time `json:"active"`
}

// TicketKeyStore is where a fleet keeps its ticket keys.
type TicketKeyStore interface {
	// Load returns the stored keys and a version for Store (zero when
	// nothing is stored yet).
	Load(ctx context.Context) (keys []TicketKey, version uint64, err error)
	// Store replaces the keys if the stored version is still version. It
	// reports false, without error, when another writer came first.
	Store(ctx context.Context, keys []TicketKey, version uint64) (bool, error)
}

// TicketKeysConfig configures TicketKeys. Zero values mean the defaults
// given.
type TicketKeysConfig struct {
	// Store is where the keys are kept. Required.
	Store TicketKeyStore
	// Rotation is how long a key seals new tickets. Zero means 6 h.
	Rotation time.Duration
	// Keep is how many keys are kept (and open tickets). Zero means 4.
	Keep int
	// Refresh is how often the store is read. Zero means 1 min.
	Refresh time.Duration
	// Lead is how long a new key waits before it seals tickets: more than
	// Refresh, so that every instance knows it first. Zero means
	// 2 × Refresh.
	Lead time.Duration
	// Apply receives the keys to use, the sealing one first (the argument
	// of crypto/tls.Config.SetSessionTicketKeys). Required.
	Apply func(keys [][32]byte)

	now func() time.Time // tests
}

func (c *TicketKeysConfig) defaults() {
	if c.Rotation <= 0 {
		c.Rotation = 6 * time.Hour
	}
	if c.Keep <= 0 {
		c.Keep = 4
	}
	if c.Refresh <= 0 {
		c.Refresh = time.Minute
	}
	if c.Lead <= 0 {
		c.Lead = 2 * c.Refresh
	}
	if c.now == nil {
		c.now = time.Now
	}
}

// TicketKeys keeps a TLS configuration's session ticket keys in step with
// the fleet's store. Close stops it.
type TicketKeys struct {
	cfg  TicketKeysConfig
	log  *zap.Logger
	stop chan struct{}
	done chan struct{}
	once sync.Once
}

// StartTicketKeys reads (and, if due, rotates) the keys once, applies
// them, and keeps doing so every Refresh until Close. A store that cannot
// be read at start is an error; later failures are logged and the keys in
// use are kept. log may be nil.
func StartTicketKeys(ctx context.Context, cfg TicketKeysConfig, log *zap.Logger) (*TicketKeys, error) {
	if cfg.Store == nil || cfg.Apply == nil {
		return nil, errors.New("tls: ticket keys need a store and an Apply function")
	}
	cfg.defaults()
	if log == nil {
		log = zap.NewNop()
	}
	t := &TicketKeys{cfg: cfg, log: log, stop: make(chan struct{}), done: make(chan struct{})}
	if err := t.sync(ctx); err != nil {
		return nil, fmt.Errorf("tls: session ticket keys: %w", err)
	}
	go t.refreshLoop()
	return t, nil
}

// Close stops the refreshes. The keys applied last stay in use.
func (t *TicketKeys) Close() error {
	t.once.Do(func() { close(t.stop) })
	<-t.done
	return nil
}

func (t *TicketKeys) refreshLoop() {
	defer close(t.done)
	tick := time.NewTicker(t.cfg.Refresh)
	defer tick.Stop()
	for {
		select {
		case <-t.stop:
			return
		case <-tick.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if err := t.sync(ctx); err != nil {
			t.log.Warn("tls: session ticket keys not refreshed; keeping the ones in use", zap.Error(err))
		}
		cancel()
	}
}

// sync reads the store, rotates if due (retrying a lost race), applies.
func (t *TicketKeys) sync(ctx context.Context) error {
	for range 5 {
		keys, version, err := t.cfg.Store.Load(ctx)
		if err != nil {
			return err
		}
		next, changed, err := rotate(keys, t.cfg.now(), t.cfg.Rotation, t.cfg.Lead, t.cfg.Keep)
		if err != nil {
			return err
		}
		if changed {
			ok, err := t.cfg.Store.Store(ctx, next, version)
			if err != nil {
				return err
			}
			if !ok {
				continue // another instance rotated: read its keys
			}
			t.log.Info("tls: new session ticket key", zap.Time("active", next[len(next)-1].Active), zap.Int("keys", len(next)))
		}
		t.cfg.Apply(forTLS(next, t.cfg.now()))
		return nil
	}
	return errors.New("store keeps changing under us")
}

// rotate returns keys (oldest first) with a new key appended when the
// newest one has been active for rotation (or there is none), trimmed to
// keep. A first key is active at once: there is no ticket to honour yet,
// and every instance starting together reads the winner's.
func rotate(keys []TicketKey, now time.Time, rotation, lead time.Duration, keep int) ([]TicketKey, bool, error) {
	if n := len(keys); n > 0 && now.Sub(keys[n-1].Active) < rotation {
		return keys, false, nil
	}
	k := TicketKey{Active: now.Add(lead)}
	if len(keys) == 0 {
		k.Active = now
	}
	if _, err := rand.Read(k.Key[:]); err != nil {
		return nil, false, err
	}
	out := append(append([]TicketKey(nil), keys...), k)
	if len(out) > keep {
		out = out[len(out)-keep:]
	}
	return out, true, nil
}

// forTLS orders keys for SetSessionTicketKeys: the newest active key
// seals, all of them open.
func forTLS(keys []TicketKey, now time.Time) [][32]byte {
	seal := -1
	for i, k := range keys {
		if !k.Active.After(now) {
			seal = i
		}
	}
	if seal < 0 {
		seal = 0 // only future keys (a clock behind the others): still one to seal with
	}
	out := [][32]byte{keys[seal].Key}
	for i := len(keys) - 1; i >= 0; i-- {
		if i != seal {
			out = append(out, keys[i].Key)
		}
	}
	return out
}

// storedKeys is the stored form of the keys, in either store.
type storedKeys struct {
	Version uint64      `json:"version"` // the file store's own counter
	Keys    []TicketKey `json:"keys"`
}

// ConsulTicketStore keeps the keys in one Consul KV entry (JSON), written
// with check-and-set on its ModifyIndex. Anyone who can read the entry can
// decrypt resumed sessions: give it an ACL only the fleet has.
type ConsulTicketStore struct {
	KV  *api.KV
	Key string // e.g. "imapgate/tls/session-ticket-keys"
}

// DefaultConsulTicketKey is the KV key ConsulTicketStore uses when the
// configuration names none.
const DefaultConsulTicketKey = "imapgate/tls/session-ticket-keys"

var _ TicketKeyStore = (*ConsulTicketStore)(nil)

func (s *ConsulTicketStore) Load(ctx context.Context) ([]TicketKey, uint64, error) {
	p, _, err := s.KV.Get(s.Key, (&api.QueryOptions{RequireConsistent: true}).WithContext(ctx))
	if err != nil || p == nil {
		return nil, 0, err
	}
	var sk storedKeys
	if err := json.Unmarshal(p.Value, &sk); err != nil {
		return nil, 0, fmt.Errorf("consul %s: %w", s.Key, err)
	}
	return sk.Keys, p.ModifyIndex, nil
}

func (s *ConsulTicketStore) Store(ctx context.Context, keys []TicketKey, version uint64) (bool, error) {
	b, err := json.Marshal(storedKeys{Keys: keys})
	if err != nil {
		return false, err
	}
	ok, _, err := s.KV.CAS(&api.KVPair{Key: s.Key, Value: b, ModifyIndex: version}, (&api.WriteOptions{}).WithContext(ctx))
	return ok, err
}

// FileTicketStore keeps the keys in a JSON file (mode 0600), for one host
// or a shared file system with working flock(2). Writes take an exclusive
// lock on Path + ".lock" and replace the file by rename.
type FileTicketStore struct {
	Path string
}

var _ TicketKeyStore = (*FileTicketStore)(nil)

func (s *FileTicketStore) Load(context.Context) ([]TicketKey, uint64, error) {
	b, err := os.ReadFile(s.Path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, 0, nil
	}
	if err != nil {
		return nil, 0, err
	}
	var sk storedKeys
	if err := json.Unmarshal(b, &sk); err != nil {
		return nil, 0, fmt.Errorf("%s: %w", s.Path, err)
	}
	return sk.Keys, sk.Version, nil
}

func (s *FileTicketStore) Store(ctx context.Context, keys []TicketKey, version uint64) (bool, error) {
	lf, err := os.OpenFile(s.Path+".lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return false, err
	}
	defer lf.Close()
	if err := unix.Flock(int(lf.Fd()), unix.LOCK_EX); err != nil {
		return false, err
	}
	defer unix.Flock(int(lf.Fd()), unix.LOCK_UN)
	if _, cur, err := s.Load(ctx); err != nil || cur != version {
		return false, err
	}
	b, err := json.Marshal(storedKeys{Version: version + 1, Keys: keys})
	if err != nil {
		return false, err
	}
	tmp, err := os.CreateTemp(filepath.Dir(s.Path), ".ticket-keys-*")
	if err != nil {
		return false, err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return false, err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return false, err
	}
	if err := tmp.Close(); err != nil {
		return false, err
	}
	return true, os.Rename(tmp.Name(), s.Path)
}
