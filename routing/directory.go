package routing

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"
)

// What the directory routers (http.go: nginx's auth_http protocol;
// ldap.go: the backend host in an LDAP attribute) share: a bounded cache
// of answers and refusals, one lookup at a time per user, turning a host
// and port into a *Backend, and the never-two-backends rule.
//
// A directory router records nothing: the directory is the truth, so a
// "move" is a change in the directory, and the cache TTL bounds how soon
// imapgate applies it. When a fresh lookup answers a backend other than
// where the user has live sessions, those sessions are evicted.

// DirectoryOptions configures what the http and ldap routers share. The
// zero value caches answers for a minute and refusals for ten seconds,
// 10,000 of each, and dials port 143 in cleartext.
type DirectoryOptions struct {
	// TTL is how long an answer is reused without asking again: the
	// longest a directory change (a move) takes to apply. Zero means one
	// minute; negative disables the cache.
	TTL time.Duration
	// NegativeTTL is how long a refusal ("no such user") is reused. Zero
	// means 10 seconds; negative disables it.
	NegativeTTL time.Duration
	// CacheSize bounds each cache (answers, refusals) in entries; the
	// least recently used go first. Zero means 10,000.
	CacheSize int
	// DefaultPort is dialled when the directory names no port. Zero
	// means 143.
	DefaultPort int
	// Security and TLS are how to talk to a backend the directory names
	// that is not among Known.
	Security Security
	TLS      *tls.Config
	// Known are configured backends: an answer naming one's Addr, or its
	// ID as the host, gets that *Backend with its security and weight.
	Known []*Backend
	// Evictor, if set, closes a user's live sessions on a backend the
	// directory no longer names for them.
	Evictor Evictor
	// Logger, if nil, logs nothing.
	Logger *zap.Logger
}

// RefusedError is a directory's "no" for a user: unknown, disabled, or
// (auth_http) a wrong password. It wraps ErrNoBackend, and it is cached
// for DirectoryOptions.NegativeTTL.
type RefusedError struct {
	// Reason is the directory's text (nginx's Auth-Status), for logs only:
	// never shown to the client.
	Reason string
	// Wait is how long the directory asked to delay the answer to the
	// client (nginx's Auth-Wait); zero if it did not.
	Wait time.Duration
}

func (e *RefusedError) Error() string {
	return "routing: directory refused the user: " + e.Reason
}

// Unwrap makes a refusal an ErrNoBackend for the proxy.
func (e *RefusedError) Unwrap() error { return ErrNoBackend }

// DirectoryStats counts a directory router's lookups.
type DirectoryStats struct {
	Hits, Misses, Refusals, Errors, Evictions int64
}

// lookupFunc asks the directory once. It returns the host and port (0:
// the default) of the user's backend, a *RefusedError, or another error
// when the directory could not answer (not cached).
type lookupFunc func(ctx context.Context) (host string, port int, err error)

type directory struct {
	name string
	o    DirectoryOptions
	log  *zap.Logger
	pos  *ttlCache[*Backend]
	neg  *ttlCache[*RefusedError]
	sf   singleflight.Group
	// salt keys the cache entries of lookups that carry a password.
	salt []byte

	known map[string]*Backend // by Addr and by ID
	mu    sync.Mutex
	seen  map[string]*Backend // backends made from answers, by Addr

	hits, misses, refusals, errs, evictions atomic.Int64
}

func newDirectory(name string, o DirectoryOptions) *directory {
	if o.TTL == 0 {
		o.TTL = time.Minute
	}
	if o.NegativeTTL == 0 {
		o.NegativeTTL = 10 * time.Second
	}
	if o.CacheSize <= 0 {
		o.CacheSize = 10000
	}
	if o.DefaultPort == 0 {
		o.DefaultPort = 143
	}
	d := &directory{name: name, o: o, log: o.Logger, known: map[string]*Backend{}, seen: map[string]*Backend{}}
	if d.log == nil {
		d.log = zap.NewNop()
	}
	// A disabled cache is nil.
	if o.TTL > 0 {
		d.pos = newTTLCache[*Backend](o.CacheSize, o.TTL)
	}
	if o.NegativeTTL > 0 {
		d.neg = newTTLCache[*RefusedError](o.CacheSize, o.NegativeTTL)
	}
	d.salt = make([]byte, 32)
	rand.Read(d.salt)
	for _, b := range o.Known {
		if b.ID == "" {
			b.ID = b.Addr
		}
		d.known[b.Addr] = b
		d.known[b.ID] = b
	}
	return d
}

