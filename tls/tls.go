// Package tls gives imapgate's listeners their TLS configuration.
//
// Every listener, implicit TLS (the 993 style) and cleartext with STARTTLS
// (the 143 style), takes its *crypto/tls.Config from one Manager. The
// Manager picks a certificate for each handshake by SNI from any mix of
// sources, in this order:
//
//  1. static certificate/key files (Config.Certificates), re-read on
//     Manager.Reload (the binary calls it on SIGHUP) and when the files
//     change on disk (static.go);
//  2. certificates obtained and renewed from an ACME CA such as Let's
//     Encrypt through CertMagic (Config.ACME, acme.go), with HTTP-01,
//     TLS-ALPN-01 (answered by the implicit-TLS listeners themselves) or
//     DNS-01, optionally on demand for allowed names, kept on disk or in
//     Consul KV so that a fleet shares them (consul.go);
//  3. a self-signed certificate generated at start-up when no static file
//     is configured (selfsigned.go), so a development setup works with no
//     files at all.
//
// A client without SNI, or with a name no source covers, gets the default:
// the first static file, else the first ACME name's certificate, else the
// self-signed one.
//
// The TLS policy lives here too (policy.go): TLS 1.2 minimum by default,
// Go's secure cipher suites, and ALPN limited to "imap" or none, so that a
// browser tricked into speaking HTTP to an IMAP port (the ALPACA attack)
// fails the handshake. The one exception is "acme-tls/1", accepted only
// from a CA validating a TLS-ALPN-01 challenge that is pending right now.
//
// Session resumption across a fleet: TicketKeys (tickets.go) keeps a
// Config's session ticket keys in a store every instance reads (Consul KV
// or a file) and rotates them, so a client that resumes on another
// instance behind the balancer skips the certificate and its signature.
//
// Expiry is reported for monitoring (Manager.Expiry, a Prometheus gauge)
// and logged as a warning when a certificate nears its end without having
// been renewed (expiry.go).
//
// Typical use:
//
//	m, err := igtls.New(ctx, igtls.Config{
//		Certificates: []igtls.CertFile{{CertFile: "mail.pem", KeyFile: "mail.key"}},
//		ACME: igtls.ACMEConfig{
//			Names: []string{"imap.example.org"},
//			Email: "postmaster@example.org",
//		},
//	}, log)
//	if err != nil { ... }
//	defer m.Close()
//	if m.SelfSigned() {
//		log.Warn("no certificate configured, serving a self-signed one")
//	}
//	ln := stdtls.NewListener(tcpListener, m.ServerConfig()) // implicit TLS
//	tc := stdtls.Server(conn, m.ServerConfig())             // after STARTTLS
//	// after tc.Handshake():
//	if igtls.IsACMEChallenge(tc.ConnectionState()) { tc.Close() }
//
// Certificates change under a running Manager without dropping anything: a
// handshake asks the Manager for its certificate, so only handshakes that
// start after a reload or renewal see the new one; established connections
// keep theirs.
package tls

