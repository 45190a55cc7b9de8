// Package admin is imapgate's operator surface: the HTTP handler of the
// ops listener, with the health checks, the Prometheus metrics, the admin
// API (internal/adminapi holds its JSON) and the status page.
//
//	GET /healthz   the process is alive
//	GET /readyz    it wants traffic: listeners up, router usable, not draining
//	GET /metrics   Prometheus
//	/admin/...     the admin API (admin.go), token and Host guarded (auth.go)
//	GET /          the status page (status.go)
//
// The package knows the running process only through the small
// interfaces it declares: the proxy's sessions (Sessions), the router's
// operations (routing.Operator), and the instance's state and reload
// (Instance). It starts nothing and owns no listener.
//
// Typical use, in the binary:
//
//	m := admin.NewMetrics(reg, admin.MetricsOptions{...}) // proxy.Options.Metrics
//	...
//	h := admin.New(admin.Options{Sessions: srv, Router: router, Instance: app, ...})
//	go http.Serve(ln, h)
package admin

import (
	"context"
	"net"
	"net/http"
	"time"

	"github.com/imapgate/imapgate/internal/adminapi"
	"github.com/imapgate/imapgate/proxy"
	"github.com/imapgate/imapgate/routing"
	igtls "github.com/imapgate/imapgate/tls"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
)

// Sessions is what the handlers need of the proxy server (*proxy.Server).
type Sessions interface {
	// Sessions lists the live sessions of user and backend ("" matches all).
	Sessions(user, backend string) []proxy.SessionInfo
	// KickUser closes user's sessions with reason and says how many.
	KickUser(user, reason string) int
}

// Instance is the running process as the operator sees it.
type Instance interface {
	// Ready reports whether the instance wants traffic: listeners up, not
	// draining, a router with a usable view.
	Ready() bool
	// Draining reports whether a shutdown has begun.
	Draining() bool
	// Reload re-reads the configuration, as SIGHUP does.
	Reload(ctx context.Context) adminapi.ReloadReport
}

// Access is who may use the admin API and the status page; a reload may
// change it, so it is asked for on every request.
type Access struct {
	// Token is http.admin_token: "" means none is asked for (and the
	// Host check guards a loopback API instead).
	Token string
	// Hosts are http.hosts: names a tokenless API answers besides its
	// address and localhost.
	Hosts []string
}

// Listener is one client listener, for the status page.
type Listener struct {
	Name, Addr, Mode string
}

// Options configure the handler. Every field is required unless it says
// otherwise.
type Options struct {
	Sessions Sessions
	// Router is the router in force. It may also have Ready() bool,
	// SnapshotAge() and ViewAge() time.Duration (the Consul router),
	// Stats() routing.DirectoryStats and Forget(user) (the directory
	// routers): the handlers use what it has.
	Router routing.Operator
	// RouterKind is routing.router as the file spells it.
	RouterKind string
	// InstanceDrains is true when the router's drains are this instance's
	// alone (the static router's in-memory set), not the cluster's.
	InstanceDrains bool
	Instance       Instance
	// Access is asked for on every request.
	Access func() Access
	// Addr is the address the ops listener is bound to, for the Host
	// check. Nil means any IP-address Host is accepted.
	Addr net.Addr
	// Listeners are the client listeners, in config order, for the status
	// page. Nil shows none.
	Listeners []Listener
	// Certificates are the certificates served now, for the status page.
	// Nil shows none.
	Certificates func() []igtls.CertExpiry
	// Gatherer is what /metrics serves.
	Gatherer prometheus.Gatherer
	// Metrics counts the admin actions and the logins of the status page.
	Metrics *Metrics
	// Version and Started are this process's, for /admin/version and the
	// status page.
	Version adminapi.Version
	Started time.Time
	// Logger receives the admin actions. Nil logs nothing.
	Logger *zap.Logger
}

// Server is the ops listener's handler.
type Server struct {
	o   Options
	log *zap.Logger
	mux *http.ServeMux
}

var _ http.Handler = (*Server)(nil)

// New builds the handler.
func New(o Options) *Server {
	s := &Server{o: o, log: o.Logger, mux: http.NewServeMux()}
	if s.log == nil {
		s.log = zap.NewNop()
	}
	s.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte("ok\n"))
	})
	s.mux.HandleFunc("GET /readyz", s.handleReady)
	s.mux.Handle("GET /metrics", promhttp.HandlerFor(o.Gatherer, promhttp.HandlerOpts{}))
	s.adminRoutes()
	s.statusRoutes()
	return s
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

func (s *Server) handleReady(w http.ResponseWriter, _ *http.Request) {
	if s.o.Instance.Draining() {
		http.Error(w, "draining", http.StatusServiceUnavailable)
		return
	}
	if !s.o.Instance.Ready() {
		http.Error(w, "not ready", http.StatusServiceUnavailable)
		return
	}
	if age := s.snapshotAge(); age > 0 {
		// A Consul router that started while Consul was unreachable serves
		// from its snapshot until Consul is back: ready, but degraded.
		w.Write([]byte("degraded: serving from a snapshot of " + fmtDuration(age) + " (consul unreachable since start-up; new placements are not recorded)\n"))
		return
	}
	w.Write([]byte("ready\n"))
}

// snapshotAge is how old the snapshot the router serves from is; zero
// when it is not serving from one.
func (s *Server) snapshotAge() time.Duration {
	if r, ok := s.o.Router.(interface{ SnapshotAge() time.Duration }); ok {
		return r.SnapshotAge()
	}
	return 0
}

// directory is the router's directory side (http, ldap), or nil.
func (s *Server) directory() interface {
	Stats() routing.DirectoryStats
	Forget(user string)
} {
	d, _ := s.o.Router.(interface {
		Stats() routing.DirectoryStats
		Forget(user string)
	})
	return d
}
