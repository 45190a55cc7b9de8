package proxy

import (
	"context"
	"errors"
	"fmt"
	"github.com/imapgate/imapgate/proxy/internal/addr"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("proxy: server closed")

// ErrBadPassword is what a PasswordVerifier wraps for a wrong password.
var ErrBadPassword = errors.New("proxy: wrong password")

// Server accepts IMAP clients and proxies them to their backends. Create
// it with NewServer, give it listeners with Serve, stop it with Shutdown.
type Server struct {
	opts atomic.Pointer[Options]  // replaced whole by SetOptions
	caps atomic.Pointer[capLists] // the pre-auth CAPABILITY lists of opts
	log  *zap.Logger
	// slog is log without the caller, for the lines of a session (its
	// login, its end): they name the session, and their origin never
	// varies, while finding the caller is half of what zap spends on a
	// line (about 1.4% of a login's CPU in perf).
	slog *zap.Logger
	// greetings are the backends' last greetings' capabilities, by
	// address (pipelinedLogin, backend.go).
	greetings sync.Map
	// hsConfig is the client handshakes' configuration while TLS records
	// may be taken over (tlstakeover_linux.go); nil until the first.
	hsConfig atomic.Pointer[handshakeConfig]

	// parker holds idle spliced directions; started with the first
	// splice (NewServer has no side effects), nil when directions wait in
	// goroutines instead.
	parker     atomic.Pointer[parker]
	parkerOnce sync.Once
	// loops carry taken-over sessions (evloop_linux.go); started with
	// the first such splice.
	loops     atomic.Pointer[evLoops]
	loopsOnce sync.Once
	stopOnce  sync.Once
	parkAfter time.Duration // parkAfter, shorter in tests
	limiters  atomic.Pointer[limiters]
	lmtp      lmtpFront    // the LMTP front end, if an LMTP listener is served
	pool      *backendPool // Options.Backend.Pool's connections

	// kernelTLSOnce logs, once, how TLS records are carried after login.
	kernelTLSOnce sync.Once

	closing atomic.Bool
	// base is cancelled by Close: it ends every session's blocking work.
	base       context.Context
	cancelBase context.CancelFunc

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	sessions  map[*session]struct{}
	byUser    map[string][]*session // routed sessions, for EvictUser
	perIP     map[netip.Prefix]int
	active    sync.WaitGroup // sessions
	idleCh    chan struct{}  // closed when sessions drops to zero during shutdown
}

var _ routing.Evictor = (*Server)(nil)

// NewServer returns a Server for opts.
func NewServer(opts Options) (*Server, error) {
	o, err := checkOptions(opts)
	if err != nil {
		return nil, err
	}
	s := &Server{
		log:       o.Logger,
		slog:      o.Logger.WithOptions(zap.WithCaller(false)),
		listeners: make(map[net.Listener]struct{}),
		sessions:  make(map[*session]struct{}),
		byUser:    make(map[string][]*session),
		parkAfter: parkAfter,
		perIP:     make(map[netip.Prefix]int),
		pool:      newBackendPool(),
	}
	s.opts.Store(o)
	s.limiters.Store(newLimiters(o.Limits))
	s.base, s.cancelBase = context.WithCancel(context.Background())
	return s, nil
}

// checkOptions validates opts and fills in the defaults.
func checkOptions(opts Options) (*Options, error) {
	if opts.Router == nil {
		return nil, errors.New("proxy: Options.Router is required")
	}
	if m := opts.Backend.Master; m != nil && (m.Verifier == nil || m.User == "") {
		return nil, errors.New("proxy: a master login needs a user and a Verifier for the clients' passwords")
	}
	for _, mech := range opts.Capabilities.AuthMechanisms {
		if !knownMechanism(mech) {
			return nil, fmt.Errorf("proxy: unsupported SASL mechanism %q", mech)
		}
	}
	if l := opts.Limits; l.IPv4Prefix < 0 || l.IPv4Prefix > 32 || l.IPv6Prefix < 0 || l.IPv6Prefix > 128 {
		return nil, errors.New("proxy: Limits.IPv4Prefix must be 0-32 and IPv6Prefix 0-128")
	}
	o := opts.withDefaults()
	return &o, nil
}

// SetOptions replaces the options of a running Server (a configuration
// reload): every session uses the new ones from its next step on (the
// next command, the next login); what already happened stays. The
// failure limits start afresh only if they changed. Timeouts.Idle only
// takes effect for sessions spliced after it, and switching it on or off
// keeps the way idle directions wait that the Server started with.
func (s *Server) SetOptions(opts Options) error {
	o, err := checkOptions(opts)
	if err != nil {
		return err
	}
	old := s.opts.Swap(o)
	if limiterConfig(old.Limits) != limiterConfig(o.Limits) {
		s.limiters.Store(newLimiters(o.Limits))
	}
	return nil
}

// o returns the options in force.
func (s *Server) o() *Options { return s.opts.Load() }

// Serve accepts clients on ln until it fails or the server shuts down,
// when it returns ErrServerClosed. It owns ln and closes it.
func (s *Server) Serve(ln net.Listener, l Listener) error {
	if l.Name == "" {
		l.Name = ln.Addr().String()
	}
	if l.Protocol == routing.ProtocolLMTP {
		return s.serveLMTP(ln, l) // lmtp.go: delivery has its own front end
	}
	if l.Mode == ImplicitTLS && s.o().TLS == nil {
		ln.Close()
		return errors.New("proxy: implicit-TLS listener needs Options.TLS")
	}
	if !s.track(ln) {
		return ErrServerClosed
	}
	defer s.untrack(ln)

	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.closing.Load() {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || isTemporary(err) {
				// Out of file descriptors and similar: wait and retry, as
				// net/http does, rather than spin or die.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed, retrying", zap.String("listener", l.Name), zap.Duration("backoff", backoff), zap.Error(err))
				time.Sleep(backoff)
				continue
			}
			return err
		}
		backoff = 0
		go s.serveConn(c, &l)
	}
}

