// Package config reads imapgate's configuration file (TOML) and turns it
// into the option structs of the proxy, routing, routing/consul and tls
// packages, and it owns the rules of a reload.
//
// The file format is documented key by key in the README and in the
// annotated example deploy/imapgate.toml; this package is the single
// place that knows it. Unknown keys are errors, so a typo never silently
// falls back to a default; enumerated values (routing.router, log.format,
// tls.acme.storage, tls.session_tickets.store) are typed kinds parsed at
// load (kinds.go).
//
// Each package's options come from one method: ProxyOptions, Listeners,
// StaticConfig, HTTPRouterConfig and LDAPRouterConfig (directory.go),
// ConsulRouter and Registration (consul.go), TLSOptions and TicketKeys
// (tls.go); the defaults the binary applies are in defaults.go. What a
// reload does with each key is the reload tag beside its field, and
// PlanReload (reload.go) reads them.
//
// Typical use:
//
//	cfg, err := config.Load("/etc/imapgate/imapgate.toml")
//	if err != nil { ... }          // names the file, line and key
//	if err := cfg.Validate(); err != nil { ... }
//	popts, err := cfg.ProxyOptions()
//	...
//	plan := config.PlanReload(boot, inForce, next) // on SIGHUP
package config

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/imapgate/imapgate/routing/consul"

	"github.com/BurntSushi/toml"
	"github.com/hashicorp/consul/api"
	"github.com/imapgate/imapgate/proxy"
	"github.com/imapgate/imapgate/routing"
)

// Config is the whole configuration file.
//
// The reload tag of each field says what a reload (SIGHUP, POST
// /admin/reload) does with a change to it; a field without one follows
// the section it is in. See reload.go for the words: live applies at
// once, restart keeps the start-up value until a restart, and a
// condition (acme=, external=) changes that while ACME is in use or the
// router's table comes from outside the file.
type Config struct {
	Log      Log                `toml:"log" reload:"live"`
	Listen   []Listen           `toml:"listen" reload:"restart"` // bound once
	TLS      TLS                `toml:"tls" reload:"live,acme=restart"`
	PreAuth  PreAuth            `toml:"preauth" reload:"live"`
	Limits   Limits             `toml:"limits" reload:"live"`
	Timeouts Timeouts           `toml:"timeouts" reload:"live"`
	Backend  BackendDefaults    `toml:"backend" reload:"live,external=restart"` // the Consul router holds its TLS template
	Backends map[string]Backend `toml:"backends" reload:"live,external=ignored"`
	Routing  Routing            `toml:"routing" reload:"live,external=ignored"`
	Consul   Consul             `toml:"consul" reload:"restart"` // the router and the registration take it once
	HTTP     HTTP               `toml:"http" reload:"live"`
	Shutdown Shutdown           `toml:"shutdown" reload:"live"`
	LMTP     LMTP               `toml:"lmtp" reload:"restart"`   // the LMTP front end is built once
	Splice   Splice             `toml:"splice" reload:"restart"` // the event loops start once
	Runtime  Runtime            `toml:"runtime" reload:"restart"`
}

// Runtime tunes the Go runtime under imapgate.
type Runtime struct {
	// GCHeadroomMiB bounds the room the collector gets above the live
	// heap while imapgate allocates fast (internal/gcpolicy: a burst of
	// logins collects about every 2 s instead of many times a second; a
	// quiet instance keeps Go's own policy). Zero means 32; negative
	// leaves Go's policy alone. GOGC or GOMEMLIMIT in the environment
	// take precedence.
	GCHeadroomMiB int `toml:"gc_headroom_mib"`
}

// GCHeadroom is Runtime.GCHeadroomMiB as gcpolicy.Options.MaxHeadroom.
func (r Runtime) GCHeadroom() int64 {
	if r.GCHeadroomMiB < 0 {
		return -1
	}
	return int64(r.GCHeadroomMiB) << 20
}

// Log configures logging.
type Log struct {
	Level  string    `toml:"level"`                   // debug, info (default), warn, error
	Format LogFormat `toml:"format" reload:"restart"` // auto (default: console on a terminal, else JSON), json, console
}

