// Package lmtp is imapgate's delivery front end: an LMTP (RFC 2033)
// server for the MTAs that routes every recipient with the same Router as
// IMAP logins and relays the message to each recipient's own backend over
// LMTP, so that delivery and login always agree on where a user lives.
//
// One transaction from the MTA becomes one backend transaction per
// backend its recipients live on. RCPT is relayed at once (the backend's
// answer, success or refusal, is the MTA's answer), and only a recipient
// the backend accepted is committed to the router (routing.Committer):
// made-up addresses never become placements. The message is streamed to
// all the backends in parallel, a chunk at a time (bounded memory
// whatever its size), and after the final dot the MTA gets one reply per
// recipient: the backend's own. A backend that is down, slow or failing
// costs its recipients a 4xx (the MTA retries them), never a 5xx of
// imapgate's making and never a silent drop; the other backends'
// recipients are not affected.
//
// Typical use (proxy.Server does this for a [[listen]] with protocol =
// "lmtp"):
//
//	srv, err := lmtp.NewServer(lmtp.Options{Router: r, Logger: log})
//	go srv.Serve(ln, lmtp.Listener{AllowFrom: mtas})
//	...
//	srv.Shutdown(ctx)
//
// The backend learns the MTA's client with XCLIENT ADDR/PORT/HELO when it
// offers it (Dovecot does to its login_trusted_networks). Loops are cut:
// a backend that greets as an imapgate is refused (4.4.6), and a message
// with Options.HopLimit Received headers is refused (5.4.6).
package lmtp

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base32"
	"errors"
	"github.com/imapgate/imapgate/proxy/internal/addr"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

// Options configure a Server. Every zero value means the default beside
// it.
type Options struct {
	// Router finds each recipient's backend. Required. If it implements
	// routing.Committer, a recipient's placement is committed once its
	// backend accepted the RCPT.
	Router routing.Router
	// Logger gets one line per transaction and per failure. Nil means
	// none.
	Logger *zap.Logger
	// TLS, if set, is offered to MTAs with STARTTLS.
	TLS *tls.Config
	// BackendTLS is the client TLS config for backends whose
	// routing.Backend has none. Nil means system roots.
	BackendTLS *tls.Config
	// Hostname names this server in its greeting and Received header.
	// Empty means os.Hostname().
	Hostname string
	// MaxMessageBytes is the largest message accepted (advertised as
	// SIZE). Zero means 64 MiB.
	MaxMessageBytes int64
	// MaxRecipients bounds one transaction. Zero means 1000.
	MaxRecipients int
	// HopLimit is how many Received header fields a message may carry
	// before it is refused as a loop. Zero means 30.
	HopLimit int
	// RecipientDelimiter, if set (e.g. "+"), is cut from the local part
	// before routing: alice+lists@example.org routes as alice@example.org
	// (the backend still gets the full address). Empty means none.
	RecipientDelimiter string
	// Timeouts bound each step.
	Timeouts Timeouts
	// Metrics is told each recipient's fate. Nil means none.
	Metrics Metrics
}

// Metrics counts recipients. Calls are cheap and concurrent; labels are
// bounded (backend IDs and the words below).
type Metrics interface {
	// Recipient is called once per RCPT ("rcpt") and once per accepted
	// recipient after the message ("data"), with result "ok", "refused"
	// (a 5xx, the backend's or a loop's) or "deferred" (a 4xx). backend
	// is "" when none was found.
	Recipient(backend, stage, result string)
}

type nopMetrics struct{}

func (nopMetrics) Recipient(_, _, _ string) {}

// result classifies a reply for Metrics.
func result(e *smtp.SMTPError) string {
	switch {
	case e == nil || e.Code/100 == 2:
		return "ok"
	case e.Code/100 == 4:
		return "deferred"
	}
	return "refused"
}

// Timeouts for LMTP. Zero means the default given.
type Timeouts struct {
	// Command is how long an MTA may take to send its next command or
	// the next bytes of a message. Zero means 5 min (RFC 5321).
	Command time.Duration
	// BackendConnect bounds the TCP connect to a backend. Zero means 5 s.
	BackendConnect time.Duration
	// Backend bounds each backend exchange: the greeting, LHLO and
	// XCLIENT together, each command's reply, each chunk of the message,
	// and the replies after the final dot. Zero means 2 min.
	Backend time.Duration
}

