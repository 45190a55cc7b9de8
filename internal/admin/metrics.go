package admin

import (
	"context"
	"sync"
	"time"

	"github.com/imapgate/imapgate/internal/adminapi"
	"github.com/imapgate/imapgate/proxy"
	"github.com/imapgate/imapgate/proxy/lmtp"
	"github.com/imapgate/imapgate/routing"
	igtls "github.com/imapgate/imapgate/tls"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metrics implements proxy.Metrics and lmtp.Metrics with Prometheus
// collectors, and counts what the operator does (reloads, admin actions).
type Metrics struct {
	sessions *prometheus.GaugeVec
	ended    *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	preauth  *prometheus.CounterVec
	logins   *prometheus.CounterVec
	dial     *prometheus.HistogramVec
	login    *prometheus.HistogramVec
	route    *prometheus.HistogramVec
	limits   *prometheus.CounterVec
	lmtp     *prometheus.CounterVec

	// Operations, counted by the binary and the admin API.
	reloads    *prometheus.CounterVec
	lastReload prometheus.Gauge
	admin      *prometheus.CounterVec

	// rates counts the last minute's logins for the status page.
	rates loginRates

	// The children the proxy touches on every login, cached (children).
	sessionsOf *children[sessionKey, prometheus.Gauge]
	endedOf    *children[endedKey, prometheus.Counter]
	bytesOf    *children[string, [2]prometheus.Counter] // in, out
	preauthOf  *children[string, prometheus.Counter]
	loginsOf   *children[[2]string, prometheus.Counter]
	dialOf     *children[string, prometheus.Observer]
	loginOf    *children[backendResult, prometheus.Observer]
	routeOf    [2]prometheus.Observer // failed, ok

	// all is everything registered, for tests that check names.
	all []prometheus.Collector
}

// MetricsOptions are what the process-wide gauges read when scraped.
// Every field is required.
type MetricsOptions struct {
	// Ready reports whether the instance wants traffic (imapgate_ready).
	Ready func() bool
	// Certificates are the certificates served now (a reload may replace
	// the tls.Manager, and two managers cannot register one metric).
	Certificates func() []igtls.CertExpiry
	// Backends are the router's backends (none before the router exists).
	Backends func(ctx context.Context) []routing.BackendStatus
	// Version labels imapgate_build_info.
	Version adminapi.Version
}

// NewMetrics registers the proxy's metrics and the process's own on reg.
// The Consul router registers imapgate_consul_* itself (view age, watch
// errors, placements, evictions).
func NewMetrics(reg prometheus.Registerer, o MetricsOptions) *Metrics {
	m := &Metrics{
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
	m.lmtp = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "imapgate_lmtp_recipients_total",
		Help: "LMTP recipients by backend, stage (rcpt: the RCPT reply; data: the reply after the message) and result (ok, refused: 5xx, deferred: 4xx).",
	}, []string{"backend", "stage", "result"})
	m.all = []prometheus.Collector{m.sessions, m.ended, m.bytes, m.preauth, m.logins, m.dial, m.login, m.route, m.limits, m.lmtp,
		m.reloads, m.lastReload, m.admin,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		buildInfo(o.Version),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "imapgate_ready", Help: "1 while this instance wants traffic (/readyz answers 200), 0 while starting or draining."},
			func() float64 { return b2f(o.Ready()) }),
		&tlsExpiryCollector{certs: o.Certificates, desc: prometheus.NewDesc(
			"imapgate_tls_certificate_expiry_timestamp_seconds",
			"NotAfter of the certificate served for a name, as a Unix time.",
			[]string{"name", "source"}, nil)},
		&backendCollector{backends: o.Backends,
			up:    prometheus.NewDesc("imapgate_backend_up", "1 if the router may send users to the backend (Consul: passing or warning and not gone; static: always).", []string{"backend"}, nil),
			drain: prometheus.NewDesc("imapgate_backend_draining", "1 if the backend takes no new users.", []string{"backend"}, nil),
		},
	}
	reg.MustRegister(m.all...)
	m.sessionsOf = newChildren(func(k sessionKey) prometheus.Gauge {
		return m.sessions.WithLabelValues(k.listener, k.state.String(), k.backend)
	})
	m.endedOf = newChildren(func(k endedKey) prometheus.Counter {
		return m.ended.WithLabelValues(k.listener, k.reason.String())
	})
	m.bytesOf = newChildren(func(b string) [2]prometheus.Counter {
		return [2]prometheus.Counter{m.bytes.WithLabelValues(b, "in"), m.bytes.WithLabelValues(b, "out")}
	})
	m.preauthOf = newChildren(func(c string) prometheus.Counter { return m.preauth.WithLabelValues(c) })
	m.loginsOf = newChildren(func(k [2]string) prometheus.Counter { return m.logins.WithLabelValues(k[0], k[1]) })
	m.dialOf = newChildren(func(b string) prometheus.Observer { return m.dial.WithLabelValues(b) })
	m.loginOf = newChildren(func(k backendResult) prometheus.Observer {
		r := "ok"
		if !k.ok {
			r = "failed"
		}
		return m.login.WithLabelValues(k.backend, r)
	})
	m.routeOf = [2]prometheus.Observer{m.route.WithLabelValues("failed"), m.route.WithLabelValues("ok")}
	return m
}

type (
	sessionKey struct {
		listener string
		state    proxy.State
		backend  string
	}
	endedKey struct {
		listener string
		reason   proxy.EndReason
	}
	backendResult struct {
		backend string
		ok      bool
	}
)

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// Collectors are every collector NewMetrics registered.
func (m *Metrics) Collectors() []prometheus.Collector { return m.all }

