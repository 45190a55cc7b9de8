package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	_ "embed"
	"encoding/base64"
	"fmt"
	"html/template"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/imapgate/imapgate/proxy"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

// The status page: GET / on the HTTP listener, in the spirit of
// HAProxy's stats page. Server-rendered from status.html with
// html/template, no external assets; four lines of script (allowed by a
// per-request CSP nonce, nothing else runs) reload it every
// statusRefresh unless the search box has the focus, and a meta refresh
// does it without script. Same rules as the admin API (admin.go): the admin token
// when one is set (as a Bearer token, or as the password of HTTP Basic
// auth so that a browser can send it), and no cross-site requests.

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
	Version  buildVersion
	Started  time.Time
	Uptime   string
	Now      time.Time
	State    string // "ready", "starting", "draining"
	Router   string // routing.router
	RouterIs string // the router's own description
	Refresh  int    // seconds
	Nonce    string // the CSP nonce of the page's one script

	Listeners []statusListener
	Backends  []backendInfo
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
// With a router that implements routing.Operator (the directory routers
// here; every router once the placement work is merged) it is that
// router's Where: the backend, what is recorded, pins, the hash and the
// reason. With any other router it is the Route answer. Either way the
// user's live sessions here follow.
type statusWhere struct {
	User      string
	Next      string // the backend the next login goes to, or ""
	NextErr   string // why none
	Placement *routing.Placement
	Sessions  []proxy.SessionInfo
}

// statusRoutes serves the status page and GET /admin/version (version.go),
// which is registered here rather than in adminRoutes so that this file
// owns both.
func (a *app) statusRoutes(mux *http.ServeMux) {
	mux.Handle("GET /{$}", a.statusAuth(http.HandlerFunc(a.handleStatus)))
	mux.Handle("GET /admin/version", a.adminAuth(http.HandlerFunc(a.handleVersion)))
}

// statusAuth is adminAuth's rules for a page a browser opens: the token
// may also come as the password of HTTP Basic auth (any user name), and a
// missing one asks the browser for it.
func (a *app) statusAuth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Origin") != "" || r.Header.Get("Sec-Fetch-Site") == "cross-site" {
			http.Error(w, "cross-origin requests are refused", http.StatusForbidden)
			return
		}
		if token := a.cfg.Load().HTTP.AdminToken; token != "" {
			got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			if !ok {
				_, got, ok = r.BasicAuth()
			}
			want := sha256.Sum256([]byte(token))
			have := sha256.Sum256([]byte(got))
			if !ok || subtle.ConstantTimeCompare(want[:], have[:]) != 1 {
				w.Header().Set("WWW-Authenticate", `Basic realm="imapgate status (password: the admin token)", charset="UTF-8"`)
				http.Error(w, "missing or wrong admin token", http.StatusUnauthorized)
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

func (a *app) handleStatus(w http.ResponseWriter, r *http.Request) {
	p := a.statusData(r.Context(), strings.TrimSpace(r.URL.Query().Get("user")))
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
		a.log.Warn("status page", zap.Error(err))
	}
}

func (a *app) statusData(ctx context.Context, user string) *statusPage {
	cfg := a.cfg.Load()
	p := &statusPage{
		Version: currentVersion(), Started: started, Uptime: fmtDuration(time.Since(started)), Now: time.Now(),
		Router: cfg.Routing.Router.String(), Refresh: int(statusRefresh / time.Second), Query: user,
	}
	if r := a.routerInForce(); r != nil {
		p.RouterIs = fmt.Sprint(r)
	}
	switch {
	case a.draining.Load():
		p.State = "draining"
	case a.isReady() && a.snapshotAge() > 0:
		p.State = "degraded: serving from a snapshot of " + fmtDuration(a.snapshotAge()) // degraded.go
	case a.isReady():
		p.State = "ready"
	default:
		p.State = "starting"
	}
	var sessions []proxy.SessionInfo
	if a.srv != nil {
		sessions = a.srv.Sessions("", "")
	}
	p.Sessions = len(sessions)
	perListener := map[string]int{}
	for _, s := range sessions {
		perListener[s.Listener]++
	}
	if specs, err := cfg.Listeners(); err == nil {
		for i, sp := range specs {
			l := statusListener{Name: sp.Listener.Name, Addr: sp.Addr, Mode: sp.Listener.Mode.String()}
			if i < len(a.lnAddrs) {
				l.Addr = a.lnAddrs[i].String()
			}
			if l.Name == "" {
				l.Name = l.Addr
			}
			l.Sessions = perListener[l.Name]
			p.Listeners = append(p.Listeners, l)
		}
	}
	p.Backends = a.backends(true)
	if a.metrics != nil {
		p.LoginsPerMin, p.FailuresPerMin = a.metrics.rates.lastMinute()
	}
	if mgr := a.tlsMgr.Load(); mgr != nil {
		for _, e := range mgr.Expiry() {
			left := time.Until(e.NotAfter)
			p.Certs = append(p.Certs, statusCert{Name: e.Name, Source: e.Source.String(), NotAfter: e.NotAfter, Left: fmtDuration(left), Warn: left < 14*24*time.Hour})
		}
	}
	if c, ok := a.routerInForce().(interface{ ViewAge() time.Duration }); ok {
		p.Consul = true
		if age := c.ViewAge(); age > 0 {
			p.ConsulViewAge = fmtDuration(age)
		}
	}
	if d := a.directory(); d != nil {
		st := d.Stats()
		p.Directory = &st
	}
	if user != "" {
		p.Where = a.where(ctx, user)
	}
	return p
}

// where is the user search (see statusWhere).
func (a *app) where(ctx context.Context, user string) *statusWhere {
	user = routing.NormalizeUser(user)
	w := &statusWhere{User: user}
	if a.srv != nil {
		w.Sessions = a.srv.Sessions(user, "")
		slices.SortFunc(w.Sessions, func(x, y proxy.SessionInfo) int { return x.Started.Compare(y.Started) })
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if op, ok := a.routerInForce().(routing.Operator); ok {
		p, err := op.Where(ctx, user)
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
	b, err := a.router.Route(ctx, user)
	if err != nil {
		w.NextErr = err.Error()
	} else {
		w.Next = b.ID
	}
	return w
}

// loginRates counts logins and failed logins over the last minute, in
// one-second buckets, for the status page.
type loginRates struct {
	mu      sync.Mutex
	ok, bad [60]int
	stamp   [60]int64 // the Unix second each bucket counts
}

func (r *loginRates) add(ok bool) {
	now := time.Now().Unix()
	i := now % 60
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.stamp[i] != now {
		r.stamp[i], r.ok[i], r.bad[i] = now, 0, 0
	}
	if ok {
		r.ok[i]++
	} else {
		r.bad[i]++
	}
}

// login counts one result of promMetrics.Login: "ok" or a failure
// ("refused", "unavailable").
func (r *loginRates) login(result string) { r.add(result == "ok") }

func (r *loginRates) lastMinute() (ok, bad int) {
	now := time.Now().Unix()
	r.mu.Lock()
	defer r.mu.Unlock()
	for i := range r.stamp {
		if now-r.stamp[i] < 60 {
			ok += r.ok[i]
			bad += r.bad[i]
		}
	}
	return ok, bad
}
