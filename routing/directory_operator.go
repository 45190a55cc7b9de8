package routing

import (
	"context"
	"errors"
	"fmt"
)

// The directory routers as Operators (operator.go). They record nothing
// and own no placement: drains and moves are changes in the directory,
// which imapgate applies within the cache TTL (evicting sessions left on
// the old backend), so SetDrain and Move say so.

var (
	_ Operator = (*HTTP)(nil)
	_ Operator = (*LDAP)(nil)
)

// errDirectoryDecides answers drains and moves on a directory router.
func errDirectoryDecides(kind string) error {
	return fmt.Errorf("%w: the %s directory decides where users live: change it there (imapgate applies the change within routing.directory.cache_ttl, or at once for a user after `ctl kick`)", errors.ErrUnsupported, kind)
}

func (d *directory) status() []BackendStatus {
	var out []BackendStatus
	for _, b := range d.backends() {
		out = append(out, BackendStatus{ID: b.ID, Addr: b.Addr, Security: b.Security, Weight: max(b.Weight, 1),
			Health: "directory", Up: true, Placeable: true})
	}
	return out
}

// where answers Operator.Where from route (the cache, else one lookup).
func (d *directory) where(ctx context.Context, user, key string, route func() (*Backend, error)) (Placement, error) {
	_, cached, _ := d.cached(key)
	p := Placement{User: user}
	b, err := route()
	var r *RefusedError
	switch {
	case errors.As(err, &r):
		p.Reason = fmt.Sprintf("the %s directory refuses the user: %s", d.name, r.Reason)
		return p, nil
	case err != nil:
		return p, err
	}
	p.Backend, p.Recorded = b.ID, b.ID
	p.Reason = fmt.Sprintf("the %s directory names %s", d.name, b.Addr)
	if cached {
		p.Reason += fmt.Sprintf(" (cached answer, reused for up to %v after the lookup)", d.o.TTL)
	}
	return p, nil
}

// Backends implements Operator.
func (h *HTTP) Backends(context.Context) []BackendStatus { return h.d.status() }

// SetDrain implements Operator: unsupported, the service decides.
func (h *HTTP) SetDrain(context.Context, string, bool) error { return errDirectoryDecides("http") }

// Move implements Operator: unsupported, the service decides.
func (h *HTTP) Move(context.Context, string, string) error { return errDirectoryDecides("http") }

// Where implements Operator with the answer the next login would get
// (no password is sent: an operator's lookup carries no Login).
func (h *HTTP) Where(ctx context.Context, user string) (Placement, error) {
	user = NormalizeUser(user)
	return h.d.where(ctx, user, user, func() (*Backend, error) { return h.Route(ctx, user) })
}

// Backends implements Operator.
func (l *LDAP) Backends(context.Context) []BackendStatus { return l.d.status() }

// SetDrain implements Operator: unsupported, the directory decides.
func (l *LDAP) SetDrain(context.Context, string, bool) error { return errDirectoryDecides("ldap") }

// Move implements Operator: unsupported, the directory decides.
func (l *LDAP) Move(context.Context, string, string) error { return errDirectoryDecides("ldap") }

// Where implements Operator.
func (l *LDAP) Where(ctx context.Context, user string) (Placement, error) {
	user = NormalizeUser(user)
	return l.d.where(ctx, user, user, func() (*Backend, error) { return l.Route(ctx, user) })
}

// The directory routers are Committers that record nothing: the
// directory is the record, so the backend that accepted the login is
// where the user belongs.
var (
	_ Committer = (*HTTP)(nil)
	_ Committer = (*LDAP)(nil)
)

// Commit implements Committer: b, as the service named it.
func (h *HTTP) Commit(_ context.Context, _ string, b *Backend) (*Backend, error) { return b, nil }

// Commit implements Committer: b, as the directory named it.
func (l *LDAP) Commit(_ context.Context, _ string, b *Backend) (*Backend, error) { return b, nil }
