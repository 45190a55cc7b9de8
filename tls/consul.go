package tls

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"
)

// ConsulStorage keeps CertMagic's certificates, keys, account data and
// challenge tokens in Consul KV, so every imapgate instance of a fleet
// serves the same certificates and any of them can answer a challenge
// another one started. Its locks are Consul sessions: for a given name only
// the instance holding the lock talks to the CA, and the others find the
// certificate in KV when they get the lock after it.
//
// Keys live under Prefix + "/" + the CertMagic key; a value's modification
// time travels in the KV pair's Flags (Consul keeps none of its own). Locks
// are the keys Prefix + "/locks/" + name, held by a session with a TTL that
// the holder renews: if an instance dies holding one, Consul releases it
// after the TTL and its lock-delay (15 s).
type ConsulStorage struct {
	kv      *api.KV
	session *api.Session
	prefix  string
	ttl     time.Duration
	log     *zap.Logger

	mu   sync.Mutex
	held map[string]*consulLock
}

var _ certmagic.Storage = (*ConsulStorage)(nil)

// consulLock is one lock this process holds.
type consulLock struct {
	key       string
	session   string
	stopRenew chan struct{}
}

// DefaultConsulPrefix is where ConsulStorage keeps its keys when no prefix
// is configured.
const DefaultConsulPrefix = "imapgate/acme"

// consulSessionTTL bounds how long a lock outlives a crashed holder. Consul
// accepts 10 s to 24 h; the holder renews at half of it.
const consulSessionTTL = 30 * time.Second

// NewConsulStorage returns a CertMagic storage on client's KV under prefix
// (if empty, DefaultConsulPrefix). log may be nil.
func NewConsulStorage(client *api.Client, prefix string, log *zap.Logger) *ConsulStorage {
	if log == nil {
		log = zap.NewNop()
	}
	prefix = strings.Trim(prefix, "/")
	if prefix == "" {
		prefix = DefaultConsulPrefix
	}
	return &ConsulStorage{
		kv:      client.KV(),
		session: client.Session(),
		prefix:  prefix,
		ttl:     consulSessionTTL,
		log:     log,
		held:    make(map[string]*consulLock),
	}
}

func (s *ConsulStorage) key(k string) string {
	k = strings.Trim(k, "/")
	if k == "" {
		return s.prefix
	}
	return s.prefix + "/" + k
}

// rel turns a full KV key back into a CertMagic key.
func (s *ConsulStorage) rel(full string) string {
	return strings.Trim(strings.TrimPrefix(full, s.prefix), "/")
}

func wopts(ctx context.Context) *api.WriteOptions { return (&api.WriteOptions{}).WithContext(ctx) }
func qopts(ctx context.Context) *api.QueryOptions { return (&api.QueryOptions{}).WithContext(ctx) }

// Store writes value at key.
func (s *ConsulStorage) Store(ctx context.Context, key string, value []byte) error {
	_, err := s.kv.Put(&api.KVPair{
		Key:   s.key(key),
		Value: value,
		Flags: uint64(time.Now().UnixNano()),
	}, wopts(ctx))
	if err != nil {
		return fmt.Errorf("consul storage: put %s: %w", key, err)
	}
	return nil
}

// Load reads key; a missing key is fs.ErrNotExist, as CertMagic expects.
func (s *ConsulStorage) Load(ctx context.Context, key string) ([]byte, error) {
	p, _, err := s.kv.Get(s.key(key), qopts(ctx))
	if err != nil {
		return nil, fmt.Errorf("consul storage: get %s: %w", key, err)
	}
	if p == nil {
		return nil, fmt.Errorf("consul storage: %s: %w", key, fs.ErrNotExist)
	}
	return p.Value, nil
}

// Delete removes key and, like a directory, everything under it.
func (s *ConsulStorage) Delete(ctx context.Context, key string) error {
	if _, err := s.kv.Delete(s.key(key), wopts(ctx)); err != nil {
		return fmt.Errorf("consul storage: delete %s: %w", key, err)
	}
	if _, err := s.kv.DeleteTree(s.key(key)+"/", wopts(ctx)); err != nil {
		return fmt.Errorf("consul storage: delete %s/: %w", key, err)
	}
	return nil
}

// Exists reports whether key is a value or has keys under it.
func (s *ConsulStorage) Exists(ctx context.Context, key string) bool {
	_, err := s.Stat(ctx, key)
	return err == nil
}