// key is the cache and lookup key of a user, with the password when it is
// part of the question (keyed, so the cache holds no password hash an
// attacker could test guesses against).
func (d *directory) key(user, password string, withPassword bool) string {
	if !withPassword {
		return user
	}
	m := hmac.New(sha256.New, d.salt)
	m.Write([]byte(password))
	return user + "\x00" + hex.EncodeToString(m.Sum(nil)[:16])
}

// route answers from the cache or asks lookup, one lookup at a time per
// key. user must be normalized.
func (d *directory) route(ctx context.Context, user, key string, lookup lookupFunc) (*Backend, error) {
	if b, ok, err := d.cached(key); ok {
		return b, err
	}
	d.misses.Add(1)
	ch := d.sf.DoChan(key, func() (any, error) {
		// Shared by every caller waiting for this key, so one caller
		// going away must not cancel it: lookups bound themselves.
		host, port, err := lookup(context.WithoutCancel(ctx))
		if err != nil {
			var r *RefusedError
			if errors.As(err, &r) {
				d.refusals.Add(1)
				if d.neg != nil {
					d.neg.Add(key, r)
				}
				return nil, r
			}
			d.errs.Add(1)
			return nil, fmt.Errorf("%w: %s directory: %v", ErrNoBackend, d.name, err)
		}
		b, err := d.backend(host, port)
		if err != nil {
			d.errs.Add(1)
			return nil, fmt.Errorf("%w: %s directory: %v", ErrNoBackend, d.name, err)
		}
		if d.pos != nil {
			d.pos.Add(key, b)
		}
		// A fresh answer: sessions elsewhere are in the wrong place now.
		if d.o.Evictor != nil {
			if n := d.o.Evictor.EvictUser(user, b.ID); n > 0 {
				d.evictions.Add(int64(n))
				d.log.Info("directory moved user: sessions elsewhere evicted", zap.String("user", user), zap.String("backend", b.ID), zap.Int("evicted", n))
			}
		}
		return b, nil
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return nil, r.Err
		}
		return r.Val.(*Backend), nil
	case <-ctx.Done():
		return nil, fmt.Errorf("%w: %s directory: %v", ErrNoBackend, d.name, ctx.Err())
	}
}

// cached answers key from the cache, if it can. The routers call it
// before building their lookup closure, so that a hit allocates nothing.
func (d *directory) cached(key string) (*Backend, bool, error) {
	if d.pos != nil {
		if b, ok := d.pos.Get(key); ok {
			d.hits.Add(1)
			return b, true, nil
		}
	}
	if d.neg != nil {
		if r, ok := d.neg.Get(key); ok {
			d.hits.Add(1)
			return nil, true, r
		}
	}
	return nil, false, nil
}

