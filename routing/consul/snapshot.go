package consul

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

// The Consul router's snapshot: its last good view of Consul (backends
// with their health, user placements, domain pools, drains), written to a
// local file so that an imapgate restarted while Consul is unreachable
// can still route the users it knows (see NewConsul and the README's
// failure table).
//
// Only a view confirmed by Consul is written: never while a watch fails
// or while the router still serves from a snapshot, so the file's time
// says how old its data is. Writes are atomic (a temporary file in the
// same directory, fsync, rename) and at most one per SnapshotInterval,
// plus one per snapshotRefresh while nothing changes, plus one at Close.

const (
	snapshotFormat  = "imapgate-consul-snapshot"
	snapshotVersion = 1
	// maxSnapshotSize bounds what is read from disk: about 5 million
	// users.
	maxSnapshotSize = 512 << 20
	// snapshotFuture is how far in the future a snapshot's time may be
	// (clocks of a cluster disagree a little) before it is refused.
	snapshotFuture = 5 * time.Minute
)

// snapshotFile is the file's JSON form.
type snapshotFile struct {
	Format     string            `json:"format"`
	Version    int               `json:"version"`
	Service    string            `json:"service"`
	Tag        string            `json:"tag"`
	Prefix     string            `json:"prefix"`
	Datacenter string            `json:"datacenter"`
	Taken      time.Time         `json:"taken"`
	Backends   []snapshotBackend `json:"backends"`
	Users      []snapshotUser    `json:"users"`
	Domains    map[string]string `json:"domains"`
	Drain      map[string]bool   `json:"drain"`
}

type snapshotBackend struct {
	ID            string    `json:"id"`
	Addr          string    `json:"addr"`
	Security      string    `json:"security"`
	TLSServerName string    `json:"tls_server_name,omitempty"`
	Weight        int       `json:"weight"`
	ProxyProtocol int       `json:"proxy_protocol,omitempty"`
	POP3Addr      string    `json:"pop3_addr,omitempty"`
	SieveAddr     string    `json:"sieve_addr,omitempty"`
	LMTPAddr      string    `json:"lmtp_addr,omitempty"`
	LMTPSecurity  string    `json:"lmtp_security,omitempty"`
	Tags          []string  `json:"tags,omitempty"`
	Health        string    `json:"health"`
	MetaDrain     bool      `json:"meta_drain,omitempty"`
	DownSince     time.Time `json:"down_since,omitzero"`
	Gone          bool      `json:"gone,omitempty"`
}

type snapshotUser struct {
	User    string `json:"u"`
	Backend string `json:"b"`
	Flags   uint64 `json:"f,omitempty"`
	Index   uint64 `json:"i"`
}

// snapshotState is a decoded, checked snapshot, ready to be restored.
type snapshotState struct {
	service, tag, prefix, datacenter string
	taken                            time.Time
	states                           map[string]*backendState
	users                            map[string]assignment
	domains                          map[string]string
	drain                            map[string]bool
}

