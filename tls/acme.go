package tls

import (
	"context"
	stdtls "crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/imapgate/imapgate/routing/consul"

	"github.com/caddyserver/certmagic"
	"github.com/hashicorp/consul/api"
	"github.com/mholt/acmez/v3"
	"go.uber.org/zap"
)

// ALPNACMETLS is the ALPN protocol of the TLS-ALPN-01 challenge (RFC 8737).
// A ServerConfig negotiates it only with a client that offers it alone,
// with the SNI of a name whose challenge is pending right now; such a
// client is the CA's validator, and IsACMEChallenge tells the listener to
// close the connection after the handshake.
const ALPNACMETLS = acmez.ACMETLS1Protocol

// LetsEncryptProduction and LetsEncryptStaging are ACME directory URLs.
const (
	LetsEncryptProduction = certmagic.LetsEncryptProductionCA
	LetsEncryptStaging    = certmagic.LetsEncryptStagingCA
)

// ACMEConfig configures certificates obtained and renewed from an ACME CA
// through CertMagic. The zero ACMEConfig disables ACME.
type ACMEConfig struct {
	// Names are the DNS names whose certificates are obtained at start-up
	// and renewed before they expire, one certificate per name. A wildcard
	// ("*.example.org") needs DNS01. If empty and OnDemand is nil, ACME is
	// off.
	Names []string

	// DirectoryURL is the ACME directory of the CA. If empty,
	// LetsEncryptProduction. Use LetsEncryptStaging while testing a setup,
	// or a private CA's directory.
	DirectoryURL string

	// Email is the ACME account's contact, where a CA sends expiry
	// warnings. Optional but recommended. Configuring ACME means agreeing
	// to the CA's subscriber agreement.
	Email string

	// CARootFile is a PEM file of root certificates trusted for the ACME
	// server's own HTTPS (a private CA, or Pebble in tests). If empty, the
	// system roots.
	CARootFile string

	// HTTP01 configures the HTTP-01 challenge.
	HTTP01 HTTP01Config

	// TLSALPN01 configures the TLS-ALPN-01 challenge.
	TLSALPN01 TLSALPN01Config

	// DNS01, if not nil, solves every challenge with DNS TXT records instead
	// of HTTP-01 and TLS-ALPN-01. It is the only challenge a wildcard name
	// can use.
	DNS01 *DNS01Config

	// OnDemand, if not nil, obtains a certificate during the first handshake
	// for a name not in Names, if OnDemand allows the name.
	OnDemand *OnDemandConfig

	// Storage is where certificates, keys and the ACME account are kept.
	Storage StorageConfig

	// RenewalWindowRatio is the fraction of a certificate's lifetime left
	// when renewal starts (unless the CA's ACME Renewal Information says
	// otherwise). If zero, 1/3.
	RenewalWindowRatio float64

	// RenewCheckInterval is how often certificates are checked for
	// renewal. If zero, CertMagic's default (10 minutes).
	RenewCheckInterval time.Duration

	// DisableOCSPStapling turns off stapling OCSP responses to ACME
	// certificates (stapling is on by default where the certificate names
	// an OCSP responder).
	DisableOCSPStapling bool
}

// HTTP01Config configures the HTTP-01 challenge. When enabled, the Manager
// runs a small HTTP server that answers only /.well-known/acme-challenge/
// for as long as it runs: in a fleet the CA's request may reach an instance
// other than the one that asked for the certificate, which answers from the
// shared storage.
type HTTP01Config struct {
	// Disable turns HTTP-01 off.
	Disable bool
	// Addr is where the challenge server listens; the CA connects to port
	// 80 of the name, so this (or a port forward) must receive it. If
	// empty, ":80".
	Addr string
}

// TLSALPN01Config configures the TLS-ALPN-01 challenge, answered by the
// implicit-TLS listeners through ServerConfig.
type TLSALPN01Config struct {
	// Disable turns TLS-ALPN-01 off.
	Disable bool
	// Port is where the CA connects: 443 for public CAs, so port 443 must
	// reach one of imapgate's implicit-TLS listeners (directly or by a port
	// forward to 993). If zero, 443. If nothing of ours listens on it
	// locally, CertMagic binds it for the duration of a challenge.
	Port int
}

// DNS01Config configures the DNS-01 challenge with a libdns provider.
// imapgate's binary compiles in no provider yet, so this is for programs
// that embed the package.
type DNS01Config struct {
	// Provider creates and deletes the challenge TXT records.
	Provider certmagic.DNSProvider
	// Resolvers ("host:port") check that records have propagated. If
	// empty, the system's resolvers.
	Resolvers []string
	// PropagationTimeout bounds the wait for a record to be visible. If
	// zero, 2 minutes; if negative, no check is made.
	PropagationTimeout time.Duration
}