// List returns the keys under path: its direct children, or with recursive
// every key below it. A path with nothing under it is fs.ErrNotExist.
func (s *ConsulStorage) List(ctx context.Context, path string, recursive bool) ([]string, error) {
	sep := "/"
	if recursive {
		sep = ""
	}
	keys, _, err := s.kv.Keys(s.key(path)+"/", sep, qopts(ctx))
	if err != nil {
		return nil, fmt.Errorf("consul storage: list %s: %w", path, err)
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("consul storage: %s: %w", path, fs.ErrNotExist)
	}
	out := make([]string, 0, len(keys))
	for _, k := range keys {
		out = append(out, s.rel(k))
	}
	return out, nil
}

// Stat describes key: a value (terminal) or a prefix of other keys.
func (s *ConsulStorage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	p, _, err := s.kv.Get(s.key(key), qopts(ctx))
	if err != nil {
		return certmagic.KeyInfo{}, fmt.Errorf("consul storage: get %s: %w", key, err)
	}
	if p != nil {
		return certmagic.KeyInfo{
			Key:        key,
			Modified:   time.Unix(0, int64(p.Flags)),
			Size:       int64(len(p.Value)),
			IsTerminal: true,
		}, nil
	}
	keys, _, err := s.kv.Keys(s.key(key)+"/", "/", qopts(ctx))
	if err != nil {
		return certmagic.KeyInfo{}, fmt.Errorf("consul storage: list %s: %w", key, err)
	}
	if len(keys) == 0 {
		return certmagic.KeyInfo{}, fmt.Errorf("consul storage: %s: %w", key, fs.ErrNotExist)
	}
	return certmagic.KeyInfo{Key: key, IsTerminal: false}, nil
}

// Lock blocks until this process holds the lock name, or ctx ends.
func (s *ConsulStorage) Lock(ctx context.Context, name string) error {
	lockKey := s.key("locks/" + name)
	host, _ := os.Hostname()
	sid, _, err := s.session.Create(&api.SessionEntry{
		Name:     "imapgate acme lock " + name,
		TTL:      s.ttl.String(),
		Behavior: api.SessionBehaviorRelease,
	}, wopts(ctx))
	if err != nil {
		return fmt.Errorf("consul storage: lock %s: creating session: %w", name, err)
	}
	l := &consulLock{key: lockKey, session: sid, stopRenew: make(chan struct{})}
	// RenewPeriodic destroys the session when stopRenew closes.
	go s.renewSession(sid, l.stopRenew)

	if err := s.acquire(ctx, lockKey, sid, host); err != nil {
		close(l.stopRenew)
		return fmt.Errorf("consul storage: lock %s: %w", name, err)
	}
	s.mu.Lock()
	s.held[name] = l
	s.mu.Unlock()
	return nil
}

// renewSession keeps a lock's session alive until stop closes, then
// destroys it.
func (s *ConsulStorage) renewSession(sid string, stop chan struct{}) {
	if err := s.session.RenewPeriodic(s.ttl.String(), sid, nil, stop); err != nil {
		s.log.Warn("consul storage: lock session lost", zap.String("session", sid), zap.Error(err))
	}
}

// acquire loops until the key is ours: try, and if someone else holds it,
// wait (a blocking query) until the key changes.
func (s *ConsulStorage) acquire(ctx context.Context, lockKey, sid, holder string) error {
	for {
		ok, _, err := s.kv.Acquire(&api.KVPair{Key: lockKey, Value: []byte(holder), Session: sid}, wopts(ctx))
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		p, meta, err := s.kv.Get(lockKey, qopts(ctx))
		if err != nil {
			return err
		}
		if p == nil || p.Session == "" {
			// Free but not acquirable: Consul's lock-delay after a holder's
			// session was invalidated. Poll.
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(time.Second):
			}
			continue
		}
		q := (&api.QueryOptions{WaitIndex: meta.LastIndex, WaitTime: 30 * time.Second}).WithContext(ctx)
		if _, _, err := s.kv.Get(lockKey, q); err != nil {
			return err
		}
	}
}

// Unlock releases a lock Lock took.
func (s *ConsulStorage) Unlock(ctx context.Context, name string) error {
	s.mu.Lock()
	l, ok := s.held[name]
	delete(s.held, name)
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("consul storage: unlock %s: not held", name)
	}
	// Release first: a released lock is free at once, while one whose
	// session is destroyed waits out the lock-delay.
	_, _, err := s.kv.Release(&api.KVPair{Key: l.key, Session: l.session}, wopts(ctx))
	close(l.stopRenew)
	if err != nil {
		return fmt.Errorf("consul storage: unlock %s: %w", name, err)
	}
	return nil
}

// String names the storage in CertMagic's logs.
func (s *ConsulStorage) String() string { return "consul:" + s.prefix }
