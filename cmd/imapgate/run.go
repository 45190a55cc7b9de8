package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/imapgate/imapgate/internal/gcpolicy"
	"github.com/imapgate/imapgate/proxy"

	"github.com/imapgate/imapgate/internal/config"
	"github.com/imapgate/imapgate/internal/logging"
	"github.com/imapgate/imapgate/internal/sdnotify"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sys/unix"
)

// run starts imapgate and blocks until a signal stops it. SIGHUP reloads
// the configuration file and the certificates; SIGTERM and SIGINT drain.
func run(ctx context.Context, cfg *config.Config, f *flags, demo bool, log *zap.Logger, level *zap.AtomicLevel) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	nofile := raiseOpenFileLimit(log)
	if gc := gcpolicy.Start(gcpolicy.Options{MaxHeadroom: cfg.Runtime.GCHeadroom()}); gc != nil {
		defer gc.Stop()
	} else if gcpolicy.Chosen() {
		log.Info("GOGC or GOMEMLIMIT set: the collector's policy is the environment's")
	}
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
	// Signals are caught before anything listens, so that a SIGTERM during
	// start-up is a clean stop, not the default death.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)

	// The IMAP ports are bound before the certificates start: CertMagic's
	// TLS-ALPN-01 solver binds a port itself when nothing local listens
	// there, and a CA validating at once would then take ours.
	lns, err := bindListeners(ctx, cfg)
	if err != nil {
		return err
	}
	a, err := newApp(ctx, cfg, log, level)
	if err != nil {
		closeListeners(lns)
		return err
	}
	defer a.close()
	a.flags = f
	a.notify = sdnotify.New(os.Getenv)
	if err := a.start(ctx, nofile, lns); err != nil {
		return err
	}
	if err := a.notify.Ready("serving"); err != nil {
		log.Warn("cannot tell systemd we are ready", zap.Error(err))
	}

	for {
		select {
		case err := <-a.serveErr:
			log.Error("listener failed, shutting down", zap.Error(err))
			a.shutdown()
			return err
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				a.notify.Reloading()
				a.Reload(context.Background())
				a.notify.Ready("serving")
				continue
			}
			log.Info("shutting down", zap.String("signal", sig.String()))
			a.notify.Stopping("draining")
			done := make(chan struct{})
			go a.forceOnSecondSignal(sigs, done)
			a.shutdown()
			close(done)
			return nil
		}
	}
}

// forceOnSecondSignal cuts a drain short: a second SIGTERM or SIGINT (an
// impatient operator's second Ctrl-C) closes every session at once.
func (a *app) forceOnSecondSignal(sigs <-chan os.Signal, done <-chan struct{}) {
	for {
		select {
		case <-done:
			return
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				a.log.Info("reload ignored while draining")
				continue
			}
			a.log.Warn("second signal: closing every session now", zap.String("signal", sig.String()))
			close(a.force)
			return
		}
	}
}

// newLogger builds the process logger as [log] says: JSON for machines,
// console on a terminal.
func newLogger(cfg *config.Config) (*zap.Logger, *zap.AtomicLevel, error) {
	level, err := cfg.LogLevel()
	if err != nil {
		return nil, nil, err
	}
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, nil, err
	}
	console := cfg.Log.Format == config.LogConsole
	if cfg.Log.Format == config.LogAuto {
		fi, err := os.Stderr.Stat()
		console = err == nil && fi.Mode()&os.ModeCharDevice != 0
	}
	return logging.New(lvl, console)
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
// Keep-alive is left to the proxy (Timeouts.KeepAlive), which sets it on
// each connection it serves.
//
// clientFirst (an implicit-TLS listener: the client's ClientHello comes
// before anything imapgate says) sets TCP_DEFER_ACCEPT: the kernel hands
// the connection over once its first bytes are there, so the session's
// first read finds them instead of waiting for them (one wake-up less
// per login). Never on a listener whose clients wait for a greeting.
func listen(ctx context.Context, addr string, clientFirst bool) (net.Listener, error) {
	lc := net.ListenConfig{KeepAlive: -1, Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
			if serr == nil && clientFirst {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 1)
			}
		})
		return errors.Join(err, serr)
	}}
	return lc.Listen(ctx, "tcp", addr)
}

// boundListener is an IMAP listener opened before the rest starts.
type boundListener struct {
	spec config.ListenerSpec
	ln   net.Listener
}

// bindListeners opens every [[listen]] address.
func bindListeners(ctx context.Context, cfg *config.Config) ([]boundListener, error) {
	specs, err := cfg.Listeners()
	if err != nil {
		return nil, err
	}
	var out []boundListener
	for _, sp := range specs {
		ln, err := listen(ctx, sp.Addr, sp.Listener.Mode == proxy.ImplicitTLS)
		if err != nil {
			closeListeners(out)
			return nil, fmt.Errorf("listen %s: %w", sp.Addr, err)
		}
		out = append(out, boundListener{spec: sp, ln: ln})
	}
	return out, nil
}

func closeListeners(lns []boundListener) {
	for _, bl := range lns {
		bl.ln.Close()
	}
}