// Listen is one client listener.
type Listen struct {
	Addr         string   `toml:"addr"`          // host:port, e.g. "[::]:993"
	Mode         string   `toml:"mode"`          // "tls" (implicit, default) or "starttls"
	Name         string   `toml:"name"`          // for logs and metrics; default: addr
	InsecureAuth []string `toml:"insecure_auth"` // CIDRs allowed to log in without TLS (starttls only)
	// CIDRs of load balancers that must send a PROXY protocol header.
	ProxyProtocolFrom []string `toml:"proxy_protocol_from"`
	Protocol          string   `toml:"protocol"`   // "imap" (default), "pop3", "sieve" or "lmtp"
	AllowFrom         []string `toml:"allow_from"` // lmtp: CIDRs of the MTAs; default anyone
}

// LMTP configures delivery through imapgate (protocol = "lmtp"
// listeners); zero means the default.
type LMTP struct {
	Hostname           string   `toml:"hostname"`            // greeting and Received; default the host name
	MaxMessageSize     int64    `toml:"max_message_size"`    // SIZE, bytes; default 64 MiB
	MaxRecipients      int      `toml:"max_recipients"`      // per transaction; default 1000
	HopLimit           int      `toml:"hop_limit"`           // Received fields before a loop is declared; default 30
	RecipientDelimiter string   `toml:"recipient_delimiter"` // e.g. "+": alice+x@ routes as alice@
	CommandTimeout     Duration `toml:"command_timeout"`     // default 5m
	BackendTimeout     Duration `toml:"backend_timeout"`     // default 2m
}

// TLS configures the listeners' certificates.
type TLS struct {
	Certificates []CertFile `toml:"certificates"`
	SelfSigned   []string   `toml:"self_signed_names"`
	NoSelfSigned bool       `toml:"no_self_signed"`
	MinVersion   string     `toml:"min_version"`
	CipherSuites []string   `toml:"cipher_suites"`
	ACME         ACME       `toml:"acme" reload:"restart"` // its challenge listeners start once
	// SessionTickets shares TLS session ticket keys across a fleet.
	SessionTickets SessionTickets `toml:"session_tickets" reload:"restart"`

	// RecordTakeover hands TLS 1.3 client sessions to imapgate's own
	// record layer after login (proxy.RecordsTakeover). Nil means true.
	RecordTakeover *bool `toml:"record_takeover"`
}

// Splice shapes the data path of logged-in sessions.
type Splice struct {
	// EventLoop carries taken-over TLS 1.3 sessions on the event loops
	// (proxy.LoopAuto) rather than a goroutine per direction
	// (proxy.LoopOff). Nil means true.
	EventLoop *bool `toml:"event_loop"`
}

// SessionTickets configures where the fleet's TLS session ticket keys
// live, so that a client resumes on any instance. Store is "" (auto:
// Consul KV when the Consul router or ACME storage is configured, else
// the file if File is set, else each instance its own keys), "consul",
// "file" or "off" (each instance its own keys, as crypto/tls rotates them).
type SessionTickets struct {
	Store     TicketStore `toml:"store"`
	File      string      `toml:"file"`       // store = "file": a JSON file, mode 0600
	ConsulKey string      `toml:"consul_key"` // default "imapgate/tls/session-ticket-keys"
	Rotation  Duration    `toml:"rotation"`   // how long a key seals tickets; default 6h
	Keep      int         `toml:"keep"`       // keys that open tickets; default 4
}

// CertFile is a certificate and its key in PEM files.
type CertFile struct {
	Cert string `toml:"cert"`
	Key  string `toml:"key"`
}

// ACME configures certificates from an ACME CA.
type ACME struct {
	Names          []string    `toml:"names"`
	Directory      string      `toml:"directory"`
	Email          string      `toml:"email"`
	CARoot         string      `toml:"ca_root"`
	HTTP01Addr     string      `toml:"http01_addr"`
	NoHTTP01       bool        `toml:"no_http01"`
	TLSALPN01Port  int         `toml:"tls_alpn01_port"`
	NoTLSALPN01    bool        `toml:"no_tls_alpn01"`
	OnDemandAllow  []string    `toml:"on_demand_allow"`
	Storage        ACMEStorage `toml:"storage"` // "file" (default) or "consul"
	StorageDir     string      `toml:"storage_dir"`
	ConsulPrefix   string      `toml:"consul_prefix"`
	NoOCSPStapling bool        `toml:"no_ocsp_stapling"`

	// Renewal timing; zero means the tls package's default.
	RenewalWindowRatio float64  `toml:"renewal_window_ratio"` // lifetime fraction left when renewal starts, 0 < r < 1; default 1/3
	RenewCheckInterval Duration `toml:"renew_check_interval"` // how often certificates are checked; default 10m
}

