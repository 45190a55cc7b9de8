package main

import (
	"time"

	"github.com/imapgate/imapgate/proxy"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// promMetrics implements proxy.Metrics with Prometheus collectors.
type promMetrics struct {
	sessions *prometheus.GaugeVec
	ended    *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	preauth  *prometheus.CounterVec
	logins   *prometheus.CounterVec
	dial     *prometheus.HistogramVec
	login    *prometheus.HistogramVec
	route    *prometheus.HistogramVec
	limits   *prometheus.CounterVec
	lmtp     *prometheus.CounterVec // protocols.go

	// Operations, counted by the app rather than the proxy.
	reloads    *prometheus.CounterVec
	lastReload prometheus.Gauge
	admin      *prometheus.CounterVec

	// rates counts the last minute's logins for the status page.
	rates loginRates

	// all is everything registered, for tests that check names.
	all []prometheus.Collector
}

// newMetrics registers the proxy's metrics and the process's own on reg.
// The Consul router registers imapgate_consul_* itself (view age, watch
// errors, placements, evictions).
func newMetrics(reg prometheus.Registerer, a *app) *promMetrics {
	m := &promMetrics{
		sessions: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "imapgate_sessions", Help: "Live client sessions by listener, state and backend."}, []string{"listener", "state", "backend"}),
		ended:    prometheus.NewCounterVec(prometheus.CounterOpts{Name: "imapgate_sessions_ended_total", Help: "Sessions ended, by listener and how they ended."}, []string{"listener", "reason"}),
		bytes:    prometheus.NewCounterVec(prometheus.CounterOpts{Name: "imapgate_bytes_total", Help: "Bytes spliced, by backend and direction (in: client to backend)."}, []string{"backend", "direction"}),
		preauth:  prometheus.NewCounterVec(prometheus.CounterOpts{Name: "imapgate_preauth_commands_total", Help: "Commands answered before login, by command."}, []string{"command"}),
		logins:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "imapgate_logins_total", Help: "Login attempts by result and reason."}, []string{"result", "reason"}),
		dial:     prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "imapgate_backend_dial_seconds", Help: "Time to connect to a backend.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}, []string{"backend"}),
		login:    prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "imapgate_backend_login_seconds", Help: "Time of the backend login exchange after connecting.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}, []string{"backend", "result"}),
		route:    prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "imapgate_route_lookup_seconds", Help: "Time to find a user's backend.", Buckets: prometheus.ExponentialBuckets(0.000001, 4, 12)}, []string{"result"}),
		limits:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "imapgate_limit_hits_total", Help: "Times a limit refused or ended a client, by limit."}, []string{"limit"}),
	}
	m.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "imapgate_config_reloads_total", Help: "Configuration reloads (SIGHUP or the admin API) by result: applied or refused."}, []string{"result"})
	m.lastReload = prometheus.NewGauge(prometheus.GaugeOpts{Name: "imapgate_config_last_reload_success_timestamp_seconds", Help: "When the configuration was last loaded successfully (start-up or reload), as a Unix time."})
	m.admin = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "imapgate_admin_actions_total", Help: "Admin API actions by action (kick, drain, undrain, move, reload) and result (ok, error)."}, []string{"action", "result"})
	m.lastReload.SetToCurrentTime()
	m.lmtp = newLMTPCounter()
	m.all = []prometheus.Collector{m.sessions, m.ended, m.bytes, m.preauth, m.logins, m.dial, m.login, m.route, m.limits, m.lmtp,
		m.reloads, m.lastReload, m.admin,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		buildInfo(),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "imapgate_ready", Help: "1 while this instance wants traffic (/readyz answers 200), 0 while starting or draining."},
			func() float64 { return b2f(a.isReady()) }),
		&tlsExpiryCollector{a: a, desc: prometheus.NewDesc(
			"imapgate_tls_certificate_expiry_timestamp_seconds",
			"NotAfter of the certificate served for a name, as a Unix time.",
			[]string{"name", "source"}, nil)},
		&backendCollector{a: a,
			up:    prometheus.NewDesc("imapgate_backend_up", "1 if the router may send users to the backend (Consul: passing or warning and not gone; static: always).", []string{"backend"}, nil),
			drain: prometheus.NewDesc("imapgate_backend_draining", "1 if the backend takes no new users.", []string{"backend"}, nil),
		},
	}
	reg.MustRegister(m.all...)
	return m
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func (m *promMetrics) reload(result string) {
	m.reloads.WithLabelValues(result).Inc()
	if result == "applied" {
		m.lastReload.SetToCurrentTime()
	}
}

