package main

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/imapgate/imapgate/proxy"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

// The admin API lives under /admin/ on the HTTP listener, next to
// /metrics and the health checks. It speaks JSON; the two operations a
// person waits for (drain, move) stream their progress as
// newline-delimited JSON events, the last of which is "done" or "error".
//
//	GET  /admin/sessions[?user=U][&backend=B]  live sessions here
//	POST /admin/users/{user}/kick              close a user's sessions here
//	GET  /admin/users/{user}                   where the user lives and why
//	POST /admin/users/{user}/move              {"backend": ID}
//	POST /admin/users/{user}/announce          a hand-made KV change, to the change feed
//	GET  /admin/backends                       backends and their state
//	POST /admin/backends/{id}/drain            place no new users there
//	POST /admin/backends/{id}/undrain
//	POST /admin/reload                         as SIGHUP, with the report
//	GET  /admin/version                        version, commit, Go version, uptime
//
// When http.admin_token is set every /admin/ request must carry
// "Authorization: Bearer <token>". Requests that a browser could send on
// a web page's behalf (an Origin header, Sec-Fetch-Site: cross-site) are
// refused, and so are requests to a tokenless API whose Host is not its
// address, localhost or one of http.hosts (DNS rebinding), so a loopback
// API without a token is not open to every page the operator visits.

// adminTimeout bounds how long drain and move wait for the cluster to
// catch up.
const adminTimeout = 15 * time.Second

// apiError is an error with the HTTP status it is answered with.
type apiError struct {
	status int
	msg    string
}

func (e *apiError) Error() string { return e.msg }

func errorf(status int, format string, args ...any) error {
	return &apiError{status, fmt.Sprintf(format, args...)}
}

func (a *app) adminRoutes(mux *http.ServeMux) {
	h := func(pattern string, fn http.HandlerFunc) { mux.Handle(pattern, a.adminAuth(fn)) }
	h("GET /admin/sessions", a.handleSessions)
	h("POST /admin/users/{user}/kick", a.handleKick)
	h("POST /admin/users/{user}/move", a.handleMove)
	h("POST /admin/users/{user}/announce", a.handleAnnounce)
	h("GET /admin/users/{user}", a.handleWhere)
	h("GET /admin/backends", a.handleBackends)
	h("POST /admin/backends/{id}/drain", a.handleDrain(true))
	h("POST /admin/backends/{id}/undrain", a.handleDrain(false))
	h("POST /admin/reload", a.handleReload)
	h("/admin/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, errorf(http.StatusNotFound, "no such admin endpoint: %s %s", r.Method, r.URL.Path))
	})
}