// PreAuth shapes what clients see before login.
type PreAuth struct {
	Greeting          string   `toml:"greeting"`
	IMAP4rev2         bool     `toml:"imap4rev2"`
	ExtraCapabilities []string `toml:"extra_capabilities"`
	Capabilities      []string `toml:"capabilities"`
	AuthMechanisms    []string `toml:"auth_mechanisms"` // PLAIN, LOGIN, XOAUTH2, OAUTHBEARER
}

// Limits bound clients; zero means the proxy's default.
type Limits struct {
	MaxLineLength       int      `toml:"max_line_length"`
	MaxLiteralSize      int      `toml:"max_literal_size"`
	MaxCommandSize      int      `toml:"max_command_size"`
	MaxBadCommands      int      `toml:"max_bad_commands"`
	MaxAuthFailures     int      `toml:"max_auth_failures"`
	AuthFailureDelay    Duration `toml:"auth_failure_delay"`
	MaxConnections      int      `toml:"max_connections"`
	MaxConnectionsPerIP int      `toml:"max_connections_per_ip"`
	IPFailureBurst      int      `toml:"ip_failure_burst"`
	IPFailureRefill     Duration `toml:"ip_failure_refill"`
	UserFailureBurst    int      `toml:"user_failure_burst"`
	UserFailureRefill   Duration `toml:"user_failure_refill"`
	FailureKeys         int      `toml:"failure_keys"`
	UserSlowdown        Duration `toml:"user_slowdown"`
	KnownNetworkTTL     Duration `toml:"known_network_ttl"`
	IPv4Prefix          int      `toml:"ipv4_prefix"`
	IPv6Prefix          int      `toml:"ipv6_prefix"`
}

// Timeouts bound protocol states; zero means the proxy's default.
type Timeouts struct {
	TLSHandshake   Duration `toml:"tls_handshake"`
	PreAuthIdle    Duration `toml:"preauth_idle"`
	Login          Duration `toml:"login"`
	BackendConnect Duration `toml:"backend_connect"`
	BackendLogin   Duration `toml:"backend_login"`
	BackendAuth    Duration `toml:"backend_auth"`
	HalfClose      Duration `toml:"half_close"`
	Idle           Duration `toml:"idle"`
	KeepAlive      Duration `toml:"keepalive"`
}

// BackendDefaults apply to every backend unless it says otherwise.
type BackendDefaults struct {
	NoForwardID bool `toml:"no_forward_id"`
	// NoPipelinedLogin: every login waits for the backend's greeting
	// before it sends the credentials (proxy.BackendOptions).
	NoPipelinedLogin   bool    `toml:"no_pipelined_login"`
	CAFile             string  `toml:"ca_file"`
	InsecureSkipVerify bool    `toml:"insecure_skip_verify"`
	Master             *Master `toml:"master"`
	// Pool keeps this many greeted connections ready per backend, so a
	// login skips the connect and the greeting (each used once, for one
	// user). Zero, the default, means none. Not for PROXY-protocol or
	// implicit-TLS backends.
	Pool       int      `toml:"pool"`
	PoolMaxAge Duration `toml:"pool_max_age"` // how long one may wait unused; default 30s
}

// Master configures master-user logins to the backends.
type Master struct {
	User         string `toml:"user"`
	Password     string `toml:"password"`
	PasswordFile string `toml:"password_file"` // the master password in a file, instead of password
	Form         string `toml:"form"`          // "authzid" (default) or "separator"
	Separator    string `toml:"separator"`     // default "*"
	Verify       string `toml:"verify"`        // "backend", or "file" with verify_file
	VerifyFile   string `toml:"verify_file"`   // user:{BLF-CRYPT}$2y$... lines
}