// track registers a listener, so that Shutdown and Close close it. It
// reports false (and closes ln) if the server is already closing.
func (s *Server) track(ln net.Listener) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing.Load() {
		ln.Close()
		return false
	}
	s.listeners[ln] = struct{}{}
	return true
}

// untrack forgets a listener tracked by track and closes it.
func (s *Server) untrack(ln net.Listener) {
	s.mu.Lock()
	delete(s.listeners, ln)
	s.mu.Unlock()
	ln.Close()
}

// stackPad is what growStack needs on top of a new goroutine's stack: a
// login (TLS handshake, pre-auth, backend login) peaks at just under 16
// KiB of stack, and a goroutine starts with 4 KiB (the runtime's average
// at the last GC; measured with a uprobe on runtime.copystack: two
// copies per login, to 8 and to 16 KiB). Growing once while the stack is
// shallow copies a frame or two; growing in the handshake copies and
// adjusts its whole depth twice (about 3% of a login's CPU in perf).
const stackPad = 12 << 10

// stackIndex is never written: reading pad through it, and storing the
// byte read, keeps the compiler from dropping pad (an atomic store: every
// session goroutine makes it).
var (
	stackIndex byte
	stackSink  atomic.Uint32
)

// growStack grows the calling goroutine's stack to 16 KiB at once.
//
//go:noinline
func growStack() {
	var pad [stackPad]byte
	stackSink.Store(uint32(pad[stackIndex]))
}

// isTemporary reports accept errors worth retrying (EMFILE, ENFILE,
// ECONNABORTED...).
func isTemporary(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

// setKeepAlive gives an accepted connection Timeouts.KeepAlive. A
// listener made with KeepAlive < 0 (as cmd/imapgate's are) left this to
// us; one made with Go's defaults gets ours on top.
func (s *Server) setKeepAlive(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetKeepAliveConfig(s.o().Timeouts.keepAlive())
	}
}

// serveConn runs one client connection from accept to close.
func (s *Server) serveConn(c net.Conn, l *Listener) {
	growStack()
	s.setKeepAlive(c)
	remote, local := addr.Of(c.RemoteAddr()), addr.Of(c.LocalAddr())
	if addr.In(l.ProxyProtocolFrom, remote.Addr()) {
		c.SetReadDeadline(time.Now().Add(s.o().Timeouts.TLSHandshake))
		src, dst, ok, err := readProxyHeader(c)
		c.SetReadDeadline(time.Time{})
		if err != nil {
			s.o().Metrics.LimitHit("proxy_protocol")
			s.log.Warn("bad PROXY protocol header from a load balancer", zap.String("peer", remote.String()), zap.Error(err))
			c.Close()
			return
		}
		if ok {
			remote, local = src, dst
		}
	}
	network := s.network(remote.Addr())
	if reason := s.admit(network); reason != "" {
		s.o().Metrics.LimitHit(reason)
		s.log.Warn("connection refused", zap.String("client", remote.String()), zap.String("limit", reason))
		if l.Mode == StartTLS {
			c.SetWriteDeadline(time.Now().Add(time.Second))
			c.Write([]byte(refusalLine(l.Protocol))) // protocols.go
		}
		c.Close()
		return
	}
	sess := newSession(s, c, l, remote, local)
	sess.network = network
	s.mu.Lock()
	s.sessions[sess] = struct{}{}
	s.mu.Unlock()
	if !sess.serve(s.base) {
		sess.dropReader()
		s.endSession(sess)
	}
	// Otherwise the session is spliced: its directions end it.
}

