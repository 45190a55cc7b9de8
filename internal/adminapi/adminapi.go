// Package adminapi holds the JSON of imapgate's admin API: what the
// server (internal/admin) writes and the client (internal/ctl, imapgate
// ctl) reads, declared once so that the two cannot drift apart.
//
// The API lives under /admin/ on the HTTP listener and speaks JSON; the
// two operations a person waits for (drain, move) stream their progress
// as newline-delimited Events, the last of which is "done" or "error":
//
//	GET  /admin/sessions[?user=U][&backend=B][&state=S]  SessionsReply
//	POST /admin/users/{user}/kick                        KickReply
//	GET  /admin/users/{user}                             WhereReply
//	POST /admin/users/{user}/move    MoveRequest  ->     Events, MoveResult
//	POST /admin/users/{user}/announce              ->     AnnounceReply
//	GET  /admin/backends                                 BackendsReply
//	POST /admin/backends/{id}/drain                      Events, DrainResult
//	POST /admin/backends/{id}/undrain                    Events, DrainResult
//	POST /admin/reload                                   ReloadReport (422 if refused)
//	GET  /admin/version                                  VersionReply
//
// An error is any other status with {"error": "..."} (Error).
package adminapi

import (
	"fmt"
	"time"

	"github.com/imapgate/imapgate/routing"
)

// Timeout bounds how long drain and move wait for the cluster to catch
// up; the client waits twice as long for the whole reply.
const Timeout = 15 * time.Second

// Error is the body of every non-2xx reply.
type Error struct {
	Error string `json:"error"`
}

// Session is one live client session on the instance asked.
type Session struct {
	ID       string        `json:"id"`
	Client   string        `json:"client"`
	Listener string        `json:"listener"`
	State    string        `json:"state"`
	User     string        `json:"user,omitempty"`
	Backend  string        `json:"backend,omitempty"`
	Started  time.Time     `json:"started"`
	In       int64         `json:"bytes_in"`
	Out      int64         `json:"bytes_out"`
	Duration time.Duration `json:"duration_ns"`
}

// SessionsReply is GET /admin/sessions.
type SessionsReply struct {
	Count    int       `json:"count"`
	Sessions []Session `json:"sessions"`
}

// KickReply is POST /admin/users/{user}/kick.
type KickReply struct {
	User   string `json:"user"`
	Closed int    `json:"closed"`
}

// Backend is one backend in GET /admin/backends.
type Backend struct {
	ID       string `json:"id"`
	Addr     string `json:"addr"`
	Security string `json:"security"`
	Weight   int    `json:"weight"`
	// Health is Consul's check status, or "static" (never checked).
	Health string `json:"health"`
	// Up is true if users may be routed there.
	Up bool `json:"up"`
	// Drain is true if no new users go there.
	Drain bool `json:"drain"`
	// Users is how many users Consul assigns to it (Consul router only).
	Users int `json:"users"`
	// Sessions is how many spliced sessions this instance has there.
	Sessions  int        `json:"sessions"`
	DownSince *time.Time `json:"down_since,omitempty"`
}

// BackendsReply is GET /admin/backends. Router is routing.router.
type BackendsReply struct {
	Router   string    `json:"router"`
	Backends []Backend `json:"backends"`
}

// Event is one line of a progress stream.
type Event struct {
	// Event is the step: a progress step's name, "done" or "error".
	Event string `json:"event"`
	// Message says it for a person.
	Message string `json:"message"`
	// Result is set on "done": a MoveResult or a DrainResult.
	Result any `json:"result,omitempty"`
}

// MoveRequest is the body of POST /admin/users/{user}/move.
type MoveRequest struct {
	Backend string `json:"backend"`
}

// MoveResult is the result of a finished move.
type MoveResult struct {
	User    string   `json:"user"`
	Backend string   `json:"backend"`
	From    []string `json:"from"`
	Closed  int      `json:"closed"`
	Took    string   `json:"took"`
}

// DrainResult is the result of a finished drain or undrain.
type DrainResult struct {
	Backend string `json:"backend"`
	Drain   bool   `json:"drain"`
	// Scope is "cluster" (a Consul KV flag every instance follows) or
	// "instance" (the static router's in-memory set).
	Scope    string `json:"scope"`
	Users    int    `json:"users"`
	Sessions int    `json:"sessions"`
	Note     string `json:"note,omitempty"`
}

// WhereReply is GET /admin/users/{user}: where the user lives and why,
// and their live sessions on this instance.
type WhereReply struct {
	routing.Placement
	Sessions []Session `json:"sessions"`
}

// ReloadReport says what a reload did, for the log and the admin API.
type ReloadReport struct {
	// Result is "applied" or "refused".
	Result string `json:"result"`
	// Error is why the new configuration was refused.
	Error string `json:"error,omitempty"`
	// Applied are the changed keys now in force.
	Applied []string `json:"applied"`
	// Restart are keys that differ from what the process started with and
	// that only a restart applies; their old values stay in force.
	Restart []string `json:"restart"`
	// Ignored are changed keys the running router does not use.
	Ignored []string `json:"ignored,omitempty"`
	// Certificates is "reloaded" (files re-read) or "replaced" (a new
	// [tls] section is in force).
	Certificates string `json:"certificates"`
	// Evicted counts sessions closed because their user now routes to
	// another backend.
	Evicted int `json:"evicted"`
}

// ReloadReport.Result: the reload went through, or nothing changed.
const (
	Applied = "applied"
	Refused = "refused"
)

// Version says which imapgate this is.
type Version struct {
	Version   string `json:"version"`
	Commit    string `json:"commit"`
	GoVersion string `json:"go_version"`
	// Modified is true when the binary was built from a checkout with
	// uncommitted changes (from the VCS stamp; false when unknown).
	Modified bool `json:"modified,omitempty"`
}

// String is the one line `imapgate version` prints.
func (v Version) String() string {
	c := v.Commit
	if v.Modified {
		c += "-dirty"
	}
	return fmt.Sprintf("imapgate %s (commit %s, %s)", v.Version, c, v.GoVersion)
}

// VersionReply is GET /admin/version.
type VersionReply struct {
	Version
	Started       time.Time `json:"started"`
	UptimeSeconds float64   `json:"uptime_seconds"`
}

// AnnounceReply is the answer to POST /admin/users/{user}/announce: the
// user whose hand-made placement change went onto the Consul change feed.
type AnnounceReply struct {
	User string `json:"user"`
}