// Backend is one statically configured IMAP server.
type Backend struct {
	Addr               string `toml:"addr"`
	Security           string `toml:"security"` // none (default), tls, starttls
	Weight             int    `toml:"weight"`
	ServerName         string `toml:"server_name"`
	CAFile             string `toml:"ca_file"`
	InsecureSkipVerify bool   `toml:"insecure_skip_verify"`
	ProxyProtocol      int    `toml:"proxy_protocol"` // 0 (none), 1 or 2
	// The same server's other protocols (one backend, one placement).
	POP3Addr     string `toml:"pop3_addr"`     // host:port; security as for IMAP
	SieveAddr    string `toml:"sieve_addr"`    // host:port; security as for IMAP
	LMTPAddr     string `toml:"lmtp_addr"`     // host:port
	LMTPSecurity string `toml:"lmtp_security"` // none (default), tls, starttls
}

// Routing chooses and configures the router.
type Routing struct {
	Router  RouterKind          `toml:"router" reload:"restart"` // "static" (default), "consul", "http" or "ldap"
	Users   map[string]string   `toml:"users"`
	Domains map[string][]string `toml:"domains"`
	Default []string            `toml:"default"`
	// The directory routers (directory.go).
	HTTP      RoutingHTTP      `toml:"http" reload:"restart"`
	LDAP      RoutingLDAP      `toml:"ldap" reload:"restart"`
	Directory RoutingDirectory `toml:"directory" reload:"restart"`
}

// Consul configures the Consul router, registration and ACME storage.
type Consul struct {
	Address    string   `toml:"address"`
	Token      string   `toml:"token"`
	Datacenter string   `toml:"datacenter"`
	Service    string   `toml:"service"`
	Tag        string   `toml:"tag"`
	Prefix     string   `toml:"prefix"`
	Grace      Duration `toml:"grace"`
	PlaceRate  float64  `toml:"place_rate"`
	MoveHold   Duration `toml:"move_hold"` // a moved user's logins wait this long; default 0
	// UsersWatch is "full" (default) or "feed" (routing/consul.UsersWatch);
	// CacheSize bounds the feed's user cache (0: 100,000).
	UsersWatch string `toml:"users_watch"`
	CacheSize  int    `toml:"cache_size"`
	// VerifyInterval: the feed's periodic check of the live users (0: 10m).
	VerifyInterval Duration `toml:"verify_interval"`
	// SnapshotFile and SnapshotMaxAge: see consul_snapshot.go.
	SnapshotFile   string   `toml:"snapshot_file"`
	SnapshotMaxAge Duration `toml:"snapshot_max_age"`
	Register       Register `toml:"register"`
}

// Register configures imapgate's own service registration.
type Register struct {
	Enable    bool     `toml:"enable"`
	Name      string   `toml:"name"`
	ID        string   `toml:"id"`
	Address   string   `toml:"address"`
	Tags      []string `toml:"tags"`
	CheckHTTP string   `toml:"check_http"`
}

// HTTP configures the metrics, health and admin listener.
type HTTP struct {
	Addr       string `toml:"addr" reload:"restart"` // default "127.0.0.1:8080"; "" in the file keeps it, "off" disables
	AdminToken string `toml:"admin_token"`           // required when addr is not loopback
	// Hosts are names besides localhost and IP addresses that requests to
	// a tokenless admin API may carry in Host (DNS-rebinding defence).
	Hosts []string `toml:"hosts"`
}

// Shutdown configures draining.
type Shutdown struct {
	Grace       Duration `toml:"grace"`        // how long spliced sessions may go on; default 30s
	DrainWindow Duration `toml:"drain_window"` // spread the closing of idle sessions over this; default 10s
}

