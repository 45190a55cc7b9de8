package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"time"

	"github.com/imapgate/imapgate/internal/adminapi"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

// The admin API: the handlers of /admin/ (the paths and their JSON are
// listed in internal/adminapi). Every one goes through adminAuth
// (auth.go).

// apiError is an error with the HTTP status it is answered with.
type apiError struct {
	status int
	msg    string
}

func (e *apiError) Error() string { return e.msg }

func errorf(status int, format string, args ...any) error {
	return &apiError{status, fmt.Sprintf(format, args...)}
}

func (s *Server) adminRoutes() {
	h := func(pattern string, fn http.HandlerFunc) { s.mux.Handle(pattern, s.adminAuth(fn)) }
	h("GET /admin/sessions", s.handleSessions)
	h("POST /admin/users/{user}/kick", s.handleKick)
	h("POST /admin/users/{user}/move", s.handleMove)
	h("POST /admin/users/{user}/announce", s.handleAnnounce)
	h("GET /admin/users/{user}", s.handleWhere)
	h("GET /admin/backends", s.handleBackends)
	h("POST /admin/backends/{id}/drain", s.handleDrain(true))
	h("POST /admin/backends/{id}/undrain", s.handleDrain(false))
	h("POST /admin/reload", s.handleReload)
	h("GET /admin/version", s.handleVersion)
	h("/admin/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, errorf(http.StatusNotFound, "no such admin endpoint: %s %s", r.Method, r.URL.Path))
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
	writeJSON(w, status, adminapi.Error{Error: err.Error()})
}

func (s *Server) handleSessions(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	ss := s.sessions(q.Get("user"), q.Get("backend"))
	if st := q.Get("state"); st != "" {
		ss = slices.DeleteFunc(ss, func(s adminapi.Session) bool { return s.State != st })
	}
	writeJSON(w, http.StatusOK, adminapi.SessionsReply{Count: len(ss), Sessions: ss})
}

// sessions lists the live sessions of user and backend, oldest first,
// as the API shows them (never nil).
func (s *Server) sessions(user, backend string) []adminapi.Session {
	out := []adminapi.Session{}
	for _, in := range s.o.Sessions.Sessions(user, backend) {
		out = append(out, adminapi.Session{
			ID: in.ID, Client: in.Client, Listener: in.Listener, State: in.State, User: in.User, Backend: in.Backend,
			Started: in.Started, In: in.In, Out: in.Out, Duration: in.Duration,
		})
	}
	slices.SortFunc(out, func(x, y adminapi.Session) int { return x.Started.Compare(y.Started) })
	return out
}

func (s *Server) handleKick(w http.ResponseWriter, r *http.Request) {
	user := routing.NormalizeUser(r.PathValue("user"))
	if user == "" {
		writeError(w, errorf(http.StatusBadRequest, "empty user name"))
		return
	}
	if d := s.directory(); d != nil {
		d.Forget(user) // the next login asks the directory again
	}
	n := s.o.Sessions.KickUser(user, "An administrator closed this session, please reconnect")
	s.o.Metrics.AdminAction("kick", nil)
	s.log.Info("admin: user kicked", zap.String("user", user), zap.Int("closed", n))
	writeJSON(w, http.StatusOK, adminapi.KickReply{User: user, Closed: n})
}

// backends lists the router's backends and counts this instance's
// spliced sessions on each (a pass over every session).
func (s *Server) backends(ctx context.Context) []adminapi.Backend {
	out := []adminapi.Backend{}
	for _, b := range s.o.Router.Backends(ctx) {
		bi := adminapi.Backend{
			ID: b.ID, Addr: b.Addr, Security: b.Security.String(), Weight: b.Weight,
			Health: b.Health, Up: b.Up, Drain: b.Drain, Users: b.Users,
		}
		if !b.DownSince.IsZero() {
			t := b.DownSince
			bi.DownSince = &t
		}
		out = append(out, bi)
	}
	if len(out) > 0 {
		count := map[string]int{}
		for _, s := range s.o.Sessions.Sessions("", "") {
			count[s.Backend]++
		}
		for i := range out {
			out[i].Sessions = count[out[i].ID]
		}
	}
	return out
}

func (s *Server) handleBackends(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, adminapi.BackendsReply{Router: s.o.RouterKind, Backends: s.backends(r.Context())})
}

