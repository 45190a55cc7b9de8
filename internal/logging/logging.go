// Package logging builds imapgate's process logger: zap, JSON for
// machines or the console encoding for people, at a level a reload may
// change, with the proxy's per-session lines buffered.
//
// Typical use:
//
//	log, level, err := logging.New(zapcore.InfoLevel, false)
//	defer log.Sync()                    // flushes the buffered lines
//	proxyLog := log.Named(logging.Proxy) // the buffered one
//	level.SetLevel(zapcore.DebugLevel)  // a reload
//
// There is no global logger: the one built here is passed down.
package logging

import (
	"io"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// The proxy's session lines are buffered: at a few hundred logins a
// second, two write(2) calls per session (its login line and its end
// line) were a tenth of a login's CPU. They reach the file within
// flushInterval, and at exit (Sync); every other line (start, reload,
// shutdown, drain: rare, and what operators and tests wait for) and
// everything from Warn up is written at once.
const (
	bufferSize    = 64 << 10
	flushInterval = 250 * time.Millisecond
	// Proxy names the logger whose lines below Warn are buffered: the
	// one to hand to the proxy.
	Proxy = "proxy"
)

// New builds the process logger at level, in zap's console encoding if
// console, else JSON. The level it returns is the logger's own: setting
// it changes what the logger (and every logger derived from it) writes.
func New(level zapcore.Level, console bool) (*zap.Logger, *zap.AtomicLevel, error) {
	var zc zap.Config
	if console {
		zc = zap.NewDevelopmentConfig()
		zc.Development = false
		zc.EncoderConfig.EncodeLevel = zapcore.CapitalColorLevelEncoder
	} else {
		zc = zap.NewProductionConfig()
		zc.EncoderConfig.EncodeTime = new(isoClock).encode
		zc.Sampling = nil // every session's end line matters
	}
	zc.Level = zap.NewAtomicLevelAt(level)
	zc.DisableStacktrace = true
	out, _, err := zap.Open(zc.OutputPaths...)
	if err != nil {
		return nil, nil, err
	}
	errOut, _, err := zap.Open(zc.ErrorOutputPaths...)
	if err != nil {
		return nil, nil, err
	}
	enc := zapcore.NewJSONEncoder(zc.EncoderConfig)
	if console {
		enc = zapcore.NewConsoleEncoder(zc.EncoderConfig)
	}
	return build(enc, out, zc.Level, zap.ErrorOutput(errOut), zap.AddCaller()), &zc.Level, nil
}

// build is the logger over out, its proxy lines buffered.
func build(enc zapcore.Encoder, out io.Writer, level zap.AtomicLevel, opts ...zap.Option) *zap.Logger {
	// Flushing is not fsync(2): zap never synced a line before Error.
	ws := &zapcore.BufferedWriteSyncer{WS: zapcore.AddSync(struct{ io.Writer }{out}), Size: bufferSize, FlushInterval: flushInterval}
	core := &flushCore{Core: zapcore.NewCore(enc, ws, level), ws: ws}
	return zap.New(core, opts...)
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
	if e.Level >= zapcore.WarnLevel || e.LoggerName != Proxy {
		c.ws.Sync()
	}
	return err
}