// endSession closes a session, logs its summary line and forgets it.
func (s *Server) endSession(sess *session) {
	sess.finish()
	if u, _ := sess.routeKey(); u != "" {
		s.unindex(sess, u)
	}
	s.mu.Lock()
	delete(s.sessions, sess)
	if n := s.perIP[sess.network] - 1; n > 0 {
		s.perIP[sess.network] = n
	} else {
		delete(s.perIP, sess.network)
	}
	if s.idleCh != nil && len(s.sessions) == 0 {
		close(s.idleCh)
		s.idleCh = nil
	}
	s.mu.Unlock()
	s.active.Done()
}

// network is the client network a connection from a counts for.
func (s *Server) network(a netip.Addr) netip.Prefix {
	l := s.o().Limits
	return networkOf(a, l.IPv4Prefix, l.IPv6Prefix)
}

// admit counts a new connection from network, or says which limit
// refuses it.
func (s *Server) admit(network netip.Prefix) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	lim := s.o().Limits
	if lim.MaxConnections > 0 && len(s.sessions) >= lim.MaxConnections {
		return "connections"
	}
	if lim.MaxConnectionsPerIP > 0 && s.perIP[network] >= lim.MaxConnectionsPerIP {
		return "connections_per_ip"
	}
	s.perIP[network]++
	s.active.Add(1)
	return ""
}

// SessionInfo describes a live session for operators.
type SessionInfo struct {
	ID       string        `json:"id"`
	Client   string        `json:"client"`
	Listener string        `json:"listener"`
	State    string        `json:"state"`
	User     string        `json:"user,omitempty"`
	Backend  string        `json:"backend,omitempty"`
	Started  time.Time     `json:"started"`
	In       int64         `json:"bytes_in"`
	Out      int64         `json:"bytes_out"`
	Duration time.Duration `json:"duration_ns"`
}

// Sessions lists the live sessions that match: an empty user or backend
// matches all.
func (s *Server) Sessions(user, backend string) []SessionInfo {
	user = routing.NormalizeUser(user)
	var out []SessionInfo
	s.mu.Lock()
	defer s.mu.Unlock()
	for sess := range s.sessions {
		if in := sess.info(); (user == "" || in.User == user) && (backend == "" || in.Backend == backend) {
			out = append(out, in)
		}
	}
	return out
}

// index records a routed session under its user, for EvictUser: the
// router may call it for every user it sees placed, so it must not scan
// every session.
func (s *Server) index(sess *session, user string) {
	s.mu.Lock()
	s.byUser[user] = append(s.byUser[user], sess)
	s.mu.Unlock()
}

func (s *Server) unindex(sess *session, user string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	list := s.byUser[user]
	for i, x := range list {
		if x == sess {
			list[i] = list[len(list)-1]
			list = list[:len(list)-1]
			break
		}
	}
	if len(list) == 0 {
		delete(s.byUser, user)
	} else {
		s.byUser[user] = list
	}
}

// EvictUser closes user's sessions on every backend except keepID (empty:
// all of them), including sessions still logging in to another backend.
// It implements routing.Evictor.
func (s *Server) EvictUser(user, keepID string) int {
	user = routing.NormalizeUser(user)
	s.mu.Lock()
	var victims []*session
	for _, sess := range s.byUser[user] {
		if _, b := sess.routeKey(); b != "" && b != keepID {
			victims = append(victims, sess)
		}
	}
	s.mu.Unlock()
	return s.kickAll(EndMoved, "Your mailbox moved, please reconnect", victims)
}

