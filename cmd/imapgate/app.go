package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/imapgate/imapgate/internal/config"
	"github.com/imapgate/imapgate/proxy"
	"github.com/imapgate/imapgate/routing"
	igtls "github.com/imapgate/imapgate/tls"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// app holds the running pieces of one imapgate process.
type app struct {
	log     *zap.Logger
	cfg     *config.Config
	reg     *prometheus.Registry
	tls     *igtls.Manager
	router  routing.Router
	consul  *routing.Consul // nil with the static router
	evictor *lateEvictor
	srv     *proxy.Server
	metrics proxy.Metrics
	ready   atomic.Bool
	http    *http.Server
	deregFn func(context.Context) error
	closers []func()
}

func newApp(ctx context.Context, cfg *config.Config, log *zap.Logger) (*app, error) {
	a := &app{log: log, cfg: cfg, reg: prometheus.NewRegistry(), evictor: &lateEvictor{}}
	a.metrics = newMetrics(a.reg)
	tc := tlsConfig(cfg, cfg.Consul.Address)
	tc.Registerer = a.reg
	mgr, err := igtls.New(ctx, tc, log.Named("tls"))
	if err != nil {
		return nil, fmt.Errorf("tls: %w", err)
	}
	a.tls = mgr
	a.closers = append(a.closers, func() { mgr.Close() })
	if mgr.SelfSigned() {
		log.Warn("no certificate configured: serving a self-signed certificate (clients will warn); configure [tls] for production")
	}

	switch cfg.Routing.Router {
	case "", "static":
		r, err := cfg.StaticRouter()
		if err != nil {
			a.close()
			return nil, err
		}
		a.router = r
		log.Info("routing", zap.Stringer("router", r))
	case "consul":
		bt, err := cfg.BackendTLS()
		if err != nil {
			a.close()
			return nil, err
		}
		c, err := routing.NewConsul(ctx, routing.ConsulConfig{
			Address:    cfg.Consul.Address,
			Token:      cfg.Consul.Token,
			Datacenter: cfg.Consul.Datacenter,
			Service:    cfg.Consul.Service,
			Tag:        cfg.Consul.Tag,
			Prefix:     cfg.Consul.Prefix,
			BackendTLS: bt,
			Evictor:    a.evictor,
			Grace:      cfg.Consul.Grace.D(),
			PlaceRate:  cfg.Consul.PlaceRate,
			Logger:     log.Named("consul"),
			Registerer: a.reg,
		})
		if err != nil {
			a.close()
			return nil, fmt.Errorf("consul router: %w", err)
		}
		a.consul = c
		a.router = c
		a.closers = append(a.closers, func() { c.Close() })
		log.Info("routing", zap.Stringer("router", c))
	}
	return a, nil
}

func consulStorage(cfg *config.Config, addr string) igtls.ConsulStorageConfig {
	return igtls.ConsulStorageConfig{
		Address:    addr,
		Token:      cfg.Consul.Token,
		Datacenter: cfg.Consul.Datacenter,
		Prefix:     cfg.TLS.ACME.ConsulPrefix,
	}
}

// close releases everything newApp opened, last first.
func (a *app) close() {
	for i := len(a.closers) - 1; i >= 0; i-- {
		a.closers[i]()
	}
	a.closers = nil
}

// isReady reports whether this instance should get traffic: listeners
// up and a router with a usable view.
func (a *app) isReady() bool {
	if !a.ready.Load() {
		return false
	}
	if a.consul != nil {
		return a.consul.Ready()
	}
	return true
}

// startHTTP serves health, metrics and the admin API.
func (a *app) startHTTP(ctx context.Context) error {
	addr := a.cfg.HTTP.Addr
	if addr == "off" {
		return nil
	}
	if addr == "" {
		addr = "127.0.0.1:8080"
	}
	ln, err := listen(ctx, addr)
	if err != nil {
		return fmt.Errorf("http listener %s: %w", addr, err)
	}
	a.http = &http.Server{Handler: a.handler(), ReadHeaderTimeout: 10 * time.Second}
	a.log.Info("http listening", zap.String("addr", ln.Addr().String()))
	go a.serveHTTP(ln)
	return nil
}

func (a *app) serveHTTP(ln net.Listener) {
	if err := a.http.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		a.log.Error("http server failed", zap.Error(err))
	}
}

// register announces this instance in Consul when configured.
func (a *app) register(ctx context.Context, specs []config.ListenerSpec) error {
	rc := a.cfg.Consul.Register
	if !rc.Enable {
		return nil
	}
	client, err := a.cfg.ConsulClient()
	if err != nil {
		return err
	}
	ports := map[string]int{}
	for _, sp := range specs {
		_, p, _ := net.SplitHostPort(sp.Addr)
		n, _ := strconv.Atoi(p)
		name := sp.Listener.Mode.String()
		if name == "tls" {
			name = "imaps"
		} else {
			name = "imap"
		}
		if _, dup := ports[name]; dup {
			name = sp.Listener.Name
		}
		ports[name] = n
	}
	host, _ := os.Hostname()
	id := rc.ID
	if id == "" {
		id = "imapgate-" + host
	}
	name := rc.Name
	if name == "" {
		name = "imapgate"
	}
	check := rc.CheckHTTP
	if check == "" {
		haddr := a.cfg.HTTP.Addr
		if haddr == "" || haddr == "off" {
			haddr = "127.0.0.1:8080"
		}
		check = "http://" + haddr + "/readyz"
	}
	dereg, err := routing.Register(ctx, client, routing.RegisterConfig{
		Name: name, ID: id, Address: rc.Address, Ports: ports, Tags: rc.Tags, CheckHTTP: check,
	})
	if err != nil {
		return fmt.Errorf("consul registration: %w", err)
	}
	a.deregFn = dereg
	a.log.Info("registered in consul", zap.String("service", name), zap.String("id", id))
	return nil
}

// reload re-reads certificates on SIGHUP.
func (a *app) reload(f *flags) {
	if err := a.tls.Reload(); err != nil {
		a.log.Error("reload: certificates not reloaded, keeping the old ones", zap.Error(err))
		return
	}
	a.log.Info("reload: certificates reloaded")
}

// shutdown drains: deregister, stop accepting, let spliced sessions
// finish within the grace, then close what is left.
func (a *app) shutdown(cfg *config.Config) {
	a.ready.Store(false)
	if a.deregFn != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := a.deregFn(ctx); err != nil {
			a.log.Warn("consul deregistration failed", zap.Error(err))
		}
		cancel()
	}
	grace := shutdownGrace(cfg)
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	if err := a.srv.Shutdown(ctx); err != nil {
		a.log.Info("grace period over, closed the remaining sessions", zap.Duration("grace", grace))
	}
	if a.http != nil {
		hctx, hcancel := context.WithTimeout(context.Background(), 2*time.Second)
		a.http.Shutdown(hctx)
		hcancel()
	}
}
