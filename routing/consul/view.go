package consul

import (
	"crypto/tls"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

// consulView is what Route reads: immutable once stored, replaced whole
// when the catalog, KV or a grace timer changes something. The users map
// is shared between views until KV changes, so a health change does not
// copy it.
type consulView struct {
	// routable are the backends a known user may be sent to: every
	// backend in the catalog (or recently in it) that has not been down
	// for longer than the grace.
	routable map[string]*routing.Backend
	// def is the pool new users are placed over: passing, not draining.
	def *routing.Pool
	// domains are the per-domain pools, already filtered like def.
	domains map[string]*routing.Pool
	users   map[string]assignment
}

// poolFor returns the pool to place user over: their domain's if it has
// one (even if empty: a tenant's users never spill into the default pool),
// else the default.
func (v *consulView) poolFor(user string) *routing.Pool {
	if d := routing.Domain(user); d != "" {
		if p, ok := v.domains[d]; ok {
			return p
		}
	}
	return v.def
}

// backendState is what the router tracks about one service instance.
type backendState struct {
	b         *routing.Backend
	tags      []string
	health    string // api.HealthPassing... or healthAbsent
	metaDrain bool
	downSince time.Time // zero while passing or warning
	gone      bool      // down for longer than the grace
}

const healthAbsent = "absent"

func (s *backendState) up() bool {
	return s.health == api.HealthPassing || s.health == api.HealthWarning
}

func (s *backendState) placeable(drain bool) bool {
	return s.health == api.HealthPassing && !drain && !s.gone
}

// buildView makes a new view from c's state and publishes it. c.mu must be
// held.
func (c *Consul) buildView() {
	v := &consulView{
		routable: make(map[string]*routing.Backend, len(c.states)),
		domains:  make(map[string]*routing.Pool, len(c.kvDomain)),
		users:    c.kvUsers,
	}
	var placeable []*routing.Backend
	for id, s := range c.states {
		if s.gone {
			continue
		}
		v.routable[id] = s.b
		if s.placeable(s.metaDrain || c.kvDrain[id]) {
			placeable = append(placeable, s.b)
		}
	}
	v.def = routing.NewPool(placeable)
	for domain, spec := range c.kvDomain {
		v.domains[domain] = routing.NewPool(c.resolvePool(spec, placeable))
	}
	c.view.Store(v)
	c.viewChanged()
	c.snapshotChanged()
}

// resolvePool turns a domain's pool spec, "tag:<tag>" or a comma list of
// service IDs, into the placeable backends it names.
func (c *Consul) resolvePool(spec string, placeable []*routing.Backend) []*routing.Backend {
	var out []*routing.Backend
	if tag, ok := strings.CutPrefix(spec, "tag:"); ok {
		tag = strings.TrimSpace(tag)
		for _, b := range placeable {
			for _, t := range c.states[b.ID].tags {
				if t == tag {
					out = append(out, b)
					break
				}
			}
		}
		return out
	}
	for id := range strings.SplitSeq(spec, ",") {
		id = strings.TrimSpace(id)
		for _, b := range placeable {
			if b.ID == id {
				out = append(out, b)
			}
		}
	}
	return out
}

// applyCatalog updates the backend states from a catalog answer and
// rebuilds the view. c.mu must be held.
func (c *Consul) applyCatalog(entries []*api.ServiceEntry, now time.Time) {
	seen := make(map[string]bool, len(entries))
	for _, e := range entries {
		if e.Service == nil {
			continue
		}
		id := e.Service.ID
		if seen[id] {
			c.log.Warn("service ID registered twice in the catalog; using the first; make IDs unique across nodes",
				zap.String("backend", id))
			continue
		}
		b, ok := c.backendFromEntry(e)
		if !ok {
			continue
		}
		seen[id] = true
		health := e.Checks.AggregatedStatus()
		if health == "" {
			health = api.HealthCritical
		}
		s := c.states[id]
		if s == nil {
			s = &backendState{}
			c.states[id] = s
			c.log.Info("backend joined", zap.String("backend", id), zap.String("addr", b.Addr), zap.String("health", health))
		}
		if s.b == nil || !sameBackend(s.b, b) {
			s.b = b // else keep the old pointer: the proxy may compare them
		}
		s.tags = e.Service.Tags
		s.metaDrain = isTrue(e.Service.Meta[MetaDrain])
		c.setHealth(id, s, health, now)
	}
	for id, s := range c.states {
		if !seen[id] {
			c.setHealth(id, s, healthAbsent, now)
		}
	}
	c.buildView()
}

func (c *Consul) setHealth(id string, s *backendState, health string, now time.Time) {
	if s.health == health {
		return
	}
	was := s.health
	s.health = health
	switch {
	case s.up():
		if s.gone {
			c.log.Info("backend is back", zap.String("backend", id), zap.String("health", health))
		} else if was != "" {
			c.log.Info("backend health", zap.String("backend", id), zap.String("health", health), zap.String("was", was))
		}
		s.downSince, s.gone = time.Time{}, false
	case s.downSince.IsZero():
		s.downSince = now
		c.log.Warn("backend down; waiting for the grace before moving its users", zap.String("backend", id),
			zap.String("health", health), zap.Duration("grace", c.cfg.Grace))
	}
}

// expireGrace declares gone the backends down for longer than the grace,
// forgets absent ones, and returns the IDs newly gone. c.mu must be held.
func (c *Consul) expireGrace(now time.Time) []string {
	var gone []string
	for id, s := range c.states {
		if s.up() || s.gone || now.Sub(s.downSince) < c.cfg.Grace {
			continue
		}
		s.gone = true
		gone = append(gone, id)
		c.log.Warn("backend gone: closing its sessions, its users will be re-placed",
			zap.String("backend", id), zap.String("health", s.health), zap.Duration("down", now.Sub(s.downSince)))
		if s.health == healthAbsent {
			delete(c.states, id)
		}
	}
	if len(gone) > 0 {
		c.buildView()
	}
	return gone
}

// backendFromEntry reads a catalog entry's address and Meta. Instances
// with an unusable Meta are skipped (and logged): guessing a security mode
// could send passwords in the clear.
func (c *Consul) backendFromEntry(e *api.ServiceEntry) (*routing.Backend, bool) {
	svc := e.Service
	host := svc.Address
	if host == "" && e.Node != nil {
		host = e.Node.Address
	}
	if host == "" || svc.Port <= 0 {
		c.log.Warn("backend has no address or port; skipped", zap.String("backend", svc.ID))
		return nil, false
	}
	b := &routing.Backend{ID: svc.ID, Addr: net.JoinHostPort(host, strconv.Itoa(svc.Port)), Weight: 1}
	if w := svc.Meta[MetaWeight]; w != "" {
		n, err := strconv.Atoi(w)
		if err != nil || n < 1 {
			c.log.Warn("bad "+MetaWeight+" in service meta; using 1", zap.String("backend", svc.ID), zap.String("value", w))
		} else {
			b.Weight = n
		}
	}
	sec, err := routing.ParseSecurity(svc.Meta[MetaSecurity])
	if err != nil {
		c.log.Error("bad "+MetaSecurity+" in service meta; backend skipped", zap.String("backend", svc.ID), zap.Error(err))
		return nil, false
	}
	b.Security = sec
	if !c.protocolAddrs(b, host, svc.Meta) {
		return nil, false
	}
	switch pp := svc.Meta[MetaProxyProtocol]; pp {
	case "", "0", "none":
	case "1", "2":
		b.ProxyProtocol = int(pp[0] - '0')
	default:
		c.log.Error("bad "+MetaProxyProtocol+" in service meta (want 1 or 2); backend skipped",
			zap.String("backend", svc.ID), zap.String("value", pp))
		return nil, false
	}
	if sec != routing.SecurityNone {
		name := svc.Meta[MetaTLSServerName]
		if name == "" {
			name = host
		}
		if c.cfg.BackendTLS != nil {
			b.TLS = c.cfg.BackendTLS.Clone()
			b.TLS.ServerName = name
		} else if name != host {
			b.TLS = &tls.Config{ServerName: name}
		}
	}
	return b, true
}

func sameBackend(a, b *routing.Backend) bool {
	return a.ID == b.ID && a.Addr == b.Addr && a.Security == b.Security && a.Weight == b.Weight &&
		a.ProxyProtocol == b.ProxyProtocol && sameProtocolAddrs(a, b) &&
		(a.TLS == nil) == (b.TLS == nil) && (a.TLS == nil || a.TLS.ServerName == b.TLS.ServerName)
}

func isTrue(s string) bool {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "true", "1", "yes", "on":
		return true
	}
	return false
}