// KickUser closes every session of user (an operator's kick), telling
// the client text in a BYE where the stream allows.
func (s *Server) KickUser(user, text string) int {
	user = routing.NormalizeUser(user)
	s.mu.Lock()
	victims := append([]*session(nil), s.byUser[user]...)
	s.mu.Unlock()
	return s.kickAll(EndKicked, text, victims)
}

// EvictBackend closes every session spliced to the backend with this ID.
func (s *Server) EvictBackend(id string) int {
	return s.evict(EndBackendGone, func(sess *session) bool {
		_, b := sess.routeKey()
		return b == id
	})
}

func (s *Server) evict(reason EndReason, match func(*session) bool) int {
	// Scanning every session is O(sessions), a few hundred microseconds at
	// 100,000 sessions: fine for a backend going away, which is rare.
	s.mu.Lock()
	var victims []*session
	for sess := range s.sessions {
		if match(sess) {
			victims = append(victims, sess)
		}
	}
	s.mu.Unlock()
	return s.kickAll(reason, "Your mailbox moved, please reconnect", victims)
}

func (s *Server) kickAll(reason EndReason, text string, victims []*session) int {
	s.kickConcurrently(reason, text, victims)
	if len(victims) > 0 {
		s.log.Info("evicted sessions", zap.Stringer("reason", reason), zap.Int("count", len(victims)))
	}
	return len(victims)
}

// Shutdown stops accepting, says BYE to sessions that have not logged in,
// and waits for spliced sessions to end until ctx is done; then it closes
// them (with BYE where the stream is at a line boundary) and returns
// ctx.Err(). It returns nil when every session ended by itself.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing.Store(true)
	for ln := range s.listeners {
		ln.Close()
	}
	defer s.shutdownLMTP(ctx)()
	var pre []*session
	for sess := range s.sessions {
		if !sess.spliced() {
			pre = append(pre, sess)
		}
	}
	done := make(chan struct{})
	if len(s.sessions) == 0 {
		close(done)
	} else {
		s.idleCh = done
	}
	s.mu.Unlock()
	for _, sess := range pre {
		sess.kick(EndShutdown, "Server shutting down, please reconnect")
	}
	select {
	case <-done:
		s.active.Wait()
		s.stopParker()
		s.pool.close()
		return nil
	case <-ctx.Done():
	}
	s.Close()
	return ctx.Err()
}

// Close closes every listener and session at once.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closing.Store(true)
	for ln := range s.listeners {
		ln.Close()
	}
	all := make([]*session, 0, len(s.sessions))
	for sess := range s.sessions {
		all = append(all, sess)
	}
	s.mu.Unlock()
	s.cancelBase()
	s.closeLMTP()
	for _, sess := range all {
		sess.kick(EndShutdown, "Server shutting down, please reconnect")
	}
	waited := make(chan struct{})
	go func() {
		s.active.Wait()
		close(waited)
	}()
	select {
	case <-waited:
	case <-time.After(10 * time.Second):
		// Every session was closed: one that lingers is a bug. Say which.
		for _, in := range s.Sessions("", "") {
			s.log.Error("session did not end after Close", zap.String("session", in.ID), zap.String("state", in.State), zap.String("user", in.User), zap.String("backend", in.Backend))
		}
		<-waited
	}
	s.stopParker()
	s.pool.close()
	return nil
}

// getParker returns the parker, starting it the first time; nil means
// directions wait in goroutines: with an idle timeout (each direction
// keeps a read deadline), on systems without epoll, or after a failure.
func (s *Server) getParker() *parker {
	s.parkerOnce.Do(func() {
		if s.o().Timeouts.Idle > 0 || s.closing.Load() {
			return
		}
		p, err := newParker()
		if err != nil {
			s.log.Warn("no epoll set for idle sessions; they keep a goroutine each", zap.Error(err))
			return
		}
		s.parker.Store(p)
	})
	return s.parker.Load()
}

// stopParker ends the parker's goroutine once no session needs it.
func (s *Server) stopParker() {
	s.stopOnce.Do(func() {
		s.parkerOnce.Do(func() {}) // none may start from now on
		if p := s.parker.Load(); p != nil {
			p.stop()
		}
		s.stopLoops()
	})
}

// spliceSessions returns the logged-in sessions.
func (s *Server) spliceSessions() []*session {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*session, 0, len(s.sessions))
	for sess := range s.sessions {
		if sess.spliced() {
			out = append(out, sess)
		}
	}
	return out
}
