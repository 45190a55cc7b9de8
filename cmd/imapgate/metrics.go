package main

import (
	"time"

	"github.com/imapgate/imapgate/proxy"
	"github.com/prometheus/client_golang/prometheus"
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
}

func newMetrics(reg prometheus.Registerer) *promMetrics {
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
	reg.MustRegister(m.sessions, m.ended, m.bytes, m.preauth, m.logins, m.dial, m.login, m.route, m.limits)
	return m
}

var _ proxy.Metrics = (*promMetrics)(nil)

func (m *promMetrics) SessionState(listener, backend, from, to string) {
	if from != "" {
		fb := backend
		if from != "spliced" {
			fb = ""
		}
		m.sessions.WithLabelValues(listener, from, fb).Dec()
	}
	if to != "closed" {
		tb := backend
		if to != "spliced" {
			tb = ""
		}
		m.sessions.WithLabelValues(listener, to, tb).Inc()
	}
}

func (m *promMetrics) SessionEnded(listener, backend, reason string, in, out int64, _ time.Duration) {
	m.ended.WithLabelValues(listener, reason).Inc()
	if backend != "" {
		m.bytes.WithLabelValues(backend, "in").Add(float64(in))
		m.bytes.WithLabelValues(backend, "out").Add(float64(out))
	}
}

func (m *promMetrics) PreAuthCommand(name string)  { m.preauth.WithLabelValues(name).Inc() }
func (m *promMetrics) Login(result, reason string) { m.logins.WithLabelValues(result, reason).Inc() }

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