// adminAuth checks the bearer token in constant time (both sides hashed
// first, so not even the token's length leaks) and refuses cross-site
// requests.
func (a *app) adminAuth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Origin") != "" || r.Header.Get("Sec-Fetch-Site") == "cross-site" {
			writeError(w, errorf(http.StatusForbidden, "cross-origin requests to the admin API are refused"))
			return
		}
		token := a.cfg.Load().HTTP.AdminToken
		if token == "" && !a.hostAllowed(r) {
			// No token: the loopback listener is all that protects the
			// API, and a rebinding DNS name would get a page past it.
			writeError(w, errorf(http.StatusForbidden, "Host %q is not this admin API's (allowed: its address, localhost, http.hosts)", r.Host))
			return
		}
		if token != "" {
			got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			want := sha256.Sum256([]byte(token))
			have := sha256.Sum256([]byte(got))
			if !ok || subtle.ConstantTimeCompare(want[:], have[:]) != 1 {
				w.Header().Set("WWW-Authenticate", `Bearer realm="imapgate admin"`)
				writeError(w, errorf(http.StatusUnauthorized, "missing or wrong admin token (Authorization: Bearer ...)"))
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func writeError(w http.ResponseWriter, err error) {
	status := http.StatusInternalServerError
	var ae *apiError
	if errors.As(err, &ae) {
		status = ae.status
	}
	writeJSON(w, status, map[string]string{"error": err.Error()})
}

// sessionsReply is GET /admin/sessions.
type sessionsReply struct {
	Count    int                 `json:"count"`
	Sessions []proxy.SessionInfo `json:"sessions"`
}

func (a *app) handleSessions(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	ss := a.srv.Sessions(q.Get("user"), q.Get("backend"))
	if st := q.Get("state"); st != "" {
		ss = slices.DeleteFunc(ss, func(s proxy.SessionInfo) bool { return s.State != st })
	}
	slices.SortFunc(ss, func(x, y proxy.SessionInfo) int { return x.Started.Compare(y.Started) })
	if ss == nil {
		ss = []proxy.SessionInfo{}
	}
	writeJSON(w, http.StatusOK, sessionsReply{Count: len(ss), Sessions: ss})
}

// kickReply is POST /admin/users/{user}/kick.
type kickReply struct {
	User   string `json:"user"`
	Closed int    `json:"closed"`
}

func (a *app) handleKick(w http.ResponseWriter, r *http.Request) {
	user := routing.NormalizeUser(r.PathValue("user"))
	if user == "" {
		writeError(w, errorf(http.StatusBadRequest, "empty user name"))
		return
	}
	if d := a.directory(); d != nil {
		d.Forget(user) // the next login asks the directory again
	}
	n := a.srv.KickUser(user, "An administrator closed this session, please reconnect")
	a.metrics.adminAction("kick", nil)
	a.log.Info("admin: user kicked", zap.String("user", user), zap.Int("closed", n))
	writeJSON(w, http.StatusOK, kickReply{User: user, Closed: n})
}

// backendInfo is one backend in GET /admin/backends.
type backendInfo struct {
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

type backendsReply struct {
	Router   string        `json:"router"`
	Backends []backendInfo `json:"backends"`
}

// backends lists the router's backends; with sessions, counts this
// instance's spliced sessions on each (a pass over every session).
func (a *app) backends(sessions bool) []backendInfo {
	var out []backendInfo
	for _, b := range a.router.Backends(context.Background()) {
		bi := backendInfo{
			ID: b.ID, Addr: b.Addr, Security: b.Security.String(), Weight: b.Weight,
			Health: b.Health, Up: b.Up, Drain: b.Drain, Users: b.Users,
		}
		if !b.DownSince.IsZero() {
			t := b.DownSince
			bi.DownSince = &t
		}
		out = append(out, bi)
	}
	if sessions && a.srv != nil {
		count := map[string]int{}
		for _, s := range a.srv.Sessions("", "") {
			count[s.Backend]++
		}
		for i := range out {
			out[i].Sessions = count[out[i].ID]
		}
	}
	return out
}

func (a *app) routerName() string { return a.kind }

func (a *app) handleBackends(w http.ResponseWriter, _ *http.Request) {
	bs := a.backends(true)
	if bs == nil {
		bs = []backendInfo{}
	}
	writeJSON(w, http.StatusOK, backendsReply{Router: a.routerName(), Backends: bs})
}

func (a *app) findBackend(id string) (backendInfo, error) {
	for _, b := range a.backends(true) {
		if b.ID == id {
			return b, nil
		}
	}
	return backendInfo{}, errorf(http.StatusNotFound, "unknown backend %q", id)
}

// event is one line of a progress stream.
type event struct {
	// Event is the step: a progress step's name, "done" or "error".
	Event string `json:"event"`
	// Message says it for a person.
	Message string `json:"message"`
	// Result is set on "done".
	Result any `json:"result,omitempty"`
}

// progress writes a stream of events, flushing each.
type progress struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

func startProgress(w http.ResponseWriter) *progress {
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	return &progress{w: w, rc: http.NewResponseController(w)}
}

func (p *progress) send(ev event) {
	b, _ := json.Marshal(ev)
	p.w.Write(append(b, '\n'))
	p.rc.Flush()
}

func (p *progress) step(name, format string, args ...any) {
	p.send(event{Event: name, Message: fmt.Sprintf(format, args...)})
}

// moveRequest is the body of POST /admin/users/{user}/move.
type moveRequest struct {
	Backend string `json:"backend"`
}

// moveResult is the result of a finished move.
type moveResult struct {
	User    string   `json:"user"`
	Backend string   `json:"backend"`
	From    []string `json:"from"`
	Closed  int      `json:"closed"`
	Took    string   `json:"took"`
}

// handleMove pins the user to a backend in Consul and waits until this
// instance routes them there and their sessions elsewhere are closed.
// Every other imapgate closes its own sessions of the user when its watch
// sees the pin, normally within a second.
func (a *app) handleMove(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	user := routing.NormalizeUser(r.PathValue("user"))
	var req moveRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<16)).Decode(&req); err != nil {
		writeError(w, errorf(http.StatusBadRequest, "body: want {\"backend\": \"ID\"}: %v", err))
		return
	}
	switch {
	case user == "":
		writeError(w, errorf(http.StatusBadRequest, "empty user name"))
		return
	case req.Backend == "":
		writeError(w, errorf(http.StatusBadRequest, "no target backend"))
		return
	}
	target, err := a.findBackend(req.Backend)
	if err != nil {
		writeError(w, err)
		return
	}
	if !target.Up {
		writeError(w, errorf(http.StatusConflict, "backend %q is %s: refusing to move a user there", target.ID, target.Health))
		return
	}
	// The sessions to see closed: this instance's, elsewhere.
	before := map[string]string{}
	from := []string{}
	for _, s := range a.srv.Sessions(user, "") {
		if s.Backend != "" && s.Backend != target.ID {
			before[s.ID] = s.Backend
			if !slices.Contains(from, s.Backend) {
				from = append(from, s.Backend)
			}
		}
	}
	ctx, cancel := context.WithTimeout(r.Context(), adminTimeout)
	defer cancel()
	if err := a.router.Move(ctx, user, target.ID); err != nil {
		a.metrics.adminAction("move", err)
		writeError(w, errorf(http.StatusServiceUnavailable, "%v", err))
		return
	}
	a.log.Info("admin: user moved", zap.String("user", user), zap.String("backend", target.ID))
	p := startProgress(w)
	p.step("pinned", "pinned")
	left := func() int {
		n := 0
		for _, s := range a.srv.Sessions(user, "") {
			if _, ok := before[s.ID]; ok {
				n++
			}
		}
		return n
	}
	err = poll(ctx, func() bool { return left() == 0 })
	closed := len(before) - left()
	a.metrics.adminAction("move", err)
	if err != nil {
		p.step("error", "%d of %d sessions still open after %v", len(before)-closed, len(before), adminTimeout)
		return
	}
	p.step("closed", "%d %s closed", closed, plural(closed, "session", "sessions"))
	p.send(event{Event: "done", Message: "done", Result: moveResult{
		User: user, Backend: target.ID, From: from, Closed: closed, Took: time.Since(start).Round(time.Millisecond).String(),
	}})
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// poll calls cond every 50ms until it is true or ctx ends.
func poll(ctx context.Context, cond func() bool) error {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	return nil
}

// drainResult is the result of a finished drain or undrain.
type drainResult struct {
	Backend string `json:"backend"`
	Drain   bool   `json:"drain"`
	// Scope is "cluster" (a Consul KV flag every instance follows) or
	// "instance" (the static router's in-memory set).
	Scope    string `json:"scope"`
	Users    int    `json:"users"`
	Sessions int    `json:"sessions"`
	Note     string `json:"note,omitempty"`
}

// handleDrain drains or undrains a backend: no new users are placed
// there, its users stay until moved.
func (a *app) handleDrain(on bool) http.HandlerFunc {
	action := "drain"
	if !on {
		action = "undrain"
	}
	scope, note := "cluster", ""
	if a.kind == "static" {
		scope, note = "instance", "the static router's drains are per instance and lost on restart: drain every instance"
	}
	return func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		if _, err := a.findBackend(id); err != nil {
			writeError(w, err)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), adminTimeout)
		defer cancel()
		err := a.router.SetDrain(ctx, id, on)
		a.metrics.adminAction(action, err)
		switch {
		case errors.Is(err, routing.ErrLastInPool):
			writeError(w, errorf(http.StatusConflict, "cannot drain %q: %v", id, err))
			return
		case errors.Is(err, routing.ErrUnknownBackend):
			writeError(w, errorf(http.StatusNotFound, "%v", err))
			return
		case err != nil:
			writeError(w, errorf(http.StatusServiceUnavailable, "%v", err))
			return
		}
		a.log.Info("admin: "+action, zap.String("backend", id), zap.String("scope", scope))
		now, _ := a.findBackend(id)
		p := startProgress(w)
		if on {
			p.step("seen", "drained; %d %s recorded there, %d %s here",
				now.Users, plural(now.Users, "user", "users"), now.Sessions, plural(now.Sessions, "session", "sessions"))
		} else {
			p.step("seen", "undrained; new users may be placed there again")
		}
		p.send(event{Event: "done", Message: "done", Result: drainResult{
			Backend: id, Drain: on, Scope: scope, Users: now.Users, Sessions: now.Sessions, Note: note,
		}})
	}
}

