package consul

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/imapgate/imapgate/routing"
)

var _ routing.Operator = (*Consul)(nil)

// Backends returns every backend the router knows, sorted by ID. It
// implements Operator.
func (c *Consul) Backends(context.Context) []routing.BackendStatus {
	states := c.States()
	out := make([]routing.BackendStatus, 0, len(states))
	for _, s := range states {
		out = append(out, routing.BackendStatus{
			ID: s.ID, Addr: s.Addr, Security: s.Security, Weight: max(s.Weight, 1),
			Health: s.Health, Up: backendUp(s.Health, s.Gone), Drain: s.Drain, Placeable: s.Placeable,
			Users: s.Users, DownSince: s.DownSince, Tags: s.Tags,
		})
	}
	return out
}

// backendUp is the health rule: users may be routed to a backend that is
// passing or warning and has not been down for longer than the grace.
func backendUp(health string, gone bool) bool {
	return !gone && (health == api.HealthPassing || health == api.HealthWarning)
}

// drainKey is the KV key of backend id's drain flag.
func (c *Consul) drainKey(id string) string { return c.cfg.Prefix + "/drain/" + id }

// SetDrain writes (or deletes) backend id's drain flag in Consul, which
// every instance follows, and waits until this instance's view shows it.
// Draining places no new users there; its users stay. It implements
// Operator.
func (c *Consul) SetDrain(ctx context.Context, id string, on bool) error {
	if !c.known(id) {
		return fmt.Errorf("%w %q", routing.ErrUnknownBackend, id)
	}
	kv := c.client.KV()
	var err error
	if on {
		_, err = kv.Put(&api.KVPair{Key: c.drainKey(id), Value: []byte("true")}, (&api.WriteOptions{}).WithContext(ctx))
	} else {
		_, err = kv.Delete(c.drainKey(id), (&api.WriteOptions{}).WithContext(ctx))
	}
	if err != nil {
		return fmt.Errorf("routing: consul: writing %s: %w", c.drainKey(id), err)
	}
	err = pollCtx(ctx, func() bool { return c.drained(id) == on })
	switch {
	case err != nil && !on && c.metaDrained(id):
		return fmt.Errorf("routing: %s is still draining: its service Meta %s is set, which KV cannot undo", id, MetaDrain)
	case err != nil:
		return fmt.Errorf("routing: the router did not see the drain change (is the Consul watch failing? see imapgate_consul_view_age_seconds): %w", err)
	}
	return nil
}

// Move pins user to backend id (Pin) and waits until this instance routes
// them there; every instance closes the user's sessions elsewhere when
// its watch sees the pin. It implements Operator.
func (c *Consul) Move(ctx context.Context, user, id string) error {
	key := routing.NormalizeUser(user)
	for _, b := range c.Backends(ctx) {
		if b.ID == id && !b.Up {
			return fmt.Errorf("routing: backend %q is %s: refusing to move a user there", id, b.Health)
		}
	}
	if err := c.Pin(ctx, key, id); err != nil {
		return err
	}
	err := pollCtx(ctx, func() bool {
		b, _, err := c.answer(c.view.Load(), key)
		return err == nil && b.ID == id
	})
	if err != nil {
		return fmt.Errorf("routing: the router did not pick up the pin (is the Consul watch failing? see imapgate_consul_view_age_seconds): %w", err)
	}
	return nil
}

// Where says where user lives and why. It implements Operator.
func (c *Consul) Where(ctx context.Context, user string) (routing.Placement, error) {
	key := routing.NormalizeUser(user)
	if key == "" {
		return routing.Placement{}, errors.New("routing: where: empty user name")
	}
	if c.cache != nil {
		if _, ok := c.cache.get(key); !ok {
			if _, _, err := c.fetchUser(ctx, key); err != nil {
				return routing.Placement{}, fmt.Errorf("routing: where: reading the user's entry: %w", err)
			}
		}
	}
	v := c.view.Load()
	p := routing.Placement{User: key, Pool: "default pool"}
	if d := routing.Domain(key); d != "" {
		if _, ok := v.domains[d]; ok {
			p.Pool = "pool of domain " + d
		}
	}
	if h := v.poolFor(key).Pick(key); h != nil {
		p.Hash = h.ID
	}
	if e, ok := c.unrecordedRoutes()[key]; ok {
		p.Unrecorded = e.backend
	}
	a, recorded := c.lookup(v, key)
	if recorded {
		p.Recorded, p.Pinned = a.backend, a.pinned()
	}
	b, _, err := c.answer(v, key)
	if err != nil {
		p.Reason = err.Error()
		return p, nil
	}
	p.Backend = b.ID
	switch {
	case recorded && a.backend == b.ID && p.Pinned:
		p.Reason = "pinned in consul KV"
	case recorded && a.backend == b.ID:
		p.Reason = "placed in consul KV"
	case recorded:
		p.Reason = fmt.Sprintf("recorded backend %s is gone past the grace: re-placed by hashing over the %s at the next login", a.backend, p.Pool)
	case p.Unrecorded != "":
		p.Reason = "served here without a record (consul unreachable or place_rate spent); hashing over the " + p.Pool + ", retried in the background"
	default:
		p.Reason = "not placed yet: the next login hashes over the " + p.Pool + " and records it"
	}
	for _, s := range c.States() {
		if s.ID == b.ID {
			state := s.Health
			if s.Drain {
				state += ", draining"
			}
			p.Reason += " (" + b.ID + " is " + state + ")"
		}
	}
	return p, nil
}

func (c *Consul) known(id string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.states[id]
	return ok
}

func (c *Consul) drained(id string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.states[id]
	return s != nil && (s.metaDrain || c.kvDrain[id])
}

func (c *Consul) metaDrained(id string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.states[id]
	return s != nil && s.metaDrain
}

// pollCtx calls cond every 20ms until it is true or ctx ends.
func pollCtx(ctx context.Context, cond func() bool) error {
	return routing.WaitFor(ctx, 20*time.Millisecond, cond)
}