func (m *promMetrics) adminAction(action string, err error) {
	r := "ok"
	if err != nil {
		r = "error"
	}
	m.admin.WithLabelValues(action, r).Inc()
}

// buildInfo is the conventional constant 1 labelled with the version.
func buildInfo() prometheus.Collector {
	v := currentVersion()
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "imapgate_build_info",
		Help:        "Always 1; the labels say which imapgate is running.",
		ConstLabels: prometheus.Labels{"version": v.Version, "commit": v.Commit, "goversion": v.GoVersion},
	})
	g.Set(1)
	return g
}

// tlsExpiryCollector exports the expiry of the certificates of whichever
// tls.Manager is in force: a reload may replace the manager, and two
// managers cannot register the same metric.
type tlsExpiryCollector struct {
	a    *app
	desc *prometheus.Desc
}

func (c *tlsExpiryCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *tlsExpiryCollector) Collect(ch chan<- prometheus.Metric) {
	mgr := c.a.tlsMgr.Load()
	if mgr == nil {
		return
	}
	for _, e := range mgr.Expiry() {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(e.NotAfter.Unix()), e.Name, e.Source.String())
	}
}

// backendCollector exports each backend's state as the admin API sees it.
type backendCollector struct {
	a         *app
	up, drain *prometheus.Desc
}

func (c *backendCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.up; ch <- c.drain }

func (c *backendCollector) Collect(ch chan<- prometheus.Metric) {
	if c.a.router == nil {
		return
	}
	for _, b := range c.a.backends(false) {
		ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, b2f(b.Up), b.ID)
		ch <- prometheus.MustNewConstMetric(c.drain, prometheus.GaugeValue, b2f(b.Drain), b.ID)
	}
}

var _ proxy.Metrics = (*promMetrics)(nil)

func (m *promMetrics) SessionState(listener, backend string, from, to proxy.State) {
	if from != proxy.StateNone {
		fb := backend
		if from != proxy.StateSpliced {
			fb = ""
		}
		m.sessions.WithLabelValues(listener, from.String(), fb).Dec()
	}
	if to != proxy.StateClosed {
		tb := backend
		if to != proxy.StateSpliced {
			tb = ""
		}
		m.sessions.WithLabelValues(listener, to.String(), tb).Inc()
	}
}

func (m *promMetrics) SessionEnded(listener, backend string, reason proxy.EndReason, in, out int64, _ time.Duration) {
	m.ended.WithLabelValues(listener, reason.String()).Inc()
	if backend != "" {
		m.bytes.WithLabelValues(backend, "in").Add(float64(in))
		m.bytes.WithLabelValues(backend, "out").Add(float64(out))
	}
}

func (m *promMetrics) PreAuthCommand(name string) { m.preauth.WithLabelValues(name).Inc() }
func (m *promMetrics) Login(result, reason string) {
	m.logins.WithLabelValues(result, reason).Inc()
	m.rates.login(result)
}

func (m *promMetrics) BackendLogin(backend string, dial, login time.Duration, ok bool) {
	m.dial.WithLabelValues(backend).Observe(dial.Seconds())
	if login > 0 {
		r := "ok"
		if !ok {
			r = "failed"
		}
		m.login.WithLabelValues(backend, r).Observe(login.Seconds())
	}
}

func (m *promMetrics) RouteLookup(d time.Duration, ok bool) {
	r := "ok"
	if !ok {
		r = "failed"
	}
	m.route.WithLabelValues(r).Observe(d.Seconds())
}

func (m *promMetrics) LimitHit(limit string) { m.limits.WithLabelValues(limit).Inc() }
