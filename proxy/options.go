package proxy

import (
	"context"
	"crypto/tls"
	"net"
	"net/netip"
	"time"

	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

// Options configure a Server. Every field's zero value means the default
// written beside it, so Options{Router: r, TLS: cfg} is a working server.
type Options struct {
	// Router finds each user's backend. Required.
	Router routing.Router
	// TLS is the server-side configuration for implicit-TLS listeners and
	// STARTTLS. Required unless every listener is cleartext with
	// InsecureAuth covering every client.
	TLS *tls.Config
	// TLSRecords says who carries a client's TLS records once its session
	// is spliced. The zero value is RecordsTakeover.
	TLSRecords RecordMode
	// SpliceLoop says whether taken-over TLS 1.3 sessions are carried by
	// the event loops (evloop_linux.go) instead of a goroutine per
	// direction. The zero value, LoopAuto, uses a loop wherever it
	// applies.
	SpliceLoop LoopMode
	// Logger receives one line per session end and per failure. Nil means
	// no logging.
	Logger *zap.Logger
	// Metrics is told about sessions and logins. Nil means none.
	Metrics Metrics
	// Greeting is the text of the "* OK" greeting. Empty means
	// "imapgate ready.".
	Greeting string
	// Capabilities shape the pre-auth CAPABILITY list.
	Capabilities CapabilityOptions
	// Backend shapes how imapgate logs in to backends.
	Backend BackendOptions
	// Limits bound what a client may cost.
	Limits Limits
	// Timeouts bound how long each protocol state may last.
	Timeouts Timeouts
	// LMTP shapes the LMTP front end (lmtp.go), for Listeners with
	// Protocol LMTP.
	LMTP LMTPOptions
}

// CapabilityOptions shape the capability list imapgate advertises before
// login. After login the client is told the backend's own list.
type CapabilityOptions struct {
	// IMAP4rev2 adds IMAP4rev2 to the list; set it only when every backend
	// supports it.
	IMAP4rev2 bool
	// Extra capabilities appended to the list (e.g. "UTF8=ACCEPT" when the
	// backends have it).
	Extra []string
	// Replace, if not empty, is the whole list instead of the built-in
	// one; STARTTLS, LOGINDISABLED and AUTH= are still added or left out
	// as the connection's state requires.
	Replace []string
	// AuthMechanisms are the SASL mechanisms offered (AUTH=...) once
	// credentials may be sent: any of PLAIN, LOGIN, XOAUTH2 and
	// OAUTHBEARER. The OAuth ones are relayed to the backend, which must
	// offer them too. Empty means PLAIN and LOGIN.
	AuthMechanisms []string
}

// BackendOptions shape the login imapgate performs on the backend.
type BackendOptions struct {
	// NoForwardID turns off the ID command imapgate sends before login
	// carrying the client's address (x-originating-ip and friends, which
	// Dovecot honours from its login_trusted_networks) and the client's own
	// ID fields. Zero means forward.
	NoForwardID bool
	// TLS is the default client TLS config for backends whose
	// routing.Backend has none. Nil means system roots.
	TLS *tls.Config
	// Master, if not nil, makes imapgate log in to backends as a master
	// user on behalf of the client, after Master.Verifier accepted the
	// client's password. OAuth logins are still relayed as they are.
	Master *MasterLogin
	// Pool keeps greeted connections ready per backend (pool.go). The
	// zero value means none: every login connects.
	Pool PoolOptions
	// NoPipelinedLogin makes every login wait for the backend's greeting
	// before it sends the credentials. Zero means that a login to a
	// backend whose last greeting is known sends them at once, the
	// greeting read and checked after (backend.go, pipelinedLogin).
	NoPipelinedLogin bool
}

// MasterForm is how a master login names the user it acts for.
type MasterForm uint8

const (
	// MasterAuthzid uses AUTHENTICATE PLAIN with the user as the
	// authorization identity and the master as the authentication identity
	// (RFC 4616); Dovecot and Cyrus accept it.
	MasterAuthzid MasterForm = iota
	// MasterSeparator logs in as "user" + Separator + "master" (Dovecot's
	// auth_master_user_separator), for backends without AUTH=PLAIN.
	MasterSeparator
)

// MasterLogin configures master-user logins.
type MasterLogin struct {
	User     string
	Password string
	Form     MasterForm
	// Separator for MasterSeparator. Empty means "*".
	Separator string
	// Verifier checks the client's own password first. Required: without
	// it anyone could log in as anyone.
	Verifier PasswordVerifier
}

// PasswordVerifier checks a user's password, for master-user logins.
type PasswordVerifier interface {
	// VerifyPassword returns nil if pass is user's password, an error
	// wrapping ErrBadPassword if it is not, or another error if it cannot
	// tell (the client then gets NO [UNAVAILABLE]).
	VerifyPassword(ctx context.Context, user, pass string) error
}

// Limits bound what one client may cost. Zero means the default given;
// where said, a negative value means no limit.
type Limits struct {
	// MaxLineLength is the longest pre-auth command line in bytes, CRLF
	// included; a longer one gets a tagged BAD [TOOBIG] and the client
	// goes on at its next line. Zero means 64 KiB: RFC 2971's largest ID
	// (30 fields of 30 octets, values of 1,024) is a 31,807-byte line,
	// 63.4 KiB with every character escaped; a SASL-IR PLAIN response is at
	// most 1,024 bytes of base64 (RFC 4616: 255 octets each), an OAuth
	// bearer token a few KiB. Memory beyond 4 KiB is held only while a
	// long line is read.
	MaxLineLength int
	// MaxLiteralSize is the largest literal accepted before login (a
	// LOGIN user or password, an ID value of at most 1,024). Zero means
	// 16 KiB.
	MaxLiteralSize int
	// MaxCommandSize is the largest whole pre-auth command (lines and
	// literals), and how far past the line limit a line is skipped before
	// the client gets BYE instead. Zero means 128 KiB.
	MaxCommandSize int
	// MaxBadCommands is how many invalid or unknown commands a client may
	// send before login until it gets BYE. Zero means 5.
	MaxBadCommands int
	// MaxAuthFailures is how many failed logins one connection may make
	// before it gets BYE. Zero means 3.
	MaxAuthFailures int
	// AuthFailureDelay is how long a failed login takes at least before
	// its NO, counted from the command: delay × the connection's failures.
	// Time the backend already took to say NO counts towards it, so a
	// backend's own penalty (Dovecot's) and this one do not add up: the
	// client waits the longer of the two. Zero means 2 s; negative means
	// none (tests, trusted networks).
	AuthFailureDelay time.Duration
	// MaxConnections is the most concurrent client connections. Zero or
	// negative means no limit here (the binary derives one from the
	// open-file limit).
	MaxConnections int
	// MaxConnectionsPerIP is the most concurrent connections from one
	// client network (see IPv4Prefix and IPv6Prefix). Zero means 100;
	// negative means no limit.
	MaxConnectionsPerIP int
	// IPv4Prefix and IPv6Prefix are the prefix lengths of a client
	// network, the unit every per-client limit counts in (connections,
	// failed logins). Zero means 32 (an IPv4 address) and 64 (an IPv6
	// /64: one host usually has a whole one).
	IPv4Prefix, IPv6Prefix int
	// IPFailures limits failed logins per client network, at any users:
	// an empty bucket gets NO [LIMIT] without asking the backend. Zero
	// values mean a burst of 20 refilled one every 6 s.
	IPFailures RateLimit
	// UserFailures limits failed logins per user name from networks not
	// known for the user (KnownNetworkTTL). An empty bucket never refuses
	// (that would lock the real user out): it slows, see UserSlowdown.
	// Zero values mean a burst of 30 refilled one every 20 s. The policy
	// is described in limits.go and the README.
	UserFailures RateLimit
	// UserSlowdown is how long a login waits before the backend is asked
	// when its user's bucket is empty and its network is not known for
	// the user; each such network may have one slowed login per user at a
	// time. Zero means 10 s; negative means no slow-down.
	UserSlowdown time.Duration
	// KnownNetworkTTL is how long a network that logged in as a user stays
	// known for that user: its logins are neither charged to nor slowed by
	// the user's bucket. Zero means 30 days; negative means no network is
	// ever known.
	KnownNetworkTTL time.Duration
	// FailureKeys bounds how many networks and users the failure limits
	// remember (each limit separately). Zero means 100,000.
	FailureKeys int
}

// RateLimit is a token bucket: Burst failures at once, then one more each
// Refill. A negative Burst turns the limit off.
type RateLimit struct {
	Burst  int
	Refill time.Duration
}

// Timeouts bound each protocol state. Zero means the default given;
// negative means no timeout where said.
type Timeouts struct {
	// TLSHandshake bounds the client's TLS handshake (implicit or after
	// STARTTLS). Zero means 20 s.
	TLSHandshake time.Duration
	// PreAuthIdle is how long imapgate waits for the next command before
	// login. Zero means 60 s.
	PreAuthIdle time.Duration
	// Login bounds the whole Not Authenticated state, from accept to the
	// tagged OK of a login. Zero means 3 min.
	Login time.Duration
	// BackendConnect bounds the TCP connect to a backend. Zero means 5 s.
	BackendConnect time.Duration
	// BackendLogin bounds the backend exchange before the credentials
	// are sent: TLS, greeting, STARTTLS and CAPABILITY. Zero means 15 s.
	BackendLogin time.Duration
	// BackendAuth bounds the wait for the backend's answer to the login
	// itself (LOGIN or AUTHENTICATE, and the CAPABILITY after it). A
	// backend that delays a wrong password (Dovecot's auth penalty, up to
	// 15 s plus its auth_failure_delay) is not down: this must be longer
	// than any such delay. Zero means 60 s.
	BackendAuth time.Duration
	// HalfClose is how long the backend may go on answering after the
	// client closed its half of the connection (a backend that closes
	// ends the session at once). Zero means 10 s.
	HalfClose time.Duration
	// Idle closes a spliced session after this long without a byte either
	// way. Zero or negative means never: IMAP servers have their own
	// autologout and IDLE lasts 29 minutes.
	Idle time.Duration
	// KeepAlive is how long either leg of a session (the client's
	// connection accepted by Serve, the backend connection imapgate
	// dials) may be silent before TCP keep-alive probes start; then one
	// every 30 s, and the connection is dropped after 4 unanswered, so a
	// dead peer is found within KeepAlive plus 2 min. Zero means 2 min
	// (Go's own default is 15 s: eight times the probes, for a mostly idle
	// population); negative turns keep-alive off.
	KeepAlive time.Duration
}

// keepAlive is the keep-alive configuration of both legs for t.
func (t Timeouts) keepAlive() net.KeepAliveConfig {
	if t.KeepAlive < 0 {
		return net.KeepAliveConfig{}
	}
	return net.KeepAliveConfig{Enable: true, Idle: t.KeepAlive, Interval: 30 * time.Second, Count: 4}
}

// dialer dials backends with t's connect timeout and keep-alive.
func (t Timeouts) dialer() net.Dialer {
	d := net.Dialer{Timeout: t.BackendConnect, KeepAliveConfig: t.keepAlive()}
	if !d.KeepAliveConfig.Enable {
		d.KeepAlive = -1
	}
	return d
}

// RecordMode says who carries a TLS client's records after login
// (tlstakeover_linux.go, internal/tls13).
type RecordMode uint8

const (
	// RecordsTakeover (the zero value): a TLS 1.3 session is handed from
	// crypto/tls to imapgate's own record layer when the splice starts,
	// so that an idle session keeps only its traffic secrets and sequence
	// numbers. TLS 1.2 sessions, and any session that cannot be handed
	// over exactly (bytes still buffered in crypto/tls, an unknown Go
	// version), stay on crypto/tls. Linux only.
	RecordsTakeover RecordMode = iota
	// RecordsCryptoTLS keeps every session on crypto/tls for its life.
	RecordsCryptoTLS
)

// LoopMode says which data path carries a spliced session.
type LoopMode uint8

const (
	// LoopAuto (the zero value): a session whose client leg is carried by
	// imapgate's record layer (RecordsTakeover) and whose backend leg is
	// plain TCP is served by one of the Server's event loops, on Linux,
	// when no Timeouts.Idle is set. Every other session runs its two
	// directions in goroutines.
	LoopAuto LoopMode = iota
	// LoopOff runs every spliced session in goroutines.
	LoopOff
)

// ListenMode is how a listener's clients start.
type ListenMode uint8

const (
	// ImplicitTLS listeners handshake TLS first (port 993).
	ImplicitTLS ListenMode = iota
	// StartTLS listeners speak cleartext IMAP and offer STARTTLS (port 143).
	StartTLS
)

func (m ListenMode) String() string {
	if m == StartTLS {
		return "starttls"
	}
	return "tls"
}

// Listener describes what a net.Listener given to Serve is for.
type Listener struct {
	// Name identifies the listener in logs and metrics. Empty means its
	// address.
	Name string
	// Mode is implicit TLS (the zero value) or cleartext with STARTTLS.
	Mode ListenMode
	// InsecureAuth lists client networks that may log in on a StartTLS
	// listener without TLS (a trusted network, a local webmail). Empty
	// means nobody: LOGINDISABLED is advertised until STARTTLS.
	InsecureAuth []netip.Prefix
	// ProxyProtocolFrom lists the load balancers' networks: a connection
	// from them must start with a PROXY protocol (v1 or v2) header, whose
	// client address then counts for limits, logs and the backend. Other
	// peers are never believed: a PROXY line from them is a bad command.
	// Empty means none.
	ProxyProtocolFrom []netip.Prefix
	// Protocol is what the listener speaks: IMAP (the zero value), POP3,
	// ManageSieve or LMTP (see lmtp.go, pop3.go, sieve.go).
	Protocol routing.Protocol
	// AllowFrom lists the networks clients may connect from (LMTP only:
	// the MTAs). Empty means anyone.
	AllowFrom []netip.Prefix
}

func (o *Options) withDefaults() Options {
	r := *o
	if r.Logger == nil {
		r.Logger = zap.NewNop()
	}
	if r.Metrics == nil {
		r.Metrics = nopMetrics{}
	}
	if r.Greeting == "" {
		r.Greeting = "imapgate ready."
	}
	l := &r.Limits
	def(&l.MaxLineLength, 64<<10)
	def(&l.MaxLiteralSize, 16<<10)
	def(&l.MaxCommandSize, 128<<10)
	def(&l.MaxBadCommands, 5)
	def(&l.MaxAuthFailures, 3)
	def(&l.AuthFailureDelay, 2*time.Second)
	def(&l.MaxConnectionsPerIP, 100)
	def(&l.IPFailures.Burst, 20)
	def(&l.IPFailures.Refill, 6*time.Second)
	def(&l.UserFailures.Burst, 30)
	def(&l.UserFailures.Refill, 20*time.Second)
	def(&l.FailureKeys, 100_000)
	def(&l.UserSlowdown, 10*time.Second)
	def(&l.KnownNetworkTTL, 30*24*time.Hour)
	def(&l.IPv4Prefix, 32)
	def(&l.IPv6Prefix, 64)
	if len(r.Capabilities.AuthMechanisms) == 0 {
		r.Capabilities.AuthMechanisms = []string{"PLAIN", "LOGIN"}
	}
	t := &r.Timeouts
	def(&t.TLSHandshake, 20*time.Second)
	def(&t.PreAuthIdle, 60*time.Second)
	def(&t.Login, 3*time.Minute)
	def(&t.BackendConnect, 5*time.Second)
	def(&t.BackendLogin, 15*time.Second)
	def(&t.BackendAuth, 60*time.Second)
	def(&t.HalfClose, 10*time.Second)
	def(&t.KeepAlive, 2*time.Minute)
	return r
}

func def[T int | time.Duration](v *T, d T) {
	if *v == 0 {
		*v = d
	}
}

// handshakeConfig pairs a TLS configuration with the handshake
// configuration built for it while records may be taken over
// (Server.handshakeConfig, tlstakeover_linux.go).
type handshakeConfig struct{ base, outer *tls.Config }