import (
	"context"
	stdtls "crypto/tls"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// ALPNIMAP is the ALPN protocol ID of IMAP (RFC 9051 §11.4 references the
// IANA registry entry "imap"). It is the only application protocol a
// Manager's ServerConfig negotiates.
const ALPNIMAP = "imap"

// Config says where a Manager gets certificates and which TLS policy it
// applies. The zero Config is valid: it serves a self-signed certificate
// with the default policy.
type Config struct {
	// Certificates are static certificate/key pairs in PEM files. SNI
	// chooses among them by their DNS SANs (a "*.example.org" SAN matches
	// one label); the first is the default for clients that send no SNI or
	// a name no source has. If empty, see SelfSigned.
	Certificates []CertFile

	// SelfSigned configures the certificate generated at start-up when no
	// other source is configured.
	SelfSigned SelfSignedConfig

	// MinVersion is the lowest TLS version accepted: "1.2" or "1.3".
	// If empty, "1.2".
	MinVersion string

	// CipherSuites are the TLS 1.2 cipher suites accepted, by their Go
	// (IANA) names such as "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256". Only
	// suites Go considers secure are allowed. If empty, Go's defaults.
	// TLS 1.3 suites are not configurable (Go always offers all three).
	CipherSuites []string

	// ACME configures certificates from an ACME CA (Let's Encrypt or a
	// private one) through CertMagic. The zero value disables it.
	ACME ACMEConfig

	// Registerer, if not nil, gets a gauge of every certificate's expiry
	// (imapgate_tls_certificate_expiry_timestamp_seconds{name,source}).
	Registerer prometheus.Registerer

	// ReloadInterval is how often the certificate files are checked for
	// changes (modification time and size). If zero, 5 s. If negative,
	// files are only re-read by Reload.
	ReloadInterval time.Duration

	// expiryCheckInterval is how often expiring certificates are logged;
	// if zero, defaultExpiryCheckInterval. Tests shorten it.
	expiryCheckInterval time.Duration
}

// CertFile is one static certificate: a PEM certificate chain (leaf
// first) and its PEM private key.
type CertFile struct {
	CertFile string
	KeyFile  string
}

// SelfSignedConfig configures the self-signed fallback certificate. It is
// generated when no static certificate is configured: alone, it is what
// every client gets; beside ACME, it is what clients get for names no ACME
// certificate covers (yet).
type SelfSignedConfig struct {
	// Names are the DNS names of the certificate. If empty, the host name
	// and "localhost".
	Names []string

	// Disable makes New fail when no certificate source is configured,
	// instead of generating a self-signed certificate. Production
	// configurations may set it so a missing certificate is an error.
	Disable bool
}

const defaultReloadInterval = 5 * time.Second

// A Manager owns the certificates of imapgate's listeners. Its methods are
// safe for concurrent use.
type Manager struct {
	log    *zap.Logger
	cfg    Config
	policy policy

	static     atomic.Pointer[certSet] // from cfg.Certificates; nil if none
	acme       *acmeSource             // nil unless ACME is configured
	selfSigned *stdtls.Certificate     // nil unless generated
	collector  *expiryCollector        // registered with cfg.Registerer, if any

	reloadMu sync.Mutex // serialises Reload

	stop      chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once

	base *stdtls.Config // cloned by ServerConfig
}

// New builds a Manager from cfg: it loads the static certificates (a file
// that cannot be read or parsed is an error), generates the self-signed
// one if no static certificate is configured, starts the ACME machinery
// (which obtains certificates in the background: New does not wait for the
// CA) and starts watching the files. ctx bounds start-up only. log may be
// nil. Close stops the Manager's background work.
func New(ctx context.Context, cfg Config, log *zap.Logger) (_ *Manager, err error) {
	if log == nil {
		log = zap.NewNop()
	}
	pol, err := parsePolicy(cfg.MinVersion, cfg.CipherSuites)
	if err != nil {
		return nil, err
	}
	if cfg.ACME.enabled() {
		if err := cfg.ACME.validate(); err != nil {
			return nil, err
		}
	}
	m := &Manager{
		log:    log,
		cfg:    cfg,
		policy: pol,
		stop:   make(chan struct{}),
	}
	if len(cfg.Certificates) > 0 {
		set, err := loadCertSet(cfg.Certificates)
		if err != nil {
			return nil, err
		}
		m.static.Store(set)
	} else {
		if cfg.SelfSigned.Disable && !cfg.ACME.enabled() {
			return nil, errors.New("tls: no certificate configured and the self-signed fallback is disabled")
		}
		if !cfg.SelfSigned.Disable {
			cert, err := generateSelfSigned(cfg.SelfSigned.Names)
			if err != nil {
				return nil, fmt.Errorf("tls: generating the self-signed certificate: %w", err)
			}
			m.selfSigned = cert
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if cfg.ACME.enabled() {
		if m.acme, err = newACMESource(cfg.ACME, log, m.onCertMagicEvent); err != nil {
			return nil, err
		}
	}
	defer func() {
		if err != nil {
			m.Close()
		}
	}()
	if cfg.Registerer != nil {
		c := newExpiryCollector(m)
		if err := cfg.Registerer.Register(c); err != nil {
			return nil, fmt.Errorf("tls: registering the expiry metric: %w", err)
		}
		m.collector = c
	}
	m.base = m.buildServerConfig()

	interval := cfg.ReloadInterval
	if interval == 0 {
		interval = defaultReloadInterval
	}
	if len(cfg.Certificates) > 0 && interval > 0 {
		m.wg.Add(1)
		go m.watchFiles(interval)
	}
	expiryInterval := cfg.expiryCheckInterval
	if expiryInterval <= 0 {
		expiryInterval = defaultExpiryCheckInterval
	}
	m.wg.Add(1)
	go m.watchExpiry(expiryInterval)
	return m, nil
}

// ServerConfig returns the TLS configuration for a listener, implicit TLS
// or STARTTLS alike. Each call returns a new copy the caller may change;
// all copies follow the Manager's certificates as they are reloaded and
// renewed. With TLS-ALPN-01 on, it also answers the CA's validation
// handshakes; IsACMEChallenge tells the listener to close those.
func (m *Manager) ServerConfig() *stdtls.Config {
	return m.base.Clone()
}

func (m *Manager) buildServerConfig() *stdtls.Config {
	c := &stdtls.Config{
		MinVersion:     m.policy.minVersion,
		CipherSuites:   m.policy.cipherSuites,
		NextProtos:     []string{ALPNIMAP},
		GetCertificate: m.getCertificate,
	}
	if m.acme != nil && m.acme.tlsALPN {
		// The one exception to "imap or nothing": a TLS-ALPN-01 validator
		// offers acme-tls/1 alone, and gets a configuration that serves the
		// challenge certificate if a challenge for its SNI is pending, and
		// fails the handshake otherwise.
		c.GetConfigForClient = func(hello *stdtls.ClientHelloInfo) (*stdtls.Config, error) {
			if isChallengeHello(hello) {
				return m.acme.challengeConfig, nil
			}
			return nil, nil
		}
	}
	return c
}

// SelfSigned reports whether the Manager generated a self-signed
// certificate because no other source was configured.
func (m *Manager) SelfSigned() bool { return m.selfSigned != nil }

// Reload re-reads the static certificate files. If any of them cannot be
// loaded, the certificates in use are kept and the error is returned.
// Established connections are never affected.
func (m *Manager) Reload() error {
	if len(m.cfg.Certificates) == 0 {
		return nil
	}
	m.reloadMu.Lock()
	defer m.reloadMu.Unlock()
	set, err := loadCertSet(m.cfg.Certificates)
	if err != nil {
		return err
	}
	m.static.Store(set)
	m.log.Info("tls: certificates reloaded", zap.Strings("names", set.names()))
	return nil
}

// Close stops watching the certificate files, stops ACME renewals and the
// HTTP-01 server, and unregisters the expiry metric. Listeners using a
// ServerConfig keep working with the certificates last loaded.
func (m *Manager) Close() error {
	m.closeOnce.Do(func() {
		close(m.stop)
		m.wg.Wait()
		if m.acme != nil {
			m.acme.close()
		}
		if m.collector != nil {
			m.cfg.Registerer.Unregister(m.collector)
		}
	})
	return nil
}

// errNoCertificate is returned to crypto/tls when no source has a
// certificate at all; clients see a handshake failure.
var errNoCertificate = errors.New("tls: no certificate available")

// getCertificate is the GetCertificate callback of every ServerConfig.
func (m *Manager) getCertificate(hello *stdtls.ClientHelloInfo) (*stdtls.Certificate, error) {
	name := normalizeName(hello.ServerName)
	set := m.static.Load()
	if name != "" {
		// Static files first: an operator who configured a file for a
		// name means it.
		if set != nil {
			if c := set.lookup(name, hello); c != nil {
				return c, nil
			}
		}
		if m.acme != nil && m.acme.covers(name) {
			if c := m.acme.certificate(hello); c != nil {
				return c, nil
			}
		}
	}
	// No SNI, or a name no source covers: the default.
	if set != nil {
		return set.defaultCert, nil
	}
	if m.acme != nil {
		if c := m.acme.defaultCertificate(hello); c != nil {
			return c, nil
		}
	}
	if m.selfSigned != nil {
		return m.selfSigned, nil
	}
	return nil, errNoCertificate
}