// OnDemandConfig allows certificates for names not configured in advance,
// obtained during the first handshake that asks for them. It must allow
// explicitly: a client must not make imapgate request certificates for
// arbitrary names.
type OnDemandConfig struct {
	// Allow lists the names that may get a certificate on demand: exact
	// names, or "*.example.org" for any single label under example.org.
	Allow []string
	// Decide, if not nil, decides names Allow does not list: nil means
	// allowed. It runs during a handshake, so it should be quick.
	Decide func(ctx context.Context, name string) error
}

// StorageKind selects where ACME data is kept.
type StorageKind uint8

const (
	// StorageFile keeps ACME data in a local directory (the default).
	StorageFile StorageKind = iota
	// StorageConsul keeps ACME data in Consul KV, shared by a fleet.
	StorageConsul
)

// String returns the config-file spelling of k.
func (k StorageKind) String() string {
	switch k {
	case StorageFile:
		return "file"
	case StorageConsul:
		return "consul"
	}
	return "unknown"
}

// ParseStorageKind parses "file" (or "") and "consul".
func ParseStorageKind(s string) (StorageKind, error) {
	switch s {
	case "", "file":
		return StorageFile, nil
	case "consul":
		return StorageConsul, nil
	}
	return 0, fmt.Errorf("tls: storage %q: want \"file\" or \"consul\"", s)
}

// StorageConfig says where ACME data lives.
type StorageConfig struct {
	// Kind selects the storage. The zero value is StorageFile.
	Kind StorageKind
	// Dir is StorageFile's directory. If empty, $STATE_DIRECTORY/acme (set
	// by systemd's StateDirectory=), else $XDG_DATA_HOME/imapgate/acme,
	// else ~/.local/share/imapgate/acme.
	Dir string
	// Consul configures StorageConsul.
	Consul ConsulStorageConfig
}

// ConsulStorageConfig configures StorageConsul.
type ConsulStorageConfig struct {
	// Client is the Consul client to use. If nil, one is built from
	// Address, Token and Datacenter over the CONSUL_HTTP_* environment.
	Client *api.Client
	// Address of the Consul agent's HTTP API ("127.0.0.1:8500"). If empty,
	// CONSUL_HTTP_ADDR or 127.0.0.1:8500.
	Address string
	// Token is the ACL token. If empty, CONSUL_HTTP_TOKEN.
	Token string
	// Datacenter. If empty, the agent's.
	Datacenter string
	// Prefix of every KV key. If empty, DefaultConsulPrefix. Instances that
	// share certificates must share the prefix.
	Prefix string
}

// acmeSource is the ACME part of a Manager.
type acmeSource struct {
	magic    *certmagic.Config
	cache    *certmagic.Cache
	issuer   *certmagic.ACMEIssuer
	managed  []string // normalized cfg.Names
	onDemand bool
	tlsALPN  bool

	challengeConfig *stdtls.Config // for handshakes offering only acme-tls/1
	httpServer      *http.Server   // nil if HTTP-01 is off
	httpAddr        string         // where httpServer listens
	httpDone        chan struct{}

	cancel context.CancelFunc // stops background obtain and renew jobs

	mu         sync.Mutex
	cachedSeen map[string]bool // names CertMagic has cached a certificate for, for Expiry
}

func (c ACMEConfig) enabled() bool { return len(c.Names) > 0 || c.OnDemand != nil }

func (c ACMEConfig) validate() error {
	for _, n := range c.Names {
		if n == "" || strings.ContainsAny(n, " /:") {
			return fmt.Errorf("tls: acme: invalid name %q", n)
		}
		if strings.Contains(n, "*") && c.DNS01 == nil {
			return fmt.Errorf("tls: acme: wildcard %q needs the DNS-01 challenge", n)
		}
	}
	if c.OnDemand != nil && len(c.OnDemand.Allow) == 0 && c.OnDemand.Decide == nil {
		return errors.New("tls: acme: on-demand issuance needs an allow-list or a decision function")
	}
	if c.DNS01 == nil && c.HTTP01.Disable && c.TLSALPN01.Disable {
		return errors.New("tls: acme: every challenge is disabled")
	}
	if c.DNS01 != nil && c.DNS01.Provider == nil {
		return errors.New("tls: acme: DNS-01 needs a provider")
	}
	if c.RenewalWindowRatio < 0 || c.RenewalWindowRatio >= 1 {
		return fmt.Errorf("tls: acme: renewal window ratio %v: want 0 < r < 1", c.RenewalWindowRatio)
	}
	return nil
}

