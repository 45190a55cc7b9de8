package logging

import (
	"strings"
	"sync"
	"testing"

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
