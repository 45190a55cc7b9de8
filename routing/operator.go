package routing

import (
	"context"
	"errors"
	"time"
)

// Operator is what an operator (the admin API, `imapgate ctl`) does with
// a router: list its backends, drain and undrain one, move (pin) a user,
// and ask where a user lives and why. Every router that can be run by
// the binary implements it, so cmd/imapgate has one code path for all of
// them. A router that cannot do one of the operations (a read-only
// source) returns an error wrapping errors.ErrUnsupported.
//
// Changes made through an Operator keep the routing invariant: a router
// that now sends a user elsewhere closes that user's sessions on the old
// backend through its Evictor before (or as) the call returns.
type Operator interface {
	// Backends returns every backend the router knows, sorted by ID.
	Backends(ctx context.Context) []BackendStatus
	// SetDrain drains (on) or undrains backend id: a drained backend
	// gets no new users.
	SetDrain(ctx context.Context, id string, on bool) error
	// Move makes backend id the home of user, as an operator's pin that
	// the router never changes by itself, and closes the user's sessions
	// elsewhere.
	Move(ctx context.Context, user, id string) error
	// Where says where user lives and why, like Director's
	// `doveadm director status USER`.
	Where(ctx context.Context, user string) (Placement, error)
}

// BackendStatus is one backend as an Operator reports it.
type BackendStatus struct {
	ID       string   `json:"id"`
	Addr     string   `json:"addr"`
	Security Security `json:"-"`
	Weight   int      `json:"weight"`
	// Health is the health checker's word ("passing", "warning",
	// "critical", "maintenance", "absent"), or "static" for a backend
	// nobody checks.
	Health string `json:"health"`
	// Up is true if users may be routed there.
	Up bool `json:"up"`
	// Drain is true if no new users go there.
	Drain bool `json:"drain"`
	// Placeable is true if new users may be placed there: up and not
	// draining.
	Placeable bool `json:"placeable"`
	// Users is how many users the router has recorded there (0 for a
	// router that records nothing).
	Users int `json:"users"`
	// DownSince is when it stopped being up; zero while up.
	DownSince time.Time `json:"down_since,omitzero"`
	// Tags are the backend's tags (Consul), if any.
	Tags []string `json:"tags,omitempty"`
}

// Placement answers Operator.Where.
type Placement struct {
	// User is the normalised user name.
	User string `json:"user"`
	// Backend is where the user's next login goes ("" if nowhere: see
	// Reason).
	Backend string `json:"backend"`
	// Recorded is the backend recorded for the user (Consul KV, a pin in
	// the configuration), "" if none.
	Recorded string `json:"recorded,omitempty"`
	// Pinned is true if Recorded is an operator's pin.
	Pinned bool `json:"pinned"`
	// Unrecorded is a backend this instance served the user on without
	// being able to record it yet (Consul down, place_rate spent).
	Unrecorded string `json:"unrecorded,omitempty"`
	// Hash is what hashing over the user's pool picks now, ignoring any
	// record.
	Hash string `json:"hash,omitempty"`
	// Pool names the pool the user hashes over: "default", "domain
	// example.org".
	Pool string `json:"pool,omitempty"`
	// Reason says in words why Backend is what it is.
	Reason string `json:"reason"`
}

// ErrUnknownBackend is a drain or a move naming a backend the router does
// not know.
var ErrUnknownBackend = errors.New("routing: unknown backend")

// ErrLastInPool refuses a drain that would leave a pool with nobody to
// place its users on.
var ErrLastInPool = errors.New("routing: last undrained backend of a pool")
