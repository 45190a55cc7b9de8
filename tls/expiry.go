package tls

import (
	"cmp"
	"context"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Source says where a certificate comes from.
type Source uint8

const (
	// SourceFile is a static certificate/key file pair.
	SourceFile Source = iota + 1
	// SourceACME is a certificate obtained from an ACME CA.
	SourceACME
	// SourceSelfSigned is the certificate generated at start-up.
	SourceSelfSigned
)

// String returns "file", "acme" or "self-signed".
func (s Source) String() string {
	switch s {
	case SourceFile:
		return "file"
	case SourceACME:
		return "acme"
	case SourceSelfSigned:
		return "self-signed"
	}
	return "unknown"
}

// CertExpiry is the validity of the certificate served for one name.
type CertExpiry struct {
	Name      string // a DNS name, possibly "*.example.org"
	Source    Source
	NotBefore time.Time
	NotAfter  time.Time
}

// Expiry returns the validity of every certificate the Manager serves, one
// entry per name and source, sorted by name. An ACME name that has no
// certificate yet is absent. Where one name has several certificates (RSA
// and ECDSA), the one that expires first is reported.
func (m *Manager) Expiry() []CertExpiry {
	var out []CertExpiry
	add := func(name string, src Source, notBefore, notAfter time.Time) {
		for i := range out {
			if out[i].Name == name && out[i].Source == src {
				if notAfter.Before(out[i].NotAfter) {
					out[i].NotBefore, out[i].NotAfter = notBefore, notAfter
				}
				return
			}
		}
		out = append(out, CertExpiry{Name: name, Source: src, NotBefore: notBefore, NotAfter: notAfter})
	}
	if set := m.static.Load(); set != nil {
		for name, certs := range set.byName {
			for _, c := range certs {
				add(name, SourceFile, c.Leaf.NotBefore, c.Leaf.NotAfter)
			}
		}
	}
	if a := m.acme; a != nil {
		for _, name := range a.cachedNames() {
			// The cache may briefly hold a certificate and its renewal:
			// the newest is the one served.
			var best *CertExpiry
			for _, c := range a.cache.AllMatchingCertificates(name) {
				if c.Leaf == nil {
					continue
				}
				if best == nil || c.Leaf.NotAfter.After(best.NotAfter) {
					best = &CertExpiry{Name: name, Source: SourceACME, NotBefore: c.Leaf.NotBefore, NotAfter: c.Leaf.NotAfter}
				}
			}
			if best != nil {
				out = append(out, *best)
			}
		}
	}
	if c := m.selfSigned; c != nil {
		for _, name := range c.Leaf.DNSNames {
			add(name, SourceSelfSigned, c.Leaf.NotBefore, c.Leaf.NotAfter)
		}
	}
	slices.SortFunc(out, func(a, b CertExpiry) int {
		return cmp.Or(cmp.Compare(a.Name, b.Name), cmp.Compare(a.Source, b.Source))
	})
	return out
}

// expiringSoon reports whether less than a sixth of e's lifetime is left:
// ACME renewal starts with a third left, so by then it has been failing for
// a while (15 days for a 90-day certificate).
func expiringSoon(e CertExpiry, now time.Time) bool {
	lifetime := e.NotAfter.Sub(e.NotBefore)
	return e.NotAfter.Sub(now) < lifetime/6
}

const defaultExpiryCheckInterval = time.Hour

// watchExpiry logs a warning for every certificate close to its expiry,
// at start and then every interval, until Close.
func (m *Manager) watchExpiry(interval time.Duration) {
	defer m.wg.Done()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		m.warnExpiring(time.Now())
		select {
		case <-m.stop:
			return
		case <-t.C:
		}
	}
}

func (m *Manager) warnExpiring(now time.Time) {
	for _, e := range m.Expiry() {
		if e.Source == SourceSelfSigned || !expiringSoon(e, now) {
			continue
		}
		msg := "tls: certificate expires soon; replace the file"
		if e.Source == SourceACME {
			msg = "tls: certificate expires soon and its renewal has not succeeded"
		}
		m.log.Warn(msg,
			zap.String("name", e.Name),
			zap.Stringer("source", e.Source),
			zap.Time("not_after", e.NotAfter),
			zap.Duration("remaining", e.NotAfter.Sub(now).Round(time.Second)))
	}
}

// onCertMagicEvent follows CertMagic's events: which names it caches (for
// Expiry), and renewals that fail (a warning with the time left).
func (m *Manager) onCertMagicEvent(_ context.Context, event string, data map[string]any) error {
	switch event {
	case "cached_managed_cert":
		if sans, ok := data["sans"].([]string); ok && m.acme != nil {
			m.acme.noteCached(sans)
		}
	case "cert_failed":
		if renewal, _ := data["renewal"].(bool); renewal {
			remaining, _ := data["remaining"].(time.Duration)
			name, _ := data["identifier"].(string)
			m.log.Warn("tls: certificate renewal failed; will retry",
				zap.String("name", name),
				zap.Duration("remaining", remaining.Round(time.Second)))
		}
	}
	return nil
}

func certMagicEventWanted(event string) bool {
	return event == "cached_managed_cert" || event == "cert_failed"
}

func (a *acmeSource) noteCached(sans []string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, n := range sans {
		a.cachedSeen[normalizeName(n)] = true
	}
}

func (a *acmeSource) cachedNames() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]string, 0, len(a.cachedSeen))
	for n := range a.cachedSeen {
		out = append(out, n)
	}
	return out
}

// expiryCollector exports Expiry as a Prometheus gauge, computed when
// scraped.
type expiryCollector struct {
	m    *Manager
	desc *prometheus.Desc
}

func newExpiryCollector(m *Manager) *expiryCollector {
	return &expiryCollector{m: m, desc: prometheus.NewDesc(
		"imapgate_tls_certificate_expiry_timestamp_seconds",
		"NotAfter of the certificate served for a name, as a Unix time.",
		[]string{"name", "source"}, nil)}
}

func (c *expiryCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *expiryCollector) Collect(ch chan<- prometheus.Metric) {
	for _, e := range c.m.Expiry() {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue,
			float64(e.NotAfter.Unix()), e.Name, e.Source.String())
	}
}