// Listener describes one listening socket given to Serve.
type Listener struct {
	// Name identifies the listener in logs. Empty means its address.
	Name string
	// AllowFrom lists the networks MTAs may connect from; others get 554
	// and are closed. Empty means anyone (put the port behind a firewall).
	AllowFrom []netip.Prefix
	// TLS makes the listener implicit TLS with Options.TLS. Zero means
	// cleartext (with STARTTLS when Options.TLS is set).
	TLS bool
}

// Server is an LMTP front end. Create it with NewServer, give it
// listeners with Serve, stop it with Shutdown or Close.
type Server struct {
	o    Options
	log  *zap.Logger
	smtp *smtp.Server

	// base is cancelled by Close: it ends every transaction's backend work.
	base   context.Context
	cancel context.CancelFunc

	mu       sync.Mutex
	conns    map[*trackedConn]*session // every MTA connection; its session after LHLO
	shutting bool                      // Shutdown was called: idle connections are closed
}

// maxLine is the longest line accepted, in commands and messages.
const maxLine = 64 << 10

// marker is what every imapgate puts in its LMTP greeting: a backend that
// greets with it is an imapgate, i.e. a loop.
const marker = "(imapgate)"

// NewServer checks o and returns a Server.
func NewServer(o Options) (*Server, error) {
	if o.Router == nil {
		return nil, errors.New("lmtp: Options.Router is required")
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.Metrics == nil {
		o.Metrics = nopMetrics{}
	}
	if o.Hostname == "" {
		o.Hostname, _ = os.Hostname()
		if o.Hostname == "" {
			o.Hostname = "localhost"
		}
	}
	if o.MaxMessageBytes == 0 {
		o.MaxMessageBytes = 64 << 20
	}
	if o.MaxRecipients == 0 {
		o.MaxRecipients = 1000
	}
	if o.HopLimit == 0 {
		o.HopLimit = 30
	}
	def(&o.Timeouts.Command, 5*time.Minute)
	def(&o.Timeouts.BackendConnect, 5*time.Second)
	def(&o.Timeouts.Backend, 2*time.Minute)
	s := &Server{o: o, log: o.Logger, conns: make(map[*trackedConn]*session)}
	s.base, s.cancel = context.WithCancel(context.Background())
	ss := smtp.NewServer(smtp.BackendFunc(s.newSession))
	ss.LMTP = true
	ss.Network = "tcp"
	ss.Domain = o.Hostname + " " + marker
	ss.MaxMessageBytes = o.MaxMessageBytes
	ss.MaxRecipients = o.MaxRecipients
	// RFC 5321 allows 1000 bytes; real messages are sloppier. The limit
	// also bounds a command line, which go-smtp holds in memory.
	ss.MaxLineLength = maxLine
	ss.ReadTimeout = o.Timeouts.Command
	ss.WriteTimeout = o.Timeouts.Command
	ss.TLSConfig = o.TLS
	ss.ErrorLog = zapPrintf{o.Logger}
	s.smtp = ss
	return s, nil
}

func def(v *time.Duration, d time.Duration) {
	if *v == 0 {
		*v = d
	}
}

// Serve accepts MTAs on ln until the server stops; it owns ln.
func (s *Server) Serve(ln net.Listener, l Listener) error {
	if l.Name == "" {
		l.Name = ln.Addr().String()
	}
	if l.TLS && s.o.TLS == nil {
		ln.Close()
		return errors.New("lmtp: an implicit-TLS listener needs Options.TLS")
	}
	var sl net.Listener = &filterListener{Listener: ln, l: l, srv: s}
	if l.TLS {
		sl = tls.NewListener(sl, s.o.TLS)
	}
	err := s.smtp.Serve(sl)
	if err == nil || errors.Is(err, net.ErrClosed) {
		return smtp.ErrServerClosed
	}
	return err
}

// Shutdown stops accepting and waits for the MTAs' connections to end
// (an MTA closes a cached connection within seconds) until ctx is done,
// then closes them: a transaction cut short before its final dot is
// delivered nowhere, and the MTA retries it.
func (s *Server) Shutdown(ctx context.Context) error {
	// Idle connections (an MTA's connection cache) are told 421 and
	// closed now; the others after their transaction's replies.
	s.mu.Lock()
	s.shutting = true
	var sessions []*session
	var bare []*trackedConn
	for c, sess := range s.conns {
		if sess != nil {
			sessions = append(sessions, sess)
		} else {
			bare = append(bare, c)
		}
	}
	s.mu.Unlock()
	for _, sess := range sessions {
		sess.closeIfIdle()
	}
	for _, c := range bare {
		// Not even LHLO yet: there is no transaction to wait for.
		if !c.tls {
			c.SetWriteDeadline(time.Now().Add(time.Second))
			c.Write([]byte("421 4.3.2 Service shutting down, try again later\r\n"))
		}
		c.Close()
	}
	err := s.smtp.Shutdown(ctx)
	if ctx.Err() != nil {
		s.Close()
	}
	if errors.Is(err, smtp.ErrServerClosed) {
		return nil
	}
	return err
}

// Close closes every listener and connection at once.
func (s *Server) Close() error {
	s.cancel()
	if err := s.smtp.Close(); err != nil && !errors.Is(err, smtp.ErrServerClosed) {
		return err
	}
	return nil
}

// filterListener refuses MTAs from outside AllowFrom, and tracks the
// others for Shutdown.
type filterListener struct {
	net.Listener
	l   Listener
	srv *Server
}

// trackedConn is an MTA connection the Server knows of until it closes.
type trackedConn struct {
	net.Conn
	srv  *Server
	tls  bool // under implicit TLS: nothing cleartext may be written
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.srv.mu.Lock()
		delete(c.srv.conns, c)
		c.srv.mu.Unlock()
	})
	return c.Conn.Close()
}