// decodeSnapshot parses and checks a snapshot file. tmpl is the BackendTLS
// template (nil: system roots) the restored backends' TLS is built from,
// as backendFromEntry does.
func decodeSnapshot(data []byte, tmpl *tls.Config) (*snapshotState, error) {
	var f snapshotFile
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("not a snapshot: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("not a snapshot: data after the JSON object")
	}
	if f.Format != snapshotFormat {
		return nil, fmt.Errorf("not a snapshot: format %q, want %q", f.Format, snapshotFormat)
	}
	if f.Version != snapshotVersion {
		return nil, fmt.Errorf("snapshot version %d, this imapgate reads version %d", f.Version, snapshotVersion)
	}
	if f.Service == "" || f.Prefix == "" || f.Taken.IsZero() {
		return nil, errors.New("snapshot without service, prefix or time")
	}
	s := &snapshotState{
		service: f.Service, tag: f.Tag, prefix: f.Prefix, datacenter: f.Datacenter, taken: f.Taken,
		states:  make(map[string]*backendState, len(f.Backends)),
		users:   make(map[string]assignment, len(f.Users)),
		domains: map[string]string{},
		drain:   map[string]bool{},
	}
	for i, sb := range f.Backends {
		b, err := sb.backend(tmpl)
		if err != nil {
			return nil, fmt.Errorf("snapshot backend %d: %w", i, err)
		}
		if _, dup := s.states[b.ID]; dup {
			return nil, fmt.Errorf("snapshot backend %q listed twice", b.ID)
		}
		switch sb.Health {
		case api.HealthPassing, api.HealthWarning, api.HealthCritical, api.HealthMaint, healthAbsent:
		default:
			return nil, fmt.Errorf("snapshot backend %q: unknown health %q", b.ID, sb.Health)
		}
		st := &backendState{b: b, tags: sb.Tags, health: sb.Health, metaDrain: sb.MetaDrain, downSince: sb.DownSince, gone: sb.Gone}
		if !st.up() && st.downSince.IsZero() {
			return nil, fmt.Errorf("snapshot backend %q is %s without a down_since", b.ID, sb.Health)
		}
		s.states[b.ID] = st
	}
	for i, u := range f.Users {
		key := routing.NormalizeUser(u.User)
		if key == "" || key != u.User || strings.TrimSpace(u.Backend) == "" {
			return nil, fmt.Errorf("snapshot user %d: bad user %q or backend %q", i, u.User, u.Backend)
		}
		if _, dup := s.users[key]; dup {
			return nil, fmt.Errorf("snapshot user %q listed twice", key)
		}
		s.users[key] = assignment{backend: u.Backend, flags: u.Flags, index: u.Index}
	}
	for d, spec := range f.Domains {
		if d == "" || routing.NormalizeUser(d) != d {
			return nil, fmt.Errorf("snapshot domain %q is not normalised", d)
		}
		s.domains[d] = spec
	}
	for id, on := range f.Drain {
		if id == "" {
			return nil, errors.New("snapshot drain entry without a backend ID")
		}
		s.drain[id] = on
	}
	return s, nil
}

func (sb snapshotBackend) backend(tmpl *tls.Config) (*routing.Backend, error) {
	if sb.ID == "" {
		return nil, errors.New("no ID")
	}
	host, port, err := net.SplitHostPort(sb.Addr)
	if err != nil || host == "" {
		return nil, fmt.Errorf("%q: bad address %q", sb.ID, sb.Addr)
	}
	if n, err := strconv.Atoi(port); err != nil || n <= 0 || n > 65535 {
		return nil, fmt.Errorf("%q: bad port in %q", sb.ID, sb.Addr)
	}
	sec, err := routing.ParseSecurity(sb.Security)
	if err != nil {
		return nil, fmt.Errorf("%q: %w", sb.ID, err)
	}
	lsec, err := routing.ParseSecurity(sb.LMTPSecurity)
	if err != nil {
		return nil, fmt.Errorf("%q: lmtp: %w", sb.ID, err)
	}
	if sb.Weight < 1 {
		return nil, fmt.Errorf("%q: weight %d, want at least 1", sb.ID, sb.Weight)
	}
	if sb.ProxyProtocol != 0 && sb.ProxyProtocol != 1 && sb.ProxyProtocol != 2 {
		return nil, fmt.Errorf("%q: proxy protocol %d, want 0, 1 or 2", sb.ID, sb.ProxyProtocol)
	}
	for _, a := range []string{sb.POP3Addr, sb.SieveAddr, sb.LMTPAddr} {
		if a == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(a); err != nil {
			return nil, fmt.Errorf("%q: bad address %q", sb.ID, a)
		}
	}
	b := &routing.Backend{
		ID: sb.ID, Addr: sb.Addr, Security: sec, Weight: sb.Weight, ProxyProtocol: sb.ProxyProtocol,
		POP3Addr: sb.POP3Addr, SieveAddr: sb.SieveAddr, LMTPAddr: sb.LMTPAddr, LMTPSecurity: lsec,
	}
	if sec != routing.SecurityNone {
		// As backendFromEntry: the template's copy with the name, or a
		// bare config only when the name is not the address's host.
		name := sb.TLSServerName
		if name == "" {
			name = host
		}
		if tmpl != nil {
			b.TLS = tmpl.Clone()
			b.TLS.ServerName = name
		} else if name != host {
			b.TLS = &tls.Config{ServerName: name}
		}
	}
	return b, nil
}