// whereReply is GET /admin/users/{user}: where the user lives and why,
// and their live sessions on this instance.
type whereReply struct {
	routing.Placement
	Sessions []proxy.SessionInfo `json:"sessions"`
}

func (a *app) handleWhere(w http.ResponseWriter, r *http.Request) {
	user := routing.NormalizeUser(r.PathValue("user"))
	if user == "" {
		writeError(w, errorf(http.StatusBadRequest, "empty user name"))
		return
	}
	p, err := a.router.Where(r.Context(), user)
	if err != nil {
		writeError(w, errorf(http.StatusServiceUnavailable, "%v", err))
		return
	}
	ss := a.srv.Sessions(user, "")
	slices.SortFunc(ss, func(x, y proxy.SessionInfo) int { return x.Started.Compare(y.Started) })
	if ss == nil {
		ss = []proxy.SessionInfo{}
	}
	writeJSON(w, http.StatusOK, whereReply{Placement: p, Sessions: ss})
}

func (a *app) handleReload(w http.ResponseWriter, r *http.Request) {
	rep := a.reload(r.Context())
	a.metrics.adminAction("reload", map[bool]error{true: nil, false: errors.New(rep.Error)}[rep.Result == "applied"])
	status := http.StatusOK
	if rep.Result != "applied" {
		status = http.StatusUnprocessableEntity
	}
	writeJSON(w, status, rep)
}