// track registers an accepted connection.
func (f *filterListener) track(c net.Conn) net.Conn {
	tc := &trackedConn{Conn: c, srv: f.srv, tls: f.l.TLS}
	f.srv.mu.Lock()
	f.srv.conns[tc] = nil
	f.srv.mu.Unlock()
	return tc
}

func (f *filterListener) Accept() (net.Conn, error) {
	for {
		c, err := f.Listener.Accept()
		if err != nil {
			return c, err
		}
		ap := addr.Of(c.RemoteAddr())
		if len(f.l.AllowFrom) == 0 || addr.In(f.l.AllowFrom, ap.Addr()) {
			return f.track(c), nil
		}
		f.srv.log.Warn("LMTP connection refused: not in allow_from", zap.String("listener", f.l.Name), zap.String("client", ap.String()))
		go refuse(c)
	}
}

func refuse(c net.Conn) {
	c.SetWriteDeadline(time.Now().Add(time.Second))
	c.Write([]byte("554 5.7.1 Not allowed to deliver here\r\n"))
	c.Close()
}

// zapPrintf gives go-smtp's internal error log to zap.
type zapPrintf struct{ log *zap.Logger }

func (z zapPrintf) Printf(format string, v ...any) {
	z.log.Sugar().Warnf("lmtp: "+format, v...)
}
func (z zapPrintf) Println(v ...any) { z.log.Sugar().Warn(append([]any{"lmtp: "}, v...)...) }

// reply builds a reply an MTA sees.
func reply(code int, enh smtp.EnhancedCode, msg string) *smtp.SMTPError {
	return &smtp.SMTPError{Code: code, EnhancedCode: enh, Message: msg}
}

// The replies of imapgate's own making: all temporary, except a loop
// detected by hop count (what MTAs do too).
var (
	errNoRoute     = reply(451, smtp.EnhancedCode{4, 4, 3}, "No server is available for this recipient right now, try again later")
	errBackendDown = reply(451, smtp.EnhancedCode{4, 4, 1}, "The mail server for this recipient is not reachable right now, try again later")
	errBackendFail = reply(451, smtp.EnhancedCode{4, 4, 2}, "The mail server for this recipient failed during delivery, try again later")
	errNoLMTP      = reply(451, smtp.EnhancedCode{4, 3, 5}, "The mail server for this recipient does not take deliveries here, try again later")
	errMoving      = reply(451, smtp.EnhancedCode{4, 2, 0}, "This mailbox is moving, try again later")
	errSelfLoop    = reply(451, smtp.EnhancedCode{4, 4, 6}, "Mail loop: the backend for this recipient is an imapgate")
	errShutdown    = reply(421, smtp.EnhancedCode{4, 3, 2}, "Service shutting down, try again later")
	errBadHelo     = reply(501, smtp.EnhancedCode{5, 5, 2}, "Bad LHLO name")
	errHops        = reply(554, smtp.EnhancedCode{5, 4, 6}, "Too many hops: mail loop")
	errLongLine    = reply(554, smtp.EnhancedCode{5, 6, 0}, "Message has a line longer than 64 KiB")
)

func newID() string {
	var idb [10]byte
	rand.Read(idb[:])
	return strings.ToLower(base32.StdEncoding.EncodeToString(idb[:]))
}
