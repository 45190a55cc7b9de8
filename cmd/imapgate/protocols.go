package main

import (
	"github.com/imapgate/imapgate/internal/config"
	"github.com/imapgate/imapgate/proxy"
	"github.com/imapgate/imapgate/proxy/lmtp"
	"github.com/imapgate/imapgate/routing"
	"github.com/prometheus/client_golang/prometheus"
)

// registrationName is a listener's name (and tag) in imapgate's own
// Consul registration: imap or imaps, pop3 or pop3s, sieve, lmtp.
func registrationName(sp config.ListenerSpec) string {
	name := sp.Listener.Protocol.String()
	if sp.Listener.Protocol == routing.ProtocolIMAP || sp.Listener.Protocol == routing.ProtocolPOP3 {
		if sp.Listener.Mode == proxy.ImplicitTLS {
			name += "s"
		}
	}
	return name
}

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
