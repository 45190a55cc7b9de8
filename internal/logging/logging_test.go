package logging

import (
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// syncBuffer is the log file: what reached it, guarded against the
// buffer's flushing goroutine.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestOnlyProxySessionLinesWait: the proxy's lines below Warn wait in the
// buffer (until Sync or the flush interval); every other line, and the
// proxy's warnings, reach the file at once.
func TestOnlyProxySessionLinesWait(t *testing.T) {
	var out syncBuffer
	level := zap.NewAtomicLevelAt(zapcore.InfoLevel)
	log := build(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), &out, level)
	proxy := log.Named(Proxy).With(zap.String("listener", "imap"))

	proxy.Info("session ended")
	if strings.Contains(out.String(), "session ended") {
		t.Fatal("a proxy Info line was written through")
	}
	log.Info("reload applied")
	if !strings.Contains(out.String(), "reload applied") {
		t.Fatal("a process line waited in the buffer")
	}
	proxy.Warn("backend unavailable")
	if !strings.Contains(out.String(), "backend unavailable") {
		t.Fatal("a proxy warning waited in the buffer")
	}
	log.Debug("hidden")
	level.SetLevel(zapcore.DebugLevel)
	log.Debug("shown")
	if err := log.Sync(); err != nil {
		t.Fatal(err)
	}
	got := out.String()
	if !strings.Contains(got, "session ended") || !strings.Contains(got, `"listener":"imap"`) {
		t.Errorf("Sync did not flush the proxy line: %s", got)
	}
	if strings.Contains(got, "hidden") || !strings.Contains(got, "shown") {
		t.Errorf("the level did not follow its AtomicLevel: %s", got)
	}
}

// TestISOClockAsZap: the cached encoder writes what
// zapcore.ISO8601TimeEncoder writes, across seconds, milliseconds and
// zones, in either order (a line's time may be older than the last one's).
func TestISOClockAsZap(t *testing.T) {
	east := time.FixedZone("east", 5*3600+30*60)
	west := time.FixedZone("west", -8*3600)
	base := time.Date(2026, 12, 4, 23, 59, 59, 0, time.UTC)
	var c isoClock
	for _, tm := range []time.Time{
		base, base.Add(999 * time.Millisecond), base.Add(time.Second + 7*time.Millisecond),
		base.Add(12 * time.Millisecond), // back into the previous second
		base.In(east), base.Add(50 * time.Millisecond).In(west), base.Add(50 * time.Millisecond),
		time.Date(2026, 3, 29, 1, 59, 59, 999_999_999, time.Local), time.Date(2026, 3, 29, 3, 0, 0, 1e6, time.Local),
	} {
		want := zapcore.NewJSONEncoder(zapcore.EncoderConfig{TimeKey: "t", EncodeTime: zapcore.ISO8601TimeEncoder})
		got := zapcore.NewJSONEncoder(zapcore.EncoderConfig{TimeKey: "t", EncodeTime: c.encode})
		w, err := want.EncodeEntry(zapcore.Entry{Time: tm}, nil)
		if err != nil {
			t.Fatal(err)
		}
		g, err := got.EncodeEntry(zapcore.Entry{Time: tm}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if g.String() != w.String() {
			t.Errorf("%v: %s, want %s", tm, g, w)
		}
	}
}

// BenchmarkISOClock is what a line's time costs, cached and not.
func BenchmarkISOClock(b *testing.B) {
	for _, c := range []struct {
		name string
		enc  zapcore.TimeEncoder
	}{{"zap", zapcore.ISO8601TimeEncoder}, {"cached", new(isoClock).encode}} {
		b.Run(c.name, func(b *testing.B) {
			enc := zapcore.NewJSONEncoder(zapcore.EncoderConfig{TimeKey: "t", EncodeTime: c.enc})
			b.ReportAllocs()
			for b.Loop() {
				buf, _ := enc.EncodeEntry(zapcore.Entry{Time: time.Now()}, nil)
				buf.Free()
			}
		})
	}
}
