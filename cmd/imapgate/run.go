package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/imapgate/imapgate/internal/config"
	"github.com/imapgate/imapgate/proxy"
	"github.com/imapgate/imapgate/routing"
	igtls "github.com/imapgate/imapgate/tls"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sys/unix"
)

func errField(err error) zap.Field { return zap.Error(err) }

// newLogger builds the process logger: JSON for machines, console on a
// terminal, as log.format says.
func newLogger(cfg *config.Config) (*zap.Logger, error) {
	level, err := cfg.LogLevel()
	if err != nil {
		return nil, err
	}
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, err
	}
	format := cfg.Log.Format
	if format == "" || format == "auto" {
		format = "json"
		if fi, err := os.Stderr.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
			format = "console"
		}
	}
	var zc zap.Config
	if format == "console" {
		zc = zap.NewDevelopmentConfig()
		zc.Development = false
		zc.EncoderConfig.EncodeLevel = zapcore.CapitalColorLevelEncoder
	} else {
		zc = zap.NewProductionConfig()
		zc.EncoderConfig.EncodeTime = zapcore.ISO8601TimeEncoder
		zc.Sampling = nil // every session's end line matters
	}
	zc.Level = zap.NewAtomicLevelAt(lvl)
	zc.DisableStacktrace = true
	return zc.Build()
}

// raiseOpenFileLimit raises the soft RLIMIT_NOFILE to the hard one: every
// proxied session holds two descriptors. It returns the limit in force.
func raiseOpenFileLimit(log *zap.Logger) uint64 {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		log.Warn("cannot read the open-file limit", zap.Error(err))
		return 0
	}
	if rl.Cur < rl.Max {
		old := rl.Cur
		rl.Cur = rl.Max
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
			log.Warn("cannot raise the open-file limit", zap.Uint64("soft", old), zap.Uint64("hard", rl.Max), zap.Error(err))
			return old
		}
		log.Info("raised the open-file limit", zap.Uint64("from", old), zap.Uint64("to", rl.Cur))
	} else {
		log.Info("open-file limit", zap.Uint64("limit", rl.Cur))
	}
	return rl.Cur
}

// listen opens a TCP listener with SO_REUSEPORT, so that a new imapgate
// can bind the same ports while an old one drains (zero-downtime upgrade).
func listen(ctx context.Context, addr string) (net.Listener, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		})
		return errors.Join(err, serr)
	}}
	return lc.Listen(ctx, "tcp", addr)
}

// tlsConfig maps the file's [tls] section onto the tls package.
func tlsConfig(cfg *config.Config, consulAddr string) igtls.Config {
	t := cfg.TLS
	c := igtls.Config{
		SelfSigned:   igtls.SelfSignedConfig{Names: t.SelfSigned, Disable: t.NoSelfSigned},
		MinVersion:   t.MinVersion,
		CipherSuites: t.CipherSuites,
	}
	for _, cf := range t.Certificates {
		c.Certificates = append(c.Certificates, igtls.CertFile{CertFile: cf.Cert, KeyFile: cf.Key})
	}
	a := t.ACME
	if len(a.Names) > 0 || len(a.OnDemandAllow) > 0 {
		c.ACME = igtls.ACMEConfig{
			Names:               a.Names,
			DirectoryURL:        a.Directory,
			Email:               a.Email,
			CARootFile:          a.CARoot,
			HTTP01:              igtls.HTTP01Config{Disable: a.NoHTTP01, Addr: a.HTTP01Addr},
			TLSALPN01:           igtls.TLSALPN01Config{Disable: a.NoTLSALPN01, Port: a.TLSALPN01Port},
			DisableOCSPStapling: a.NoOCSPStapling,
			Storage:             igtls.StorageConfig{Dir: a.StorageDir},
		}
		if len(a.OnDemandAllow) > 0 {
			c.ACME.OnDemand = &igtls.OnDemandConfig{Allow: a.OnDemandAllow}
		}
		if a.Storage == "consul" {
			c.ACME.Storage.Kind = igtls.StorageConsul
			c.ACME.Storage.Consul = consulStorage(cfg, consulAddr)
		}
	}
	return c
}

// lateEvictor lets the Consul router, built before the proxy, evict
// sessions of the proxy built after it.
type lateEvictor struct{ srv atomic.Pointer[proxy.Server] }

func (l *lateEvictor) EvictUser(user, keep string) int {
	if s := l.srv.Load(); s != nil {
		return s.EvictUser(user, keep)
	}
	return 0
}

func (l *lateEvictor) EvictBackend(id string) int {
	if s := l.srv.Load(); s != nil {
		return s.EvictBackend(id)
	}
	return 0
}

// run starts imapgate and blocks until a signal stops it.
func run(ctx context.Context, cfg *config.Config, f *flags, demo bool, log *zap.Logger) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	nofile := raiseOpenFileLimit(log)
	if demo {
		log.Info("no configuration given: running the embedded demo (see README; -config FILE for a real setup)")
		stop, err := startDemo(cfg, log)
		if err != nil {
			return err
		}
		defer stop()
		if err := cfg.Validate(); err != nil {
			return fmt.Errorf("demo configuration: %w", err)
		}
	}
	app, err := newApp(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer app.close()

	popts, err := cfg.ProxyOptions()
	if err != nil {
		return err
	}
	popts.Router = app.router
	popts.TLS = app.tls.ServerConfig()
	popts.Logger = log.Named("proxy")
	popts.Metrics = app.metrics
	if popts.Limits.MaxConnections == 0 && nofile > 200 {
		// Two descriptors a session, and room for the rest of the process.
		popts.Limits.MaxConnections = int(nofile-100) / 2
		log.Info("connection limit from the open-file limit", zap.Int("max_connections", popts.Limits.MaxConnections))
	}
	srv, err := proxy.NewServer(popts)
	if err != nil {
		return err
	}
	app.evictor.srv.Store(srv)
	app.srv = srv

	specs, err := cfg.Listeners()
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	serveErr := make(chan error, len(specs))
	for _, sp := range specs {
		ln, err := listen(ctx, sp.Addr)
		if err != nil {
			srv.Close()
			wg.Wait()
			return fmt.Errorf("listen %s: %w", sp.Addr, err)
		}
		log.Info("listening", zap.String("addr", ln.Addr().String()), zap.String("mode", sp.Listener.Mode.String()), zap.String("name", sp.Listener.Name))
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.Serve(ln, sp.Listener); !errors.Is(err, proxy.ErrServerClosed) {
				serveErr <- fmt.Errorf("listener %s: %w", sp.Addr, err)
			}
		}()
	}
	if err := app.startHTTP(ctx); err != nil {
		srv.Close()
		wg.Wait()
		return err
	}
	if err := app.register(ctx, specs); err != nil {
		srv.Close()
		wg.Wait()
		return err
	}
	app.ready.Store(true)

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	for {
		select {
		case err := <-serveErr:
			log.Error("listener failed, shutting down", zap.Error(err))
			app.shutdown(cfg)
			wg.Wait()
			return err
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				app.reload(f)
				continue
			}
			log.Info("shutting down", zap.String("signal", sig.String()))
			app.shutdown(cfg)
			wg.Wait()
			return nil
		}
	}
}

// shutdownGrace is how long spliced sessions may go on after SIGTERM.
func shutdownGrace(cfg *config.Config) time.Duration {
	if g := cfg.Shutdown.Grace.D(); g > 0 {
		return g
	}
	return 30 * time.Second
}

var _ routing.Evictor = (*lateEvictor)(nil)
