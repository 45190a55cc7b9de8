package admin

import (
	"context"
	"testing"
	"time"

	"github.com/imapgate/imapgate/proxy"
	"github.com/imapgate/imapgate/routing"
	igtls "github.com/imapgate/imapgate/tls"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

func value(t *testing.T, c prometheus.Metric) float64 {
	t.Helper()
	var d dto.Metric
	if err := c.Write(&d); err != nil {
		t.Fatal(err)
	}
	switch {
	case d.Counter != nil:
		return d.Counter.GetValue()
	case d.Gauge != nil:
		return d.Gauge.GetValue()
	}
	t.Fatalf("%v is neither a counter nor a gauge", c.Desc())
	return 0
}

func count(c prometheus.Collector) int {
	ch := make(chan prometheus.Metric, 64)
	c.Collect(ch)
	close(ch)
	return len(ch)
}

func newTestMetrics(t testing.TB) *Metrics {
	return NewMetrics(prometheus.NewRegistry(), MetricsOptions{
		Ready:        func() bool { return true },
		Certificates: func() []igtls.CertExpiry { return nil },
		Backends:     func(context.Context) []routing.BackendStatus { return nil },
	})
}

// oneLogin makes the metric calls of one IMAP session that logs in,
// selects and logs out, as proxy.session does.
func oneLogin(m *Metrics, listener, backend string) {
	m.SessionState(listener, "", proxy.StateNone, proxy.StatePreAuth)
	m.PreAuthCommand("login")
	m.SessionState(listener, "", proxy.StatePreAuth, proxy.StateLogin)
	m.RouteLookup(3*time.Microsecond, true)
	m.BackendLogin(backend, 200*time.Microsecond, 900*time.Microsecond, true)
	m.Login("ok", "login")
	m.SessionState(listener, backend, proxy.StateLogin, proxy.StateSpliced)
	m.SessionState(listener, backend, proxy.StateSpliced, proxy.StateClosed)
	m.SessionEnded(listener, backend, proxy.EndClientClosed, 120, 4096, time.Second)
}

// TestMetricsOfSessions checks what sessions' calls leave in the
// vectors: a state's gauge back to zero once its sessions moved on, the
// spliced one counting the session still there, and the counters and
// histograms per label set.
func TestMetricsOfSessions(t *testing.T) {
	m := newTestMetrics(t)
	for range 3 {
		oneLogin(m, "imaps", "b1")
	}
	oneLogin(m, "imaps", "b2")
	m.SessionState("imaps", "", proxy.StateNone, proxy.StatePreAuth)
	m.SessionState("imaps", "", proxy.StatePreAuth, proxy.StateLogin)
	m.SessionState("imaps", "b1", proxy.StateLogin, proxy.StateSpliced)
	for _, c := range []struct {
		got  prometheus.Metric
		want float64
	}{
		{m.sessions.WithLabelValues("imaps", proxy.StateSpliced.String(), "b1"), 1},
		{m.sessions.WithLabelValues("imaps", proxy.StatePreAuth.String(), ""), 0},
		{m.sessions.WithLabelValues("imaps", proxy.StateLogin.String(), ""), 0},
		{m.ended.WithLabelValues("imaps", proxy.EndClientClosed.String()), 4},
		{m.bytes.WithLabelValues("b1", "in"), 360},
		{m.bytes.WithLabelValues("b2", "out"), 4096},
		{m.preauth.WithLabelValues("login"), 4},
		{m.logins.WithLabelValues("ok", "login"), 4},
	} {
		if got := value(t, c.got); got != c.want {
			t.Errorf("%v: %v, want %v", c.got.Desc(), got, c.want)
		}
	}
	if n := count(m.dial); n != 2 {
		t.Errorf("dial histograms: %d, want one per backend", n)
	}
	if n := count(m.login); n != 2 {
		t.Errorf("login histograms: %d, want one per backend", n)
	}
}

// BenchmarkLoginMetrics is what one login's metric calls cost.
func BenchmarkLoginMetrics(b *testing.B) {
	m := newTestMetrics(b)
	b.ReportAllocs()
	for b.Loop() {
		oneLogin(m, "imaps", "dovecot")
	}
}