// encodeSnapshot takes c's state (under c.mu) and encodes it (outside).
func (c *Consul) encodeSnapshot(taken time.Time) ([]byte, error) {
	f := snapshotFile{
		Format: snapshotFormat, Version: snapshotVersion,
		Service: c.cfg.Service, Tag: c.cfg.Tag, Prefix: c.cfg.Prefix, Datacenter: c.cfg.Datacenter,
		Taken: taken.UTC(),
	}
	c.mu.Lock()
	f.Backends = make([]snapshotBackend, 0, len(c.states))
	for id, s := range c.states {
		b := s.b
		sb := snapshotBackend{
			ID: id, Addr: b.Addr, Security: b.Security.String(), Weight: max(b.Weight, 1), ProxyProtocol: b.ProxyProtocol,
			POP3Addr: b.POP3Addr, SieveAddr: b.SieveAddr, LMTPAddr: b.LMTPAddr,
			Tags: slices.Clone(s.tags), Health: s.health, MetaDrain: s.metaDrain, DownSince: s.downSince, Gone: s.gone,
		}
		if b.LMTPSecurity != routing.SecurityNone {
			sb.LMTPSecurity = b.LMTPSecurity.String()
		}
		if b.TLS != nil {
			sb.TLSServerName = b.TLS.ServerName
		}
		f.Backends = append(f.Backends, sb)
	}
	// The maps are replaced whole by applyKV, never changed in place:
	// they may be read after c.mu is released.
	users, domains, drain := c.kvUsers, c.kvDomain, c.kvDrain
	c.mu.Unlock()
	f.Domains, f.Drain = domains, drain
	if c.cache != nil {
		// WatchFeed: only the users this instance has seen.
		f.Users = make([]snapshotUser, 0, c.cache.len())
		c.cache.each(func(u string, a assignment) {
			f.Users = append(f.Users, snapshotUser{User: u, Backend: a.backend, Flags: a.flags, Index: a.index})
		})
	} else {
		f.Users = make([]snapshotUser, 0, len(users))
		for u, a := range users {
			f.Users = append(f.Users, snapshotUser{User: u, Backend: a.backend, Flags: a.flags, Index: a.index})
		}
	}
	slices.SortFunc(f.Backends, func(a, b snapshotBackend) int { return strings.Compare(a.ID, b.ID) })
	// Users stay unsorted: sorting 100,000 names cost a third of a write.
	return json.Marshal(&f)
}

// writeFileAtomic replaces path with data: a reader sees the old file or
// the new one, never a part, even across a power cut.
func writeFileAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	name := tmp.Name()
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(name, path)
	}
	if err != nil {
		os.Remove(name)
		return err
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync() // the rename itself; not every filesystem can
		d.Close()
	}
	return nil
}

// snapshotWritable reports whether the view is one Consul confirmed:
// every watch hears from Consul and the router no longer serves from a
// snapshot.
func (c *Consul) snapshotWritable() bool {
	return c.cfg.SnapshotFile != "" && c.snapAt.Load() == 0 && c.ViewAge() == 0
}