// Duration is a time.Duration written as "30s" or "5m" in the file.
type Duration time.Duration

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// D returns d as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// Load reads and decodes a file; unknown keys are an error.
func Load(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	c, err := Parse(string(b))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// Parse decodes a configuration from TOML text; unknown keys are an error.
func Parse(text string) (*Config, error) {
	var c Config
	md, err := toml.Decode(text, &c)
	if err != nil {
		return nil, redactTOMLError(text, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, len(und))
		for i, k := range und {
			keys[i] = k.String()
		}
		return nil, fmt.Errorf("unknown keys: %s", strings.Join(keys, ", "))
	}
	return &c, nil
}

// Validate checks what can be checked without starting anything: it
// builds every option struct (reading CA files) and reports all problems.
func (c *Config) Validate() error {
	var errs []error
	if len(c.Listen) == 0 {
		errs = append(errs, errors.New("no [[listen]] entries"))
	}
	for i, l := range c.Listen {
		if _, err := c.listener(l); err != nil {
			errs = append(errs, fmt.Errorf("listen[%d]: %w", i, err))
		}
	}
	if o, err := c.ProxyOptions(); err != nil {
		errs = append(errs, err)
	} else if err := o.Validate(); err != nil {
		// The proxy checks the rest of its options (mechanisms, master).
		errs = append(errs, err)
	}
	switch c.Routing.Router {
	case RouterStatic:
		if _, err := c.StaticRouter(); err != nil {
			errs = append(errs, err)
		}
	case RouterConsul:
		if c.Consul.Service == "" {
			errs = append(errs, errors.New("consul.service is required with routing.router = \"consul\""))
		}
		if _, err := consul.ParseUsersWatch(c.Consul.UsersWatch); err != nil {
			errs = append(errs, fmt.Errorf("consul.users_watch: %w", err))
		}
		if _, err := c.BackendTLS(); err != nil {
			errs = append(errs, err)
		}
	case RouterHTTP, RouterLDAP:
		if err := c.validateDirectory(); err != nil {
			errs = append(errs, err)
		}
	}
	if _, err := c.LogLevel(); err != nil {
		errs = append(errs, err)
	}
	if r := c.TLS.ACME.RenewalWindowRatio; r < 0 || r >= 1 {
		errs = append(errs, fmt.Errorf("tls.acme.renewal_window_ratio %v: want a fraction between 0 and 1", r))
	}
	for i, cf := range c.TLS.Certificates {
		if cf.Cert == "" || cf.Key == "" {
			errs = append(errs, fmt.Errorf("tls.certificates[%d]: cert and key are both required", i))
		}
	}
	if a := c.HTTP.Addr; a != "" && a != "off" {
		if err := CheckAdminExposure(a, c.HTTP.AdminToken); err != nil {
			errs = append(errs, err)
		}
	}
	for _, h := range c.HTTP.Hosts {
		if h == "" || strings.ContainsAny(h, ":/ ") {
			errs = append(errs, fmt.Errorf("http.hosts: %q is not a host name (no port, no scheme)", h))
		}
	}
	return errors.Join(errs...)
}

// CheckAdminExposure refuses an admin API listening on addr (host:port)
// without a token unless addr is a loopback address. The binary checks the
// address it actually bound, which a reload does not change.
func CheckAdminExposure(addr, token string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("http.addr: %w", err)
	}
	if ip, err := netip.ParseAddr(host); (err != nil || !ip.IsLoopback()) && token == "" {
		return fmt.Errorf("http.admin_token is required when the admin API listens on %s, not a loopback address", addr)
	}
	return nil
}

// LogLevel parses log.level.
func (c *Config) LogLevel() (string, error) {
	switch l := strings.ToLower(c.Log.Level); l {
	case "":
		return "info", nil
	case "debug", "info", "warn", "error":
		return l, nil
	}
	return "", fmt.Errorf("log.level: unknown level %q", c.Log.Level)
}

// Listeners returns the listeners with their addresses.
func (c *Config) Listeners() ([]ListenerSpec, error) {
	out := make([]ListenerSpec, 0, len(c.Listen))
	for i, l := range c.Listen {
		pl, err := c.listener(l)
		if err != nil {
			return nil, fmt.Errorf("listen[%d]: %w", i, err)
		}
		out = append(out, ListenerSpec{Addr: l.Addr, Listener: pl})
	}
	return out, nil
}

// ListenerSpec is a listener's address and what it serves.
type ListenerSpec struct {
	Addr     string
	Listener proxy.Listener
}

