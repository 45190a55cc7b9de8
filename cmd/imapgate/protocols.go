package main

import (
	"github.com/imapgate/imapgate/proxy/lmtp"
	"github.com/prometheus/client_golang/prometheus"
)

func newLMTPCounter() *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "imapgate_lmtp_recipients_total",
		Help: "LMTP recipients by backend, stage (rcpt: the RCPT reply; data: the reply after the message) and result (ok, refused: 5xx, deferred: 4xx).",
	}, []string{"backend", "stage", "result"})
}

// Recipient implements lmtp.Metrics.
func (m *promMetrics) Recipient(backend, stage, result string) {
	m.lmtp.WithLabelValues(backend, stage, result).Inc()
}

var _ lmtp.Metrics = (*promMetrics)(nil)