// newACMESource sets up CertMagic, starts the HTTP-01 server and starts
// obtaining (or loading) the certificates of cfg.Names in the background:
// start-up never waits for the CA, and until a name has its certificate
// handshakes for it get the Manager's default certificate.
func newACMESource(cfg ACMEConfig, log *zap.Logger, onEvent func(context.Context, string, map[string]any) error) (_ *acmeSource, err error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	storage, err := newStorage(cfg.Storage, log)
	if err != nil {
		return nil, err
	}
	var roots *x509.CertPool
	if cfg.CARootFile != "" {
		pem, err := os.ReadFile(cfg.CARootFile)
		if err != nil {
			return nil, fmt.Errorf("tls: acme: %w", err)
		}
		roots = x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("tls: acme: %s holds no PEM certificate", cfg.CARootFile)
		}
	}

	a := &acmeSource{cachedSeen: make(map[string]bool)}
	for _, n := range cfg.Names {
		a.managed = append(a.managed, normalizeName(n))
	}
	cmLog := log.Named("certmagic")
	a.cache = certmagic.NewCache(certmagic.CacheOptions{
		GetConfigForCert:   func(certmagic.Certificate) (*certmagic.Config, error) { return a.magic, nil },
		RenewCheckInterval: cfg.RenewCheckInterval,
		Logger:             cmLog,
	})
	defer func() {
		if err != nil {
			a.close()
		}
	}()
	mc := certmagic.Config{
		RenewalWindowRatio: cfg.RenewalWindowRatio,
		Storage:            storage,
		Logger:             cmLog,
		OCSP:               certmagic.OCSPConfig{DisableStapling: cfg.DisableOCSPStapling},
		OnEvent:            onEvent,
		ShouldEmitFunc:     certMagicEventWanted,
	}
	if od := cfg.OnDemand; od != nil {
		a.onDemand = true
		allow := make([]string, 0, len(od.Allow))
		for _, n := range od.Allow {
			allow = append(allow, normalizeName(n))
		}
		mc.OnDemand = &certmagic.OnDemandConfig{
			DecisionFunc: func(ctx context.Context, name string) error {
				name = normalizeName(name)
				if slices.Contains(a.managed, name) || nameMatches(allow, name) {
					return nil
				}
				if od.Decide != nil {
					return od.Decide(ctx, name)
				}
				return fmt.Errorf("%s is not allowed for on-demand issuance", name)
			},
		}
	}
	a.magic = certmagic.New(a.cache, mc)

	tmpl := certmagic.ACMEIssuer{
		CA:                      cfg.DirectoryURL,
		Email:                   cfg.Email,
		Agreed:                  true,
		TrustedRoots:            roots,
		DisableHTTPChallenge:    cfg.HTTP01.Disable,
		DisableTLSALPNChallenge: cfg.TLSALPN01.Disable,
		AltTLSALPNPort:          cfg.TLSALPN01.Port,
		Logger:                  cmLog,
	}
	if tmpl.CA == "" {
		tmpl.CA = LetsEncryptProduction
	}
	if d := cfg.DNS01; d != nil {
		tmpl.DNS01Solver = &certmagic.DNS01Solver{DNSManager: certmagic.DNSManager{
			DNSProvider:        d.Provider,
			Resolvers:          d.Resolvers,
			PropagationTimeout: d.PropagationTimeout,
			Logger:             cmLog,
		}}
	}
	var httpLn net.Listener
	if d := cfg.DNS01; d == nil && !cfg.HTTP01.Disable {
		addr := cfg.HTTP01.Addr
		if addr == "" {
			addr = ":80"
		}
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, fmt.Errorf("tls: acme: http-01 address %q: %w", addr, err)
		}
		// CertMagic's own solver tries to bind ListenHost:AltHTTPPort and,
		// finding our server there, leaves the answering to it.
		tmpl.ListenHost = host
		tmpl.AltHTTPPort, _ = strconv.Atoi(port)
		httpLn, err = net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("tls: acme: http-01 server: %w", err)
		}
	}
	a.issuer = certmagic.NewACMEIssuer(a.magic, tmpl)
	a.magic.Issuers = []certmagic.Issuer{a.issuer}

	a.tlsALPN = cfg.DNS01 == nil && !cfg.TLSALPN01.Disable
	a.challengeConfig = &stdtls.Config{
		MinVersion:     stdtls.VersionTLS12,
		NextProtos:     []string{ALPNACMETLS},
		GetCertificate: a.magic.GetCertificate, // serves a pending challenge's certificate, or fails
	}

	if httpLn != nil {
		a.httpServer = &http.Server{
			Handler:           a.issuer.HTTPChallengeHandler(http.NotFoundHandler()),
			ReadHeaderTimeout: 10 * time.Second,
			ReadTimeout:       10 * time.Second,
			WriteTimeout:      10 * time.Second,
			IdleTimeout:       30 * time.Second,
			ErrorLog:          zap.NewStdLog(log.Named("http01")),
		}
		a.httpAddr = httpLn.Addr().String()
		a.httpDone = make(chan struct{})
		go a.serveHTTP01(httpLn, log)
	}

	var bg context.Context
	bg, a.cancel = context.WithCancel(context.Background())
	if len(cfg.Names) > 0 {
		if err := a.magic.ManageAsync(bg, cfg.Names); err != nil {
			return nil, fmt.Errorf("tls: acme: %w", err)
		}
	}
	return a, nil
}