// backend turns an answer into a *Backend: a known one, or one made once
// per address and then reused.
func (d *directory) backend(host string, port int) (*Backend, error) {
	host = strings.TrimSpace(host)
	if host == "" {
		return nil, errors.New("the answer names no host")
	}
	if port < 0 || port > 65535 {
		return nil, fmt.Errorf("port %d out of range", port)
	}
	if port == 0 {
		if h, p, err := net.SplitHostPort(host); err == nil {
			if n, err := strconv.Atoi(p); err == nil && n > 0 && n <= 65535 {
				host, port = h, n
			}
		}
	}
	if b := d.known[host]; b != nil && port == 0 {
		return b, nil
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	if !validHost(host) {
		return nil, fmt.Errorf("%q is not a host name or address", host)
	}
	if port == 0 {
		port = d.o.DefaultPort
	}
	addr := net.JoinHostPort(host, strconv.Itoa(port))
	if b := d.known[addr]; b != nil {
		return b, nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if b := d.seen[addr]; b != nil {
		return b, nil
	}
	if len(d.seen) >= 4096 {
		// A directory naming endless distinct hosts must not grow this.
		clear(d.seen)
	}
	b := &Backend{ID: addr, Addr: addr, Security: d.o.Security, TLS: d.o.TLS, Weight: 1}
	d.seen[addr] = b
	return b, nil
}

// validHost reports whether h is an IP address without a zone or a DNS
// name (letters, digits, '-', '_' and dots, at most 253 bytes): what a
// directory may name for imapgate to dial. A zone ("fe80::1%eth0") names
// this host's interfaces, which a directory cannot know, and its text is
// free-form ("::%/" was found by FuzzAuthReply).
func validHost(h string) bool {
	if a, err := netip.ParseAddr(h); err == nil {
		return a.Zone() == ""
	}
	if h == "" || len(h) > 253 {
		return false
	}
	for _, c := range []byte(h) {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}

// backends returns the configured backends and those answers named, by ID.
func (d *directory) backends() []*Backend {
	d.mu.Lock()
	all := maps.Clone(d.seen)
	d.mu.Unlock()
	for _, b := range d.known {
		all[b.ID] = b
	}
	return slices.SortedFunc(maps.Values(all), func(a, b *Backend) int { return strings.Compare(a.ID, b.ID) })
}

// forget drops user's cached answers, so the next login asks again.
func (d *directory) forget(user string) {
	if d.pos != nil {
		for _, k := range d.pos.Keys() {
			if k == user || strings.HasPrefix(k, user+"\x00") {
				d.pos.Remove(k)
			}
		}
	}
	if d.neg != nil {
		for _, k := range d.neg.Keys() {
			if k == user || strings.HasPrefix(k, user+"\x00") {
				d.neg.Remove(k)
			}
		}
	}
}

func (d *directory) stats() DirectoryStats {
	return DirectoryStats{Hits: d.hits.Load(), Misses: d.misses.Load(), Refusals: d.refusals.Load(), Errors: d.errs.Load(), Evictions: d.evictions.Load()}
}

// refusalDelay sleeps for a refusal's Wait (bounded, and only for a real login:
// an operator's lookup carries no Login) before the refusal is returned.
func refusalDelay(ctx context.Context, err error) {
	var r *RefusedError
	if !errors.As(err, &r) || r.Wait <= 0 {
		return
	}
	if _, ok := LoginFrom(ctx); !ok {
		return
	}
	t := time.NewTimer(min(r.Wait, 30*time.Second))
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// ttlCache is a bounded LRU whose entries expire. Expiry is checked on
// read, so it starts no goroutine (golang-lru's expirable cache starts one
// per cache that nothing stops, and a reload makes new routers).
type ttlCache[V any] struct {
	ttl time.Duration
	c   *lru.Cache[string, ttlEntry[V]]
}

type ttlEntry[V any] struct {
	v     V
	until time.Time
}

func newTTLCache[V any](size int, ttl time.Duration) *ttlCache[V] {
	c, err := lru.New[string, ttlEntry[V]](size)
	if err != nil {
		panic(err) // only for size <= 0, which newDirectory rules out
	}
	return &ttlCache[V]{ttl: ttl, c: c}
}

func (t *ttlCache[V]) Get(k string) (V, bool) {
	e, ok := t.c.Get(k)
	if !ok || time.Now().After(e.until) {
		if ok {
			t.c.Remove(k)
		}
		var zero V
		return zero, false
	}
	return e.v, true
}

func (t *ttlCache[V]) Add(k string, v V) { t.c.Add(k, ttlEntry[V]{v, time.Now().Add(t.ttl)}) }
func (t *ttlCache[V]) Remove(k string)   { t.c.Remove(k) }
func (t *ttlCache[V]) Keys() []string    { return t.c.Keys() }
