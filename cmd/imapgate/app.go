package main

import (
	"context"
	stdtls "crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imapgate/imapgate/routing/consul"

	"github.com/imapgate/imapgate/internal/admin"
	"github.com/imapgate/imapgate/internal/config"
	"github.com/imapgate/imapgate/internal/logging"
	"github.com/imapgate/imapgate/internal/sdnotify"
	"github.com/imapgate/imapgate/proxy"
	"github.com/imapgate/imapgate/routing"
	igtls "github.com/imapgate/imapgate/tls"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// app holds the running pieces of one imapgate process. What SIGHUP may
// replace sits behind an atomic pointer (the config in force, the TLS
// manager) or is replaced in place (the proxy's options, the static
// router's table: reload.go); the rest is fixed at start-up.
type app struct {
	log   *zap.Logger
	level *zap.AtomicLevel // log's: a reload sets it
	flags *flags           // nil in tests; reload needs flags.config
	// boot is the configuration the process started with: keys that only
	// a restart applies are compared against it, so a reload keeps
	// reporting them until the restart.
	boot *config.Config
	cfg  atomic.Pointer[config.Config] // in force

	reg     *prometheus.Registry
	metrics *admin.Metrics

	tlsMgr    atomic.Pointer[igtls.Manager]
	tlsServer atomic.Pointer[stdtls.Config] // tlsMgr's ServerConfig
	tlsProxy  *stdtls.Config                // what the proxy holds: forwards to tlsServer

	router  placement // the rules live in package routing
	evictor *proxy.LateEvictor
	srv     *proxy.Server
	popts   proxy.Options // as given to srv: reload keeps its Router, TLS, Logger, Metrics and derived limits

	ready    atomic.Bool
	draining atomic.Bool
	force    chan struct{} // closed to cut a drain short
	notify   *sdnotify.Notifier

	http     *http.Server
	httpAddr net.Addr   // nil if off
	lnAddrs  []net.Addr // the IMAP listeners, in config order
	serveWG  sync.WaitGroup
	serveErr chan error

	registration atomic.Pointer[consul.Registration] // nil when not registered

	reloadMu sync.Mutex // one reload at a time
	bg       sync.WaitGroup
	stopBG   context.CancelFunc
	closers  []func()
}

func newApp(ctx context.Context, cfg *config.Config, log *zap.Logger, level *zap.AtomicLevel) (*app, error) {
	a := &app{log: log, level: level, boot: cfg, reg: prometheus.NewRegistry(), evictor: &proxy.LateEvictor{},
		force: make(chan struct{})}
	a.cfg.Store(cfg)
	a.metrics = admin.NewMetrics(a.reg, admin.MetricsOptions{
		Ready:        a.Ready,
		Certificates: a.certificates,
		Backends: func(ctx context.Context) []routing.BackendStatus {
			if a.router == nil { // not built yet
				return nil
			}
			return a.router.Backends(ctx)
		},
		Version: currentVersion(),
	})

	mgr, err := a.newTLSManager(ctx, cfg)
	if err != nil {
		return nil, err
	}
	a.setTLS(mgr)
	a.closers = append(a.closers, func() { a.tlsMgr.Load().Close() })
	a.tlsProxy = &stdtls.Config{GetConfigForClient: a.tlsForClient}
	if err := a.startTicketKeys(ctx, cfg); err != nil {
		a.close()
		return nil, err
	}

	r, err := a.newRouter(ctx, cfg, a.evictor)
	if err != nil {
		a.close()
		return nil, err
	}
	a.router = r
	log.Info("routing", zap.String("router", fmt.Sprint(a.router)))
	return a, nil
}

// newTLSManager builds a certificate manager for cfg's [tls]. Its expiry
// gauge is not registered by the manager itself: the app exports the
// expiry of whichever manager is in force (certificates), since a reload
// may replace the manager.
func (a *app) newTLSManager(ctx context.Context, cfg *config.Config) (*igtls.Manager, error) {
	mgr, err := igtls.New(ctx, cfg.TLSOptions(), a.log.Named("tls"))
	if err != nil {
		return nil, fmt.Errorf("tls: %w", err)
	}
	if mgr.SelfSigned() {
		a.log.Warn("no certificate configured: serving a self-signed certificate (clients will warn); configure [tls] for production")
	}
	return mgr, nil
}

func (a *app) setTLS(mgr *igtls.Manager) {
	a.tlsServer.Store(mgr.ServerConfig())
	a.tlsMgr.Store(mgr)
}

// tlsForClient hands every handshake the configuration of the manager in
// force. crypto/tls only consults the outer config's GetConfigForClient,
// so the manager's own hook (TLS-ALPN-01 challenges) is called from here.
func (a *app) tlsForClient(hello *stdtls.ClientHelloInfo) (*stdtls.Config, error) {
	c := a.tlsServer.Load()
	if c.GetConfigForClient != nil {
		if cc, err := c.GetConfigForClient(hello); cc != nil || err != nil {
			return cc, err
		}
	}
	return c, nil
}

// certificates are the certificates of the manager in force.
func (a *app) certificates() []igtls.CertExpiry {
	if mgr := a.tlsMgr.Load(); mgr != nil {
		return mgr.Expiry()
	}
	return nil
}

// close releases everything newApp and start opened, last first.
func (a *app) close() {
	if a.stopBG != nil {
		a.stopBG()
		a.bg.Wait()
	}
	for i := len(a.closers) - 1; i >= 0; i-- {
		a.closers[i]()
	}
	a.closers = nil
}

// Ready reports whether this instance should get traffic: listeners
// up, not draining, and a router with a usable view.
func (a *app) Ready() bool {
	if !a.ready.Load() || a.draining.Load() {
		return false
	}
	if r, ok := a.router.(interface{ Ready() bool }); ok {
		return r.Ready()
	}
	return true
}

// Draining reports whether the shutdown has begun.
func (a *app) Draining() bool { return a.draining.Load() }

// start builds the proxy, opens the listeners, the HTTP server and the
// Consul registration. Errors leave nothing running but what close
// releases.
func (a *app) start(ctx context.Context, nofile uint64, lns []boundListener) (err error) {
	served := 0
	defer func() {
		if err != nil {
			for _, bl := range lns[served:] {
				bl.ln.Close()
			}
		}
	}()
	cfg := a.cfg.Load()
	popts, err := cfg.ProxyOptions()
	if err != nil {
		return err
	}
	popts.Router = a.router
	popts.TLS = a.tlsProxy
	popts.Logger = a.log.Named(logging.Proxy)
	popts.Metrics = a.metrics
	if popts.Limits.MaxConnections == 0 && nofile > 200 {
		// Two descriptors a session, and room for the rest of the process.
		popts.Limits.MaxConnections = int(nofile-100) / 2
		a.log.Info("connection limit from the open-file limit", zap.Int("max_connections", popts.Limits.MaxConnections))
	}
	a.popts = popts
	srv, err := proxy.NewServer(popts)
	if err != nil {
		return err
	}
	a.evictor.Set(srv)
	a.srv = srv
	a.closers = append(a.closers, func() { srv.Close(); a.serveWG.Wait() })

	specs := make([]config.ListenerSpec, len(lns))
	a.serveErr = make(chan error, len(lns))
	for i, bl := range lns {
		sp, ln := bl.spec, bl.ln
		specs[i] = sp
		served++
		a.lnAddrs = append(a.lnAddrs, ln.Addr())
		a.log.Info("listening", zap.String("addr", ln.Addr().String()), zap.String("mode", sp.Listener.Mode.String()), zap.String("name", sp.Listener.Name))
		a.serveWG.Add(1)
		go a.serve(ln, sp)
	}
	if err := a.startHTTP(ctx, specs); err != nil {
		return err
	}
	bgctx, cancel := context.WithCancel(context.Background())
	a.stopBG = cancel
	if err := a.register(ctx, specs); err != nil {
		if r, ok := a.router.(interface{ SnapshotAge() time.Duration }); !ok || r.SnapshotAge() == 0 {
			return err
		}
		// Serving from the Consul snapshot: register once Consul is back.
		a.log.Warn("consul registration failed; retrying in the background while serving from the snapshot", zap.Error(err))
		a.bg.Add(1)
		go func() { defer a.bg.Done(); a.registerLater(bgctx, specs) }()
	}
	if reg := a.registration.Load(); reg != nil {
		a.bg.Add(1)
		go func() { defer a.bg.Done(); reg.Keep(bgctx, 5*time.Second) }()
	}
	a.bg.Add(1)
	go func() { defer a.bg.Done(); a.notify.RunWatchdog(bgctx) }()
	a.ready.Store(true)
	return nil
}

func (a *app) serve(ln net.Listener, sp config.ListenerSpec) {
	defer a.serveWG.Done()
	if err := a.srv.Serve(ln, sp.Listener); !errors.Is(err, proxy.ErrServerClosed) {
		a.serveErr <- fmt.Errorf("listener %s: %w", sp.Addr, err)
	}
}

// startHTTP serves health, metrics, the admin API and the status page.
func (a *app) startHTTP(ctx context.Context, specs []config.ListenerSpec) error {
	addr := a.cfg.Load().HTTP.ListenAddr()
	if addr == "" {
		return nil
	}
	ln, err := listen(ctx, addr, false)
	if err != nil {
		return fmt.Errorf("http listener %s: %w", addr, err)
	}
	a.httpAddr = ln.Addr()
	a.http = &http.Server{Handler: a.adminHandler(specs), ReadHeaderTimeout: 10 * time.Second}
	a.log.Info("http listening", zap.String("addr", ln.Addr().String()))
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := a.http.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("http server failed", zap.Error(err))
		}
	}()
	a.closers = append(a.closers, func() { a.http.Close(); <-done })
	return nil
}

// adminHandler is the HTTP listener's handler (internal/admin), over
// this app's proxy, router and listeners (specs, bound at lnAddrs).
func (a *app) adminHandler(specs []config.ListenerSpec) http.Handler {
	lns := make([]admin.Listener, len(specs))
	for i, sp := range specs {
		lns[i] = admin.Listener{Name: sp.Listener.Name, Addr: a.lnAddrs[i].String(), Mode: sp.Listener.Mode.String()}
	}
	kind := a.boot.Routing.Router // restart-only
	return admin.New(admin.Options{
		Sessions:       a.srv,
		Router:         a.router,
		RouterKind:     kind.String(),
		InstanceDrains: kind == config.RouterStatic,
		Instance:       a,
		Access: func() admin.Access {
			h := a.cfg.Load().HTTP
			return admin.Access{Token: h.AdminToken, Hosts: h.Hosts}
		},
		Addr:         a.httpAddr,
		Listeners:    lns,
		Certificates: a.certificates,
		Gatherer:     a.reg,
		Metrics:      a.metrics,
		Version:      currentVersion(),
		Started:      started,
		Logger:       a.log,
	})
}