// serveHTTP01 runs the HTTP-01 challenge server until close.
func (a *acmeSource) serveHTTP01(ln net.Listener, log *zap.Logger) {
	defer close(a.httpDone)
	if err := a.httpServer.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Error("tls: http-01 challenge server stopped", zap.Error(err))
	}
}

// HTTP01Addr returns the address the HTTP-01 challenge server listens on,
// or "" if there is none.
func (m *Manager) HTTP01Addr() string {
	if m.acme == nil || m.acme.httpServer == nil {
		return ""
	}
	return m.acme.httpAddr
}

// close stops everything newACMESource started; it is safe on a
// partially built source.
func (a *acmeSource) close() {
	if a.cancel != nil {
		a.cancel()
	}
	if a.httpServer != nil {
		a.httpServer.Close()
		<-a.httpDone
	}
	a.cache.Stop()
}

// covers reports whether name is one the ACME source may have a
// certificate for.
func (a *acmeSource) covers(name string) bool {
	return a.onDemand || slices.Contains(a.managed, name) || nameMatches(a.managed, name)
}

// certificate returns the certificate for hello from CertMagic (its cache,
// or an on-demand issuance), or nil.
func (a *acmeSource) certificate(hello *stdtls.ClientHelloInfo) *stdtls.Certificate {
	c, err := a.magic.GetCertificate(hello)
	if err != nil || c == nil || len(c.Certificate) == 0 {
		return nil
	}
	return c
}

// defaultCertificate returns the certificate of the first managed name
// that has one, for clients without SNI.
func (a *acmeSource) defaultCertificate(hello *stdtls.ClientHelloInfo) *stdtls.Certificate {
	for _, n := range a.managed {
		if strings.HasPrefix(n, "*.") {
			continue
		}
		for _, c := range a.cache.AllMatchingCertificates(n) {
			if hello.SupportsCertificate(&c.Certificate) == nil {
				return &c.Certificate
			}
		}
	}
	return nil
}

// isChallengeHello reports whether hello is a TLS-ALPN-01 validation: the
// only ALPN offered is acme-tls/1 and SNI is set (RFC 8737 §3).
func isChallengeHello(hello *stdtls.ClientHelloInfo) bool {
	return hello.ServerName != "" && len(hello.SupportedProtos) == 1 && hello.SupportedProtos[0] == ALPNACMETLS
}

// IsACMEChallenge reports whether a completed handshake was a CA validating
// a TLS-ALPN-01 challenge. Such a connection has served its purpose: close
// it without speaking IMAP.
func IsACMEChallenge(cs stdtls.ConnectionState) bool {
	return cs.NegotiatedProtocol == ALPNACMETLS
}

// nameMatches reports whether name is in patterns, directly or through a
// one-label wildcard pattern.
func nameMatches(patterns []string, name string) bool {
	if slices.Contains(patterns, name) {
		return true
	}
	if i := strings.IndexByte(name, '.'); i > 0 {
		return slices.Contains(patterns, "*"+name[i:])
	}
	return false
}

func newStorage(cfg StorageConfig, log *zap.Logger) (certmagic.Storage, error) {
	switch cfg.Kind {
	case StorageFile:
		dir := cfg.Dir
		if dir == "" {
			dir = defaultStorageDir()
		}
		return &certmagic.FileStorage{Path: dir}, nil
	case StorageConsul:
		c := cfg.Consul
		client := c.Client
		if client == nil {
			var err error
			client, _, err = consul.NewConsulClient(consul.ConsulClientConfig{
				Address: c.Address, Token: c.Token, Datacenter: c.Datacenter,
			})
			if err != nil {
				return nil, fmt.Errorf("tls: acme: consul: %w", err)
			}
		}
		return NewConsulStorage(client, c.Prefix, log.Named("consul")), nil
	}
	return nil, fmt.Errorf("tls: acme: unknown storage kind %d", cfg.Kind)
}

func defaultStorageDir() string {
	if d := os.Getenv("STATE_DIRECTORY"); d != "" {
		// systemd may list several, colon-separated; the first is ours.
		return filepath.Join(strings.Split(d, ":")[0], "acme")
	}
	if d := os.Getenv("XDG_DATA_HOME"); d != "" {
		return filepath.Join(d, "imapgate", "acme")
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".local", "share", "imapgate", "acme")
	}
	return filepath.Join(".", "imapgate-acme")
}