func (c *Config) listener(l Listen) (proxy.Listener, error) {
	var pl proxy.Listener
	if _, _, err := net.SplitHostPort(l.Addr); err != nil {
		return pl, fmt.Errorf("addr %q: %w", l.Addr, err)
	}
	var err error
	if pl.Protocol, err = routing.ParseProtocol(l.Protocol); err != nil {
		return pl, err
	}
	mode := strings.ToLower(l.Mode)
	if mode == "" && pl.Protocol == routing.ProtocolLMTP {
		mode = "starttls" // LMTP is cleartext, STARTTLS if TLS is configured
	}
	if len(l.AllowFrom) > 0 && pl.Protocol != routing.ProtocolLMTP {
		return pl, errors.New("allow_from is only for protocol = \"lmtp\"")
	}
	if pl.AllowFrom, err = prefixes(l.AllowFrom); err != nil {
		return pl, fmt.Errorf("allow_from: %w", err)
	}
	if len(l.ProxyProtocolFrom) > 0 && pl.Protocol == routing.ProtocolLMTP {
		return pl, errors.New("proxy_protocol_from is not supported on an lmtp listener")
	}
	switch mode {
	case "", "tls", "implicit", "imaps":
		pl.Mode = proxy.ImplicitTLS
	case "starttls":
		pl.Mode = proxy.StartTLS
	default:
		return pl, fmt.Errorf("mode %q: want \"tls\" or \"starttls\"", l.Mode)
	}
	pl.Name = l.Name
	if pl.Name == "" {
		pl.Name = l.Addr
	}
	if len(l.InsecureAuth) > 0 && pl.Mode != proxy.StartTLS {
		return pl, errors.New("insecure_auth only makes sense on a starttls listener")
	}
	if pl.InsecureAuth, err = prefixes(l.InsecureAuth); err != nil {
		return pl, fmt.Errorf("insecure_auth: %w", err)
	}
	if pl.ProxyProtocolFrom, err = prefixes(l.ProxyProtocolFrom); err != nil {
		return pl, fmt.Errorf("proxy_protocol_from: %w", err)
	}
	return pl, nil
}

