package admin

import (
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/base64"
	"fmt"
	"html/template"
	"net/http"
	"strings"
	"time"

	"github.com/imapgate/imapgate/internal/adminapi"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

// The status page: GET / on the HTTP listener, in the spirit of
// HAProxy's stats page. Server-rendered from status.html with
// html/template, no external assets; four lines of script (allowed by a
// per-request CSP nonce, nothing else runs) reload it every
// statusRefresh unless the search box has the focus, and a meta refresh
// does it without script. Same rules as the admin API (auth.go): the
// admin token when one is set (as a Bearer token, or as the password of
// HTTP Basic auth so that a browser can send it), and no cross-site
// requests.

//go:embed status.html
var statusHTML string

var statusTmpl = template.Must(template.New("status").Funcs(template.FuncMap{
	"ago": func(t time.Time) string { return fmtDuration(time.Since(t)) },
	"dur": fmtDuration,
	"bytes": func(n int64) string {
		switch {
		case n >= 1<<20:
			return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
		case n >= 1<<10:
			return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
		}
		return fmt.Sprintf("%d B", n)
	},
}).Parse(statusHTML))

const statusRefresh = 10 * time.Second

// fmtDuration rounds d for people: "3d 4h", "5m 10s", "42s".
func fmtDuration(d time.Duration) string {
	neg := d < 0
	if neg {
		d = -d
	}
	var s string
	switch {
	case d >= 24*time.Hour:
		s = fmt.Sprintf("%dd %dh", d/(24*time.Hour), d%(24*time.Hour)/time.Hour)
	case d >= time.Hour:
		s = fmt.Sprintf("%dh %dm", d/time.Hour, d%time.Hour/time.Minute)
	case d >= time.Minute:
		s = fmt.Sprintf("%dm %ds", d/time.Minute, d%time.Minute/time.Second)
	default:
		s = fmt.Sprintf("%ds", d/time.Second)
	}
	if neg {
		return "-" + s
	}
	return s
}

// statusPage is what status.html renders.
type statusPage struct {
	Version  adminapi.Version
	Started  time.Time
	Uptime   string
	Now      time.Time
	State    string // "ready", "starting", "draining"
	Router   string // routing.router
	RouterIs string // the router's own description
	Refresh  int    // seconds
	Nonce    string // the CSP nonce of the page's one script

	Listeners []statusListener
	Backends  []adminapi.Backend
	Sessions  int

	LoginsPerMin, FailuresPerMin int
	Certs                        []statusCert

	Consul        bool
	ConsulViewAge string // "" when fresh
	Directory     *routing.DirectoryStats

	Query string // the user searched for
	Where *statusWhere
}

type statusListener struct {
	Name, Addr, Mode string
	Sessions         int
}

type statusCert struct {
	Name, Source string
	NotAfter     time.Time
	Left         string
	Warn         bool // under 14 days
}

// statusWhere is what the user search shows: `ctl where` for a browser.
// It is the router's Where (the backend, what is recorded, pins, the
// hash and the reason), then the user's live sessions here.
type statusWhere struct {
	User      string
	Next      string // the backend the next login goes to, or ""
	NextErr   string // why none
	Placement *routing.Placement
	Sessions  []adminapi.Session
}

func (s *Server) statusRoutes() {
	s.mux.Handle("GET /{$}", s.statusAuth(http.HandlerFunc(s.handleStatus)))
}

func (s *Server) handleStatus(w http.ResponseWriter, r *http.Request) {
	p := s.statusData(r.Context(), strings.TrimSpace(r.URL.Query().Get("user")))
	var nonce [16]byte
	rand.Read(nonce[:])
	p.Nonce = base64.StdEncoding.EncodeToString(nonce[:])
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	// Nothing on the page loads from anywhere or may be framed, and the
	// only script that runs is the page's own.
	w.Header().Set("Content-Security-Policy", "default-src 'none'; script-src 'nonce-"+p.Nonce+"'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("Referrer-Policy", "no-referrer")
	if err := statusTmpl.Execute(w, p); err != nil {
		s.log.Warn("status page", zap.Error(err))
	}
}

func (s *Server) statusData(ctx context.Context, user string) *statusPage {
	o := s.o
	p := &statusPage{
		Version: o.Version, Started: o.Started, Uptime: fmtDuration(time.Since(o.Started)), Now: time.Now(),
		Router: o.RouterKind, RouterIs: fmt.Sprint(o.Router), Refresh: int(statusRefresh / time.Second), Query: user,
	}
	switch ready := o.Instance.Ready(); {
	case o.Instance.Draining():
		p.State = "draining"
	case ready && s.snapshotAge() > 0:
		p.State = "degraded: serving from a snapshot of " + fmtDuration(s.snapshotAge())
	case ready:
		p.State = "ready"
	default:
		p.State = "starting"
	}
	sessions := o.Sessions.Sessions("", "")
	p.Sessions = len(sessions)
	perListener := map[string]int{}
	for _, ss := range sessions {
		perListener[ss.Listener]++
	}
	for _, l := range o.Listeners {
		sl := statusListener{Name: l.Name, Addr: l.Addr, Mode: l.Mode}
		if sl.Name == "" {
			sl.Name = sl.Addr
		}
		sl.Sessions = perListener[sl.Name]
		p.Listeners = append(p.Listeners, sl)
	}
	p.Backends = s.backends(ctx)
	p.LoginsPerMin, p.FailuresPerMin = o.Metrics.rates.lastMinute()
	if o.Certificates != nil {
		for _, e := range o.Certificates() {
			left := time.Until(e.NotAfter)
			p.Certs = append(p.Certs, statusCert{Name: e.Name, Source: e.Source.String(), NotAfter: e.NotAfter, Left: fmtDuration(left), Warn: left < 14*24*time.Hour})
		}
	}
	if c, ok := o.Router.(interface{ ViewAge() time.Duration }); ok {
		p.Consul = true
		if age := c.ViewAge(); age > 0 {
			p.ConsulViewAge = fmtDuration(age)
		}
	}
	if d := s.directory(); d != nil {
		st := d.Stats()
		p.Directory = &st
	}
	if user != "" {
		p.Where = s.where(ctx, user)
	}
	return p
}

// where is the user search (see statusWhere).
func (s *Server) where(ctx context.Context, user string) *statusWhere {
	user = routing.NormalizeUser(user)
	w := &statusWhere{User: user, Sessions: s.sessions(user, "")}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	p, err := s.o.Router.Where(ctx, user)
	switch {
	case err != nil:
		w.NextErr = err.Error()
	case p.Backend == "":
		w.NextErr = p.Reason
	default:
		w.Next = p.Backend
	}
	if err == nil {
		w.Placement = &p
	}
	return w
}