// Reloaded counts a reload by its result (adminapi.ReloadReport.Result).
func (m *Metrics) Reloaded(result string) {
	m.reloads.WithLabelValues(result).Inc()
	if result == adminapi.Applied {
		m.lastReload.SetToCurrentTime()
	}
}

// AdminAction counts an admin API action; err is its failure or nil.
func (m *Metrics) AdminAction(action string, err error) {
	r := "ok"
	if err != nil {
		r = "error"
	}
	m.admin.WithLabelValues(action, r).Inc()
}

// buildInfo is the conventional constant 1 labelled with the version.
func buildInfo(v adminapi.Version) prometheus.Collector {
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
	certs func() []igtls.CertExpiry
	desc  *prometheus.Desc
}

func (c *tlsExpiryCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *tlsExpiryCollector) Collect(ch chan<- prometheus.Metric) {
	for _, e := range c.certs() {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(e.NotAfter.Unix()), e.Name, e.Source.String())
	}
}

// backendCollector exports each backend's state as the admin API sees it.
type backendCollector struct {
	backends  func(context.Context) []routing.BackendStatus
	up, drain *prometheus.Desc
}

func (c *backendCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.up; ch <- c.drain }

func (c *backendCollector) Collect(ch chan<- prometheus.Metric) {
	for _, b := range c.backends(context.Background()) {
		ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, b2f(b.Up), b.ID)
		ch <- prometheus.MustNewConstMetric(c.drain, prometheus.GaugeValue, b2f(b.Drain), b.ID)
	}
}

var (
	_ proxy.Metrics = (*Metrics)(nil)
	_ lmtp.Metrics  = (*Metrics)(nil)
)

func (m *Metrics) SessionState(listener, backend string, from, to proxy.State) {
	if from != proxy.StateNone {
		fb := backend
		if from != proxy.StateSpliced {
			fb = ""
		}
		m.sessionsOf.of(sessionKey{listener, from, fb}).Dec()
	}
	if to != proxy.StateClosed {
		tb := backend
		if to != proxy.StateSpliced {
			tb = ""
		}
		m.sessionsOf.of(sessionKey{listener, to, tb}).Inc()
	}
}

func (m *Metrics) SessionEnded(listener, backend string, reason proxy.EndReason, in, out int64, _ time.Duration) {
	m.endedOf.of(endedKey{listener, reason}).Inc()
	if backend != "" {
		b := m.bytesOf.of(backend)
		b[0].Add(float64(in))
		b[1].Add(float64(out))
	}
}

func (m *Metrics) PreAuthCommand(name string) { m.preauthOf.of(name).Inc() }
func (m *Metrics) Login(result, reason string) {
	m.loginsOf.of([2]string{result, reason}).Inc()
	m.rates.login(result)
}

func (m *Metrics) BackendLogin(backend string, dial, login time.Duration, ok bool) {
	m.dialOf.of(backend).Observe(dial.Seconds())
	if login > 0 {
		m.loginOf.of(backendResult{backend, ok}).Observe(login.Seconds())
	}
}

func (m *Metrics) RouteLookup(d time.Duration, ok bool) {
	i := 0
	if ok {
		i = 1
	}
	m.routeOf[i].Observe(d.Seconds())
}

func (m *Metrics) LimitHit(limit string) { m.limits.WithLabelValues(limit).Inc() }

// Recipient implements lmtp.Metrics.
func (m *Metrics) Recipient(backend, stage, result string) {
	m.lmtp.WithLabelValues(backend, stage, result).Inc()
}

// RegisterDirectory exports the counters of an http or ldap router.
func RegisterDirectory(reg prometheus.Registerer, stats func() routing.DirectoryStats) {
	c := func(name, help string, v func(routing.DirectoryStats) int64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, func() float64 { return float64(v(stats())) })
	}
	reg.MustRegister(
		c("imapgate_directory_cache_hits_total", "Routes answered from the http/ldap router's cache.", func(s routing.DirectoryStats) int64 { return s.Hits }),
		c("imapgate_directory_lookups_total", "Routes that asked the directory (cache misses).", func(s routing.DirectoryStats) int64 { return s.Misses }),
		c("imapgate_directory_refusals_total", "Lookups the directory answered with a refusal (no such user).", func(s routing.DirectoryStats) int64 { return s.Refusals }),
		c("imapgate_directory_errors_total", "Lookups that failed (directory down, timeout, bad answer).", func(s routing.DirectoryStats) int64 { return s.Errors }),
		c("imapgate_directory_evicted_sessions_total", "Sessions closed because the directory named another backend for their user.", func(s routing.DirectoryStats) int64 { return s.Evictions }),
	)
}

// loginRates counts logins and failed logins over the last minute, in
// one-second buckets, for the status page.
type loginRates struct {
	mu      sync.Mutex
	ok, bad [60]int
	stamp   [60]int64 // the Unix second each bucket counts
}

func (r *loginRates) add(ok bool) {
	now := time.Now().Unix()
	i := now % 60
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.stamp[i] != now {
		r.stamp[i], r.ok[i], r.bad[i] = now, 0, 0
	}
	if ok {
		r.ok[i]++
	} else {
		r.bad[i]++
	}
}

// login counts one result of Metrics.Login: "ok" or a failure
// ("refused", "unavailable").
func (r *loginRates) login(result string) { r.add(result == "ok") }

func (r *loginRates) lastMinute() (ok, bad int) {
	now := time.Now().Unix()
	r.mu.Lock()
	defer r.mu.Unlock()
	for i := range r.stamp {
		if now-r.stamp[i] < 60 {
			ok += r.ok[i]
			bad += r.bad[i]
		}
	}
	return ok, bad
}