// writeSnapshot writes the view to the snapshot file if it is one Consul
// confirmed.
func (c *Consul) writeSnapshot() {
	if !c.snapshotWritable() {
		return
	}
	c.snapDirty.Store(false)
	data, err := c.encodeSnapshot(time.Now())
	if err == nil {
		err = writeFileAtomic(c.cfg.SnapshotFile, data)
	}
	if err != nil {
		c.snapDirty.Store(true)
		c.metrics.snapshotWrites.WithLabelValues("error").Inc()
		if !c.snapFailing.Swap(true) {
			c.log.Warn("cannot write the consul snapshot; retrying (a start without consul would use an older one, or none)",
				zap.String("file", c.cfg.SnapshotFile), zap.Error(err))
		} else {
			c.log.Debug("cannot write the consul snapshot, again", zap.String("file", c.cfg.SnapshotFile), zap.Error(err))
		}
		return
	}
	if c.snapFailing.Swap(false) {
		c.log.Info("consul snapshot written again", zap.String("file", c.cfg.SnapshotFile))
	}
	c.metrics.snapshotWrites.WithLabelValues("ok").Inc()
	c.log.Debug("consul snapshot written", zap.String("file", c.cfg.SnapshotFile), zap.Int("bytes", len(data)))
}

// snapshotChanged marks the view as not yet written; buildView calls it.
func (c *Consul) snapshotChanged() {
	if c.cfg.SnapshotFile == "" {
		return
	}
	c.snapDirty.Store(true)
	select {
	case c.snapWake <- struct{}{}:
	default:
	}
}

// snapshotLoop writes the snapshot after changes, at most once per
// SnapshotInterval.
func (c *Consul) snapshotLoop(ctx context.Context) {
	defer c.wg.Done()
	done := ctx.Done()
	var last time.Time
	retry := time.NewTicker(c.cfg.SnapshotInterval)
	defer retry.Stop()
	for {
		select {
		case <-done:
			return
		case <-c.snapWake:
		case <-retry.C: // a change seen while a watch was failing
			if !last.IsZero() && time.Since(last) >= c.snapshotRefresh() {
				// Nothing changed, but Consul still confirms the view:
				// rewrite it, so that its time does not age past
				// SnapshotMaxAge on an instance whose view is steady.
				c.snapDirty.Store(true)
			}
		}
		if !c.snapDirty.Load() {
			continue
		}
		if d := c.cfg.SnapshotInterval - time.Since(last); d > 0 {
			t := time.NewTimer(d)
			select {
			case <-done:
				t.Stop()
				return
			case <-t.C:
			}
		}
		if c.snapshotWritable() {
			c.writeSnapshot()
			last = time.Now()
		}
	}
}

// snapshotRefresh is how often an unchanged view is written again: a
// quarter of SnapshotMaxAge, at most an hour.
func (c *Consul) snapshotRefresh() time.Duration {
	return min(time.Hour, c.cfg.SnapshotMaxAge/4)
}