func (s *Server) findBackend(ctx context.Context, id string) (adminapi.Backend, error) {
	for _, b := range s.backends(ctx) {
		if b.ID == id {
			return b, nil
		}
	}
	return adminapi.Backend{}, errorf(http.StatusNotFound, "unknown backend %q", id)
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

func (p *progress) send(ev adminapi.Event) {
	b, _ := json.Marshal(ev)
	p.w.Write(append(b, '\n'))
	p.rc.Flush()
}

func (p *progress) step(name, format string, args ...any) {
	p.send(adminapi.Event{Event: name, Message: fmt.Sprintf(format, args...)})
}

// handleMove pins the user to a backend in Consul and waits until this
// instance routes them there and their sessions elsewhere are closed.
// Every other imapgate closes its own sessions of the user when its watch
// sees the pin, normally within a second.
func (s *Server) handleMove(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	user := routing.NormalizeUser(r.PathValue("user"))
	var req adminapi.MoveRequest
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
	target, err := s.findBackend(r.Context(), req.Backend)
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
	for _, ss := range s.o.Sessions.Sessions(user, "") {
		if ss.Backend != "" && ss.Backend != target.ID {
			before[ss.ID] = ss.Backend
			if !slices.Contains(from, ss.Backend) {
				from = append(from, ss.Backend)
			}
		}
	}
	ctx, cancel := context.WithTimeout(r.Context(), adminapi.Timeout)
	defer cancel()
	if err := s.o.Router.Move(ctx, user, target.ID); err != nil {
		s.o.Metrics.AdminAction("move", err)
		writeError(w, errorf(http.StatusServiceUnavailable, "%v", err))
		return
	}
	s.log.Info("admin: user moved", zap.String("user", user), zap.String("backend", target.ID))
	p := startProgress(w)
	p.step("pinned", "pinned")
	left := func() int {
		n := 0
		for _, ss := range s.o.Sessions.Sessions(user, "") {
			if _, ok := before[ss.ID]; ok {
				n++
			}
		}
		return n
	}
	err = routing.WaitFor(ctx, 50*time.Millisecond, func() bool { return left() == 0 })
	closed := len(before) - left()
	s.o.Metrics.AdminAction("move", err)
	if err != nil {
		p.step("error", "%d of %d sessions still open after %v", len(before)-closed, len(before), adminapi.Timeout)
		return
	}
	p.step("closed", "%d %s closed", closed, plural(closed, "session", "sessions"))
	p.send(adminapi.Event{Event: "done", Message: "done", Result: adminapi.MoveResult{
		User: user, Backend: target.ID, From: from, Closed: closed, Took: time.Since(start).Round(time.Millisecond).String(),
	}})
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// handleDrain drains or undrains a backend: no new users are placed
// there, its users stay until moved.
func (s *Server) handleDrain(on bool) http.HandlerFunc {
	action := "drain"
	if !on {
		action = "undrain"
	}
	scope, note := "cluster", ""
	if s.o.InstanceDrains {
		scope, note = "instance", "the static router's drains are per instance and lost on restart: drain every instance"
	}
	return func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		if _, err := s.findBackend(r.Context(), id); err != nil {
			writeError(w, err)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), adminapi.Timeout)
		defer cancel()
		err := s.o.Router.SetDrain(ctx, id, on)
		s.o.Metrics.AdminAction(action, err)
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
		s.log.Info("admin: "+action, zap.String("backend", id), zap.String("scope", scope))
		now, _ := s.findBackend(ctx, id)
		p := startProgress(w)
		if on {
			p.step("seen", "drained; %d %s recorded there, %d %s here",
				now.Users, plural(now.Users, "user", "users"), now.Sessions, plural(now.Sessions, "session", "sessions"))
		} else {
			p.step("seen", "undrained; new users may be placed there again")
		}
		p.send(adminapi.Event{Event: "done", Message: "done", Result: adminapi.DrainResult{
			Backend: id, Drain: on, Scope: scope, Users: now.Users, Sessions: now.Sessions, Note: note,
		}})
	}
}

func (s *Server) handleWhere(w http.ResponseWriter, r *http.Request) {
	user := routing.NormalizeUser(r.PathValue("user"))
	if user == "" {
		writeError(w, errorf(http.StatusBadRequest, "empty user name"))
		return
	}
	p, err := s.o.Router.Where(r.Context(), user)
	if err != nil {
		writeError(w, errorf(http.StatusServiceUnavailable, "%v", err))
		return
	}
	writeJSON(w, http.StatusOK, adminapi.WhereReply{Placement: p, Sessions: s.sessions(user, "")})
}

func (s *Server) handleReload(w http.ResponseWriter, r *http.Request) {
	rep := s.o.Instance.Reload(r.Context())
	status := http.StatusOK
	var err error
	if rep.Result != adminapi.Applied {
		status, err = http.StatusUnprocessableEntity, errors.New(rep.Error)
	}
	s.o.Metrics.AdminAction("reload", err)
	writeJSON(w, status, rep)
}

func (s *Server) handleVersion(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, adminapi.VersionReply{Version: s.o.Version, Started: s.o.Started, UptimeSeconds: time.Since(s.o.Started).Seconds()})
}