// kvEviction is a user move found by applyUsers, delivered outside c.mu.
type kvEviction struct {
	user, keep string
	moved      bool // the user had another backend (not a first placement)
	deleted    bool // the entry was deleted: sessions on keep are now unrecorded
}

// kvKind is one of the KV sub-prefixes, each watched on its own so that a
// drain or a domain change never waits for (or causes) a listing of every
// user.
type kvKind uint8

const (
	kvUsers kvKind = iota
	kvDomains
	kvDrain
	kvKinds // how many
)

func (k kvKind) String() string {
	switch k {
	case kvUsers:
		return "users"
	case kvDomains:
		return "domains"
	case kvDrain:
		return "drain"
	}
	return "unknown"
}

// entries yields (name, value, pair) for the keys of a listing directly
// named <prefix>/<kind>/<name>.
func (c *Consul) entries(kind kvKind, pairs api.KVPairs, fn func(name, value string, p *api.KVPair)) {
	base := c.cfg.Prefix + "/" + kind.String() + "/"
	for _, p := range pairs {
		name, ok := strings.CutPrefix(p.Key, base)
		if !ok || name == "" {
			continue
		}
		fn(name, strings.TrimSpace(string(p.Value)), p)
	}
}

// applyKV replaces one kind of KV state with a listing and rebuilds the
// view. For users it returns whose sessions must be closed: those whose
// entry now names another backend (keep the new one), and those whose
// entry was deleted, if their next placement would land elsewhere; initial
// suppresses that on the first load. c.mu must be held.
func (c *Consul) applyKV(kind kvKind, pairs api.KVPairs, initial bool) []kvEviction {
	switch kind {
	case kvDomains:
		domains := map[string]string{}
		c.entries(kind, pairs, func(name, val string, _ *api.KVPair) { domains[routing.NormalizeUser(name)] = val })
		c.kvDomain = domains
		c.buildView()
		return nil
	case kvDrain:
		drain := map[string]bool{}
		c.entries(kind, pairs, func(name, val string, _ *api.KVPair) { drain[name] = val == "" || isTrue(val) })
		c.kvDrain = drain
		c.buildView()
		return nil
	}
	users := make(map[string]assignment, max(len(pairs), len(c.kvUsers)))
	c.entries(kind, pairs, func(name, val string, p *api.KVPair) {
		if val != "" {
			users[routing.NormalizeUser(name)] = assignment{backend: val, flags: p.Flags, index: p.ModifyIndex}
		}
	})
	old := c.kvUsers
	c.kvUsers = users
	c.buildView()
	c.metrics.users.Set(float64(len(users)))
	if initial {
		return nil
	}
	var ev []kvEviction
	for u, a := range users {
		if o, ok := old[u]; !ok || o.backend != a.backend {
			ev = append(ev, kvEviction{u, a.backend, ok, false})
		}
	}
	v := c.view.Load()
	for u, o := range old {
		if _, ok := users[u]; ok {
			continue
		}
		if b := v.poolFor(u).Pick(u); b == nil {
			ev = append(ev, kvEviction{u, "", true, true})
		} else {
			ev = append(ev, kvEviction{u, b.ID, b.ID != o.backend, true})
		}
	}
	return ev
}