// readSnapshot reads and checks the snapshot file for a start without
// Consul.
func (c *Consul) readSnapshot(now time.Time) (*snapshotState, error) {
	fh, err := os.Open(c.cfg.SnapshotFile)
	if err != nil {
		return nil, err
	}
	defer fh.Close()
	data, err := io.ReadAll(io.LimitReader(fh, maxSnapshotSize+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxSnapshotSize {
		return nil, fmt.Errorf("larger than %d bytes", maxSnapshotSize)
	}
	s, err := decodeSnapshot(data, c.cfg.BackendTLS)
	if err != nil {
		return nil, err
	}
	if s.service != c.cfg.Service || s.tag != c.cfg.Tag || s.prefix != c.cfg.Prefix || s.datacenter != c.cfg.Datacenter {
		return nil, fmt.Errorf("snapshot of service %q tag %q prefix %q datacenter %q, configured: service %q tag %q prefix %q datacenter %q",
			s.service, s.tag, s.prefix, s.datacenter, c.cfg.Service, c.cfg.Tag, c.cfg.Prefix, c.cfg.Datacenter)
	}
	age := now.Sub(s.taken)
	if age > c.cfg.SnapshotMaxAge {
		return nil, fmt.Errorf("snapshot taken %s ago (at %s), older than the %s allowed (consul.snapshot_max_age)",
			age.Round(time.Second), s.taken.Format(time.RFC3339), c.cfg.SnapshotMaxAge)
	}
	if age < -snapshotFuture {
		return nil, fmt.Errorf("snapshot taken %s in the future (at %s): is the clock right?", (-age).Round(time.Second), s.taken.Format(time.RFC3339))
	}
	return s, nil
}

// restoreSnapshot makes s the router's state, as if the watches had just
// lost Consul at s's time: ViewAge counts from it, Commit records nothing
// (new users are served by hashing, as unrecorded routes), and the first
// listing of each kind that succeeds is diffed against s, so that users
// moved meanwhile are evicted.
func (c *Consul) restoreSnapshot(s *snapshotState) {
	c.mu.Lock()
	c.states, c.kvDomain, c.kvDrain = s.states, s.domains, s.drain
	if c.cache != nil {
		// The feed cannot say what changed since: it re-reads these users
		// once Consul answers.
		for u, a := range s.users {
			c.cache.put(u, a)
		}
		c.feedResyncAtStart.Store(true)
	} else {
		c.kvUsers = s.users
	}
	c.buildView()
	c.mu.Unlock()
	c.metrics.users.Set(float64(len(s.users)))
	at := s.taken.UnixNano()
	c.catalogHealth.okAt.Store(at)
	c.catalogHealth.failing.Store(true)
	for i := range c.kvHealth {
		if i == int(kvUsers) && c.cache != nil {
			continue
		}
		c.kvHealth[i].okAt.Store(at)
		c.kvHealth[i].failing.Store(true)
	}
	for i := range c.feedHealth {
		if c.cache != nil {
			c.feedHealth[i].okAt.Store(at)
			c.feedHealth[i].failing.Store(true)
		}
	}
	c.snapAt.Store(at)
}

// noteCaughtUp ends serving from a snapshot once every watch has heard
// from Consul; the loops call it after each good answer.
func (c *Consul) noteCaughtUp() {
	at := c.snapAt.Load()
	if at == 0 || c.ViewAge() > 0 {
		return
	}
	if c.snapAt.CompareAndSwap(at, 0) {
		c.log.Info("consul reachable: the snapshot's state is replaced by consul's",
			zap.Duration("degraded_for", time.Since(c.started).Round(time.Millisecond)))
		c.snapshotChanged()
	}
}

// SnapshotAge is the age of the snapshot the router serves from, having
// started while Consul was unreachable; zero once every watch has heard
// from Consul (or if it never served from one).
func (c *Consul) SnapshotAge() time.Duration {
	at := c.snapAt.Load()
	if at == 0 {
		return 0
	}
	return max(time.Since(time.Unix(0, at)), time.Nanosecond)
}

// startFromSnapshot is NewConsul's fallback when Consul cannot be reached
// (cause): it restores the snapshot file, or returns cause with why the
// snapshot is not usable.
func (c *Consul) startFromSnapshot(cause error) error {
	if c.cfg.SnapshotFile == "" {
		return cause
	}
	now := time.Now()
	s, err := c.readSnapshot(now)
	if errors.Is(err, os.ErrNotExist) {
		c.log.Error("consul unreachable at start-up and no snapshot to start from",
			zap.String("file", c.cfg.SnapshotFile), zap.Error(cause))
		return fmt.Errorf("%w (no snapshot %s)", cause, c.cfg.SnapshotFile)
	}
	if err != nil {
		c.log.Error("consul unreachable at start-up and the snapshot is refused",
			zap.String("file", c.cfg.SnapshotFile), zap.String("reason", err.Error()), zap.Error(cause))
		return fmt.Errorf("%w (snapshot %s refused: %w)", cause, c.cfg.SnapshotFile, err)
	}
	c.restoreSnapshot(s)
	c.log.Warn("consul unreachable at start-up: DEGRADED, serving from the snapshot; known users route as before, new placements are not recorded until consul is back",
		zap.String("file", c.cfg.SnapshotFile), zap.Time("taken", s.taken),
		zap.Duration("age", now.Sub(s.taken).Round(time.Second)),
		zap.Int("backends", len(s.states)), zap.Int("users", len(s.users)), zap.Error(cause))
	return nil
}
