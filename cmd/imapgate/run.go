package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/imapgate/imapgate/internal/config"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sys/unix"
)

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
	if format == config.LogAuto {
		format = config.LogJSON
		if fi, err := os.Stderr.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
			format = config.LogConsole
		}
	}
	var zc zap.Config
	if format == config.LogConsole {
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
	return bufferedLogger(zc, format == config.LogConsole)
}

// The proxy's session lines are buffered: at a few hundred logins a
// second, two write(2) calls per session (its login line and its end
// line) were a tenth of a login's CPU. They reach the file within
// logFlushInterval, and at exit (main's log.Sync); every other line (start,
// reload, shutdown, drain: rare, and what operators and tests wait for)
// and everything from Warn up is written at once.
const (
	logBufferSize    = 64 << 10
	logFlushInterval = 250 * time.Millisecond
	// proxyLoggerName names the logger whose lines are buffered: the one
	// handed to the proxy (app.go).
	proxyLoggerName = "proxy"
)

// bufferedLogger builds what zc.Build would, with the output behind a
// zapcore.BufferedWriteSyncer.
func bufferedLogger(zc zap.Config, console bool) (*zap.Logger, error) {
	out, _, err := zap.Open(zc.OutputPaths...)
	if err != nil {
		return nil, err
	}
	errOut, _, err := zap.Open(zc.ErrorOutputPaths...)
	if err != nil {
		return nil, err
	}
	enc := zapcore.NewJSONEncoder(zc.EncoderConfig)
	if console {
		enc = zapcore.NewConsoleEncoder(zc.EncoderConfig)
	}
	// Flushing is not fsync(2): zap never synced a line before Error.
	ws := &zapcore.BufferedWriteSyncer{WS: zapcore.AddSync(struct{ io.Writer }{out}), Size: logBufferSize, FlushInterval: logFlushInterval}
	core := &flushCore{Core: zapcore.NewCore(enc, ws, zc.Level), ws: ws}
	return zap.New(&levelCore{Core: core, level: zc.Level}, zap.ErrorOutput(errOut), zap.AddCaller()), nil
}

// flushCore writes through at once every line but the proxy's session
// lines below Warn: what goes wrong must not wait in a buffer (or be lost
// with a crash), nor what an operator watches for.
type flushCore struct {
	zapcore.Core
	ws zapcore.WriteSyncer
}

func (c *flushCore) With(f []zapcore.Field) zapcore.Core {
	return &flushCore{Core: c.Core.With(f), ws: c.ws}
}

func (c *flushCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c *flushCore) Write(e zapcore.Entry, f []zapcore.Field) error {
	err := c.Core.Write(e, f)
	if e.Level >= zapcore.WarnLevel || e.LoggerName != proxyLoggerName {
		c.ws.Sync()
	}
	return err
}

// levelCore carries the logger's AtomicLevel so that a reload can change
// the level of the logger it was handed (there is no global logger to
// reach for). It filters nothing itself: the wrapped core already uses
// the same AtomicLevel.
type levelCore struct {
	zapcore.Core
	level zap.AtomicLevel
}

func (c *levelCore) With(f []zapcore.Field) zapcore.Core {
	return &levelCore{Core: c.Core.With(f), level: c.level}
}

// Check must be forwarded explicitly: the embedded core's Check would add
// itself, not the wrapper, to the entry.
func (c *levelCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	return c.Core.Check(e, ce)
}

// levelOf returns the level of a logger built by newLogger, else nil.
func levelOf(log *zap.Logger) *zap.AtomicLevel {
	if c, ok := log.Core().(*levelCore); ok {
		return &c.level
	}
	return nil
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
		ln, err := listen(ctx, sp.Addr)
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

// run starts imapgate and blocks until a signal stops it. SIGHUP reloads
// the configuration file and the certificates; SIGTERM and SIGINT drain.
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
	a, err := newApp(ctx, cfg, log)
	if err != nil {
		closeListeners(lns)
		return err
	}
	defer a.close()
	a.flags = f
	a.notify = newNotifier(os.Getenv)
	if err := a.start(ctx, nofile, lns); err != nil {
		return err
	}
	if err := a.notify.ready("serving"); err != nil {
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
				a.notify.reloading()
				a.Reload(context.Background())
				a.notify.ready("serving")
				continue
			}
			log.Info("shutting down", zap.String("signal", sig.String()))
			a.notify.stopping("draining")
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