func prefixes(ss []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range ss {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, err
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

// ProxyOptions returns the proxy options this file sets. Router, TLS,
// Logger and Metrics are left for the caller.
func (c *Config) ProxyOptions() (proxy.Options, error) {
	o := proxy.Options{
		Greeting: c.PreAuth.Greeting,
		Capabilities: proxy.CapabilityOptions{
			IMAP4rev2:      c.PreAuth.IMAP4rev2,
			Extra:          c.PreAuth.ExtraCapabilities,
			Replace:        c.PreAuth.Capabilities,
			AuthMechanisms: c.PreAuth.AuthMechanisms,
		},
		Limits: proxy.Limits{
			MaxLineLength:       c.Limits.MaxLineLength,
			MaxLiteralSize:      c.Limits.MaxLiteralSize,
			MaxCommandSize:      c.Limits.MaxCommandSize,
			MaxBadCommands:      c.Limits.MaxBadCommands,
			MaxAuthFailures:     c.Limits.MaxAuthFailures,
			AuthFailureDelay:    c.Limits.AuthFailureDelay.D(),
			MaxConnections:      c.Limits.MaxConnections,
			MaxConnectionsPerIP: c.Limits.MaxConnectionsPerIP,
			IPFailures:          proxy.RateLimit{Burst: c.Limits.IPFailureBurst, Refill: c.Limits.IPFailureRefill.D()},
			UserFailures:        proxy.RateLimit{Burst: c.Limits.UserFailureBurst, Refill: c.Limits.UserFailureRefill.D()},
			FailureKeys:         c.Limits.FailureKeys,
			UserSlowdown:        c.Limits.UserSlowdown.D(),
			KnownNetworkTTL:     c.Limits.KnownNetworkTTL.D(),
			IPv4Prefix:          c.Limits.IPv4Prefix,
			IPv6Prefix:          c.Limits.IPv6Prefix,
		},
		Timeouts: proxy.Timeouts{
			TLSHandshake:   c.Timeouts.TLSHandshake.D(),
			PreAuthIdle:    c.Timeouts.PreAuthIdle.D(),
			Login:          c.Timeouts.Login.D(),
			BackendConnect: c.Timeouts.BackendConnect.D(),
			BackendLogin:   c.Timeouts.BackendLogin.D(),
			BackendAuth:    c.Timeouts.BackendAuth.D(),
			HalfClose:      c.Timeouts.HalfClose.D(),
			Idle:           c.Timeouts.Idle.D(),
			KeepAlive:      c.Timeouts.KeepAlive.D(),
		},
	}
	o.Backend.NoForwardID = c.Backend.NoForwardID
	o.Backend.NoPipelinedLogin = c.Backend.NoPipelinedLogin
	if c.TLS.RecordTakeover != nil && !*c.TLS.RecordTakeover {
		o.TLSRecords = proxy.RecordsCryptoTLS
	}
	if c.Splice.EventLoop != nil && !*c.Splice.EventLoop {
		o.SpliceLoop = proxy.LoopOff
	}
	o.LMTP = proxy.LMTPOptions{
		Hostname:           c.LMTP.Hostname,
		MaxMessageBytes:    c.LMTP.MaxMessageSize,
		MaxRecipients:      c.LMTP.MaxRecipients,
		HopLimit:           c.LMTP.HopLimit,
		RecipientDelimiter: c.LMTP.RecipientDelimiter,
		CommandTimeout:     c.LMTP.CommandTimeout.D(),
		BackendTimeout:     c.LMTP.BackendTimeout.D(),
	}
	if c.Backend.Pool < 0 {
		return o, errors.New("backend.pool must not be negative")
	}
	o.Backend.Pool = proxy.PoolOptions{Size: c.Backend.Pool, MaxAge: c.Backend.PoolMaxAge.D()}
	if c.Limits.MaxLineLength != 0 && c.Limits.MaxLineLength < 1024 {
		return o, errors.New("limits.max_line_length must be at least 1024")
	}
	bt, err := c.backendTLS(c.Backend.CAFile, "", c.Backend.InsecureSkipVerify)
	if err != nil {
		return o, err
	}
	o.Backend.TLS = bt
	if o.Backend.Master, err = c.master(); err != nil {
		return o, err
	}
	return o, nil
}

// master builds the master-login options, reading its files.
func (c *Config) master() (*proxy.MasterLogin, error) {
	m := c.Backend.Master
	if m == nil {
		return nil, nil
	}
	ml := &proxy.MasterLogin{User: m.User, Password: m.Password, Separator: m.Separator}
	if m.User == "" {
		return nil, errors.New("backend.master.user is required")
	}
	if m.PasswordFile != "" {
		b, err := os.ReadFile(m.PasswordFile)
		if err != nil {
			return nil, fmt.Errorf("backend.master.password_file: %w", err)
		}
		ml.Password = strings.TrimRight(string(b), "\r\n")
	}
	if ml.Password == "" {
		return nil, errors.New("backend.master: password or password_file is required")
	}
	switch m.Form {
	case "", "authzid":
		ml.Form = proxy.MasterAuthzid
	case "separator":
		ml.Form = proxy.MasterSeparator
	default:
		return nil, fmt.Errorf("backend.master.form %q: want \"authzid\" or \"separator\"", m.Form)
	}
	switch m.Verify {
	case "backend":
		ml.Verifier = proxy.VerifyOnBackend
	case "file":
		pf, err := proxy.LoadPasswdFile(m.VerifyFile)
		if err != nil {
			return nil, fmt.Errorf("backend.master.verify_file: %w", err)
		}
		ml.Verifier = pf
	default:
		return nil, errors.New(`backend.master.verify must be "backend" or "file" (a master login must check the client's password somewhere)`)
	}
	return ml, nil
}

// backendTLS builds a client TLS config, or nil when nothing is set.
func (c *Config) backendTLS(caFile, serverName string, insecure bool) (*tls.Config, error) {
	if caFile == "" && serverName == "" && !insecure {
		return nil, nil
	}
	cfg := &tls.Config{ServerName: serverName, InsecureSkipVerify: insecure, MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("backend CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("backend CA file %s: no PEM certificates", caFile)
		}
		cfg.RootCAs = pool
	}
	return cfg, nil
}

// StaticConfig builds the static router's configuration.
func (c *Config) StaticConfig() (routing.StaticConfig, error) {
	sc := routing.StaticConfig{
		Backends: make(map[string]*routing.Backend, len(c.Backends)),
		Users:    make(map[string]string, len(c.Routing.Users)),
		Domains:  make(map[string][]string, len(c.Routing.Domains)),
		Default:  c.Routing.Default,
	}
	if len(c.Backends) == 0 {
		return sc, errors.New("no [backends.NAME] entries for the static router")
	}
	names := make([]string, 0, len(c.Backends))
	for n := range c.Backends {
		names = append(names, n)
	}
	slices.Sort(names)
	var errs []error
	for _, name := range names {
		b := c.Backends[name]
		sec, err := routing.ParseSecurity(b.Security)
		if err != nil {
			errs = append(errs, fmt.Errorf("backends.%s: %w", name, err))
			continue
		}
		if _, _, err := net.SplitHostPort(b.Addr); err != nil {
			errs = append(errs, fmt.Errorf("backends.%s.addr %q: %w", name, b.Addr, err))
			continue
		}
		if b.ProxyProtocol < 0 || b.ProxyProtocol > 2 {
			errs = append(errs, fmt.Errorf("backends.%s.proxy_protocol: want 0, 1 or 2", name))
		}
		rb := &routing.Backend{ID: name, Addr: b.Addr, Security: sec, Weight: b.Weight, ProxyProtocol: b.ProxyProtocol}
		if err := protocolAddrs(rb, b); err != nil {
			errs = append(errs, fmt.Errorf("backends.%s.%w", name, err))
		}
		if sec != routing.SecurityNone {
			ca := b.CAFile
			if ca == "" {
				ca = c.Backend.CAFile
			}
			if rb.TLS, err = c.backendTLS(ca, b.ServerName, b.InsecureSkipVerify || c.Backend.InsecureSkipVerify); err != nil {
				errs = append(errs, fmt.Errorf("backends.%s: %w", name, err))
			}
		}
		sc.Backends[name] = rb
	}
	errs = append(errs, normalizeKeys(sc.Users, c.Routing.Users, "routing.users", "user")...)
	errs = append(errs, normalizeKeys(sc.Domains, c.Routing.Domains, "routing.domains", "domain")...)
	return sc, errors.Join(errs...)
}

// normalizeKeys copies from into to under normalised keys. Two keys that
// normalise alike would each win at random on every load: they are
// refused (sorted, so the message is stable).
func normalizeKeys[V any](to, from map[string]V, key, what string) []error {
	var errs []error
	seen := map[string]string{}
	for _, k := range slices.Sorted(maps.Keys(from)) {
		n := routing.NormalizeUser(k)
		if prev, dup := seen[n]; dup {
			errs = append(errs, fmt.Errorf("%s: %q and %q are the same %s %q; keep one", key, prev, k, what, n))
			continue
		}
		seen[n] = k
		to[n] = from[k]
	}
	return errs
}

// StaticRouter builds the static router.
func (c *Config) StaticRouter() (*routing.Static, error) {
	sc, err := c.StaticConfig()
	if err != nil {
		return nil, err
	}
	r, err := routing.NewStatic(sc)
	if err != nil {
		return nil, fmt.Errorf("routing: %w", err)
	}
	return r, nil
}

// BackendTLS is the [backend] section's client TLS template, or nil.
func (c *Config) BackendTLS() (*tls.Config, error) {
	return c.backendTLS(c.Backend.CAFile, "", c.Backend.InsecureSkipVerify)
}

// ConsulClient builds a Consul API client from [consul] over the
// CONSUL_HTTP_* environment.
func (c *Config) ConsulClient() (*api.Client, error) {
	client, _, err := consul.NewConsulClient(consul.ConsulClientConfig{
		Address: c.Consul.Address, Token: c.Consul.Token, Datacenter: c.Consul.Datacenter,
	})
	return client, err
}

// protocolAddrs copies a backend's POP3, Sieve and LMTP addresses.
func protocolAddrs(rb *routing.Backend, b Backend) error {
	for _, a := range []struct{ key, v string }{{"pop3_addr", b.POP3Addr}, {"sieve_addr", b.SieveAddr}, {"lmtp_addr", b.LMTPAddr}} {
		if a.v == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(a.v); err != nil {
			return fmt.Errorf("%s %q: %w", a.key, a.v, err)
		}
	}
	rb.POP3Addr, rb.SieveAddr, rb.LMTPAddr = b.POP3Addr, b.SieveAddr, b.LMTPAddr
	sec, err := routing.ParseSecurity(b.LMTPSecurity)
	if err != nil {
		return fmt.Errorf("lmtp_security: %w", err)
	}
	rb.LMTPSecurity = sec
	return nil
}
