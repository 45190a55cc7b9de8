package proxy

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base32"
	"errors"
	"github.com/imapgate/imapgate/proxy/internal/addr"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

// session is one client connection. Its life reads top to bottom in
// serve: greet, the pre-auth loop, the backend login, the splice, and one
// summary log line.
type session struct {
	srv    *Server
	lst    *Listener
	id     string
	remote netip.AddrPort
	local  netip.AddrPort
	start  time.Time
	raw    net.Conn // the accepted connection; closing it ends the client leg

	// network is the client network the session counts for (limits).
	network netip.Prefix

	// Pre-auth only: dropped when the splice starts.
	client    net.Conn // raw, or the TLS connection over it
	r         *cmdReader
	tls       bool
	deadline  time.Time // end of the Not Authenticated state
	badCmds   int
	authFails int
	clientID  []string // the client's ID fields, name/value pairs
	untagged  string   // IMAP responses queued for the next reply (imap.go)
	// loginStart is when the current login command arrived: its failure
	// delay counts from there.
	loginStart time.Time

	// wmu serialises writes to the client: the session's own replies, the
	// backend-to-client pump and a BYE from kick.
	wmu        sync.Mutex
	atBoundary bool // the last byte written to the client ended a line

	mu        sync.Mutex // guards the fields below
	state     State
	user      string
	backend   *routing.Backend
	bconn     net.Conn
	closed    bool
	reason    EndReason   // how the session ended, once known
	halfClose *time.Timer // armed when one side of a splice closed
	up, down  *direction  // set when the splice starts

	dirsLeft atomic.Int32 // directions of the splice still running

	rec atomic.Pointer[recordConn] // the client leg, once the record layer carries it
	ev  atomic.Pointer[evSession]  // the splice, when an event loop carries it

	in, out atomic.Int64 // bytes client→backend and backend→client
}

func newSession(s *Server, c net.Conn, l *Listener, remote, local netip.AddrPort) *session {
	var idb [10]byte
	rand.Read(idb[:])
	sess := &session{
		srv:        s,
		lst:        l,
		id:         strings.ToLower(base32.StdEncoding.EncodeToString(idb[:])),
		remote:     remote,
		local:      local,
		start:      time.Now(),
		raw:        c,
		client:     c,
		state:      StatePreAuth,
		atBoundary: true,
	}
	sess.deadline = sess.start.Add(s.o().Timeouts.Login)
	return sess
}

// logger returns the session's logger. It is built per use rather than
// kept: a zap logger with fields holds an encoder buffer of about 1 KiB,
// and an idle session should cost as little as possible.
func (s *session) logger(extra ...zap.Field) *zap.Logger {
	return s.srv.slog.With(s.logFields(extra...)...)
}

// logFields are the session's fields followed by extra, for a line logged
// without a With (which copies the encoder: about half of what a session
// line costs).
func (s *session) logFields(extra ...zap.Field) []zap.Field {
	return append([]zap.Field{zap.String("session", s.id), zap.String("client", s.remote.String()), zap.String("listener", s.lst.Name)}, extra...)
}

// serve runs the session up to the splice, in the listener's protocol
// (frontEndFor, protocols.go). It reports whether the splice took the
// session over (its directions then end it); otherwise the session is
// over and the caller ends it.
func (s *session) serve(ctx context.Context) (spliced bool) {
	fe := frontEndFor(s.lst.Protocol)
	m := s.srv.o().Metrics
	m.SessionState(s.lst.Name, "", StateNone, StatePreAuth)
	defer func() {
		if p := recover(); p != nil {
			s.logger().Error("session panic", zap.Any("panic", p), zap.ByteString("stack", debug.Stack()))
			s.setEnd(EndPanic)
			s.writeString(fe.panicLine)
			spliced = false
		}
	}()

	greeted := false
	if s.lst.Mode == ImplicitTLS {
		var err error
		if greeted, err = s.startTLS(ctx, fe.greeting); err != nil {
			s.setEnd(EndTLSHandshake)
			s.logger().Debug("TLS handshake failed", zap.Error(err))
			return false
		}
	}
	s.newReader()
	if !greeted && !s.writeString(fe.greeting(s)) {
		return false
	}
	bl := fe.preAuth(s, ctx)
	if bl == nil {
		return false
	}
	return s.splice(bl)
}

// finish closes everything and logs the session's one summary line.
func (s *session) finish() {
	s.mu.Lock()
	s.closed = true
	from := s.state
	s.state = StateClosed
	bc, b, user := s.bconn, s.backend, s.user
	if s.reason == "" {
		s.reason = EndClientClosed
	}
	reason := s.reason
	s.mu.Unlock()
	s.raw.Close()
	if bc != nil {
		bc.Close()
	}
	bid := ""
	if b != nil {
		bid = b.ID
	}
	d := time.Since(s.start)
	in, out := s.in.Load(), s.out.Load()
	m := s.srv.o().Metrics
	m.SessionState(s.lst.Name, bid, from, StateClosed)
	m.SessionEnded(s.lst.Name, bid, reason, in, out, d)
	s.srv.slog.Info("session end", s.logFields(
		zap.String("user", user), zap.String("backend", bid),
		zap.Int64("bytes_in", in), zap.Int64("bytes_out", out),
		zap.Duration("duration", d), zap.Stringer("end", reason))...)
}

// setEnd records how the session ended, unless that is known already.
func (s *session) setEnd(r EndReason) {
	s.mu.Lock()
	if s.reason == "" {
		s.reason = r
	}
	s.mu.Unlock()
}

func (s *session) setState(to State) {
	s.mu.Lock()
	from := s.state
	s.state = to
	bid := ""
	if s.backend != nil {
		bid = s.backend.ID
	}
	s.mu.Unlock()
	s.srv.o().Metrics.SessionState(s.lst.Name, bid, from, to)
}

// spliced reports whether the session is logged in to its backend: from
// the backend's OK on, a moment before the splice itself starts.
func (s *session) spliced() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bconn != nil
}

// routeKey returns the user and backend ID of a session that has been
// routed: logging in to its backend or logged in. A session still logging
// in must be evictable too, or a move during its login would leave the
// user on two backends.
func (s *session) routeKey() (user, backend string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.backend == nil {
		return "", ""
	}
	return s.user, s.backend.ID
}

func (s *session) info() SessionInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	in := SessionInfo{
		ID: s.id, Client: s.remote.String(), Listener: s.lst.Name, State: s.state.String(),
		User: s.user, Started: s.start, In: s.in.Load(), Out: s.out.Load(),
		Duration: time.Since(s.start),
	}
	if s.backend != nil {
		in.Backend = s.backend.ID
	}
	return in
}

// kick ends the session from outside: a BYE if the client stream is at a
// line boundary, then both connections are closed.
func (s *session) kick(reason EndReason, text string) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	if s.reason == "" {
		s.reason = reason
	}
	s.mu.Unlock()
	// A pump blocked on a slow client holds wmu: the deadline frees it
	// within a second (its write fails and the session ends anyway).
	s.raw.SetWriteDeadline(time.Now().Add(time.Second))
	s.wmu.Lock()
	if s.atBoundary {
		s.raw.SetWriteDeadline(time.Now().Add(time.Second))
		io.WriteString(s.client, s.byeLine(text)) // protocols.go
	}
	s.wmu.Unlock()
	s.closeConns()
}

// write sends b to the client; it reports false (and ends the session's
// reason) when the client is gone.
func (s *session) write(b []byte) bool {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.raw.SetWriteDeadline(time.Now().Add(s.srv.o().Timeouts.PreAuthIdle))
	_, err := s.client.Write(b)
	s.raw.SetWriteDeadline(time.Time{})
	if err != nil {
		s.setEnd(EndClientWriteError)
		return false
	}
	s.atBoundary = len(b) > 0 && b[len(b)-1] == '\n'
	return true
}

func (s *session) writeString(str string) bool { return s.write([]byte(str)) }

func (s *session) newReader() {
	lim := s.srv.o().Limits
	br := cmdReaders.Get().(*bufio.Reader)
	br.Reset(s.client)
	s.r = &cmdReader{
		br:   br,
		cont: s,
		lim: readLimits{
			maxLine:    lim.MaxLineLength,
			maxLiteral: lim.MaxLiteralSize,
			maxCommand: lim.MaxCommandSize,
			maxArgs:    256,
		},
	}
}

// cmdReaders keeps the pre-auth readers' buffers between sessions: a
// login would otherwise allocate (and the GC collect) cmdReaderBuffer
// bytes that live for a few milliseconds.
var cmdReaders = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, cmdReaderBuffer) }}

// dropReader gives the pre-auth reader's buffer back; what it still
// buffers is thrown away (callers copy what they keep first).
func (s *session) dropReader() {
	if s.r == nil {
		return
	}
	s.r.br.Reset(nil)
	cmdReaders.Put(s.r.br)
	s.r = nil
}

// continueLiteral implements continuer.
func (s *session) continueLiteral() error {
	if !s.writeString("+ Ready for literal data\r\n") {
		return net.ErrClosed
	}
	return nil
}

// startTLS runs the client's TLS handshake under its own deadline. On an
// implicit-TLS listener greeting is the protocol's greeting: it goes out
// with the server's first flight when the handshake allows
// (greetInFlight), and greeted says so; after STARTTLS there is none (nil).
func (s *session) startTLS(ctx context.Context, greeting func(*session) string) (greeted bool, err error) {
	if s.srv.o().TLS == nil {
		return false, errors.New("no TLS configuration")
	}
	defer busy()()
	conn := wrapForSplice(s.raw)
	tc := tls.Server(conn, s.keyLogFor(conn, s.srv.o().TLS)) // tlstakeover_linux.go
	// From here on the client leg is TLS, or the session ends with the
	// handshake: the greeting sealed into the flight says so already.
	s.tls = true
	if greeting != nil && s.srv.o().TLSRecords == RecordsTakeover {
		greetInFlight(conn, tc, greeting(s))
	}
	err = handshakeBy(ctx, tc, s.raw, s.srv.o().Timeouts.TLSHandshake)
	greeted = greetedInFlight(conn)
	if err != nil {
		return false, err
	}
	if tc.ConnectionState().NegotiatedProtocol == "acme-tls/1" {
		// A CA validating a TLS-ALPN-01 challenge: the handshake was all
		// it wanted (the tls package allows this ALPN only then).
		s.setEnd(EndACMEChallenge)
		return false, errors.New("ACME TLS-ALPN-01 validation")
	}
	s.wmu.Lock()
	s.client = tc
	s.atBoundary = s.atBoundary || greeted
	s.wmu.Unlock()
	return greeted, nil
}

// authAllowed reports whether credentials may be sent on this connection
// now: over TLS, or from a network the listener trusts.
func (s *session) authAllowed() bool {
	if s.tls {
		return true
	}
	return addr.In(s.lst.InsecureAuth, s.remote.Addr())
}

// readTimeout is the read deadline for the next pre-auth command.
func (s *session) readDeadline() time.Time {
	d := time.Now().Add(s.srv.o().Timeouts.PreAuthIdle)
	if s.deadline.Before(d) {
		return s.deadline
	}
	return d
}

// clientHelloOnCleartext reports whether a client opened a cleartext
// listener with a TLS ClientHello (it will never send a line ending to
// wait for); the session then ends, and the caller says so in its
// protocol.
func (s *session) clientHelloOnCleartext() bool {
	if s.tls {
		return false
	}
	if b, err := s.r.br.Peek(1); err != nil || b[0] != 0x16 {
		return false
	}
	s.setEnd(EndProtocolMismatch)
	return true
}

// timedOut records why a pre-auth read timed out, in every protocol: the
// wait for the next command (preauth_idle), or the whole Not
// Authenticated state (login_timeout). The caller says goodbye.
func (s *session) timedOut() {
	reason := EndPreAuthIdle
	if !time.Now().Before(s.deadline) {
		reason = EndLoginTimeout
	}
	s.srv.o().Metrics.LimitHit(reason.String())
	s.setEnd(reason)
}

// endOnReadError records why reading a command failed.
func (s *session) endOnReadError(err error) {
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		s.timedOut()
		s.writeString("* BYE Autologout; idle for too long\r\n")
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed):
		s.setEnd(EndClientClosed)
	default:
		s.setEnd(EndClientReadError)
	}
}

// upgradeTLS turns the client leg into TLS after the protocol's STARTTLS
// (IMAP STARTTLS, POP3 STLS, ManageSieve STARTTLS) was answered.
// Whatever the client pipelined after the command arrived in cleartext
// and could have been injected by anyone on the path (CVE-2011-0411): it
// is thrown away with the old reader, never read as commands.
func (s *session) upgradeTLS(ctx context.Context, command string) bool {
	if n := s.r.br.Buffered(); n > 0 {
		s.logger().Warn("discarding bytes pipelined after "+command, zap.Int("bytes", n))
	}
	s.dropReader()
	if _, err := s.startTLS(ctx, nil); err != nil {
		s.setEnd(EndTLSHandshake)
		s.logger().Debug(command+" handshake failed", zap.Error(err))
		return false
	}
	s.newReader()
	return true
}

// credentials are what the client logged in with. They never reach a log.
type credentials struct {
	mech    string // "LOGIN" (the command) or the SASL mechanism
	authzid string // PLAIN's authorization identity, or ""
	user    string
	pass    string
	oauth   []byte // XOAUTH2/OAUTHBEARER: the client's response, relayed as is
}

// valid reports whether the credentials can be sent to a backend: a
// user, and no NUL or line break anywhere.
func (c *credentials) valid() bool {
	return c.user != "" && !strings.ContainsAny(c.user+c.pass+c.authzid, "\x00\r\n")
}

// routingUser is the name a login is routed by: the authorization identity
// when given, else the user.
func (c *credentials) routingUser() string {
	if c.authzid != "" {
		return c.authzid
	}
	return c.user
}

// clientInfo is what the backend may learn about the client.
func (s *session) clientInfo() *clientInfo {
	return &clientInfo{remote: s.remote, local: s.local, id: s.forwardedID()}
}

// failureDelay slows down password guessing on this connection: a failed
// login is answered delay × failures after its command arrived, so the
// time the backend took to say NO (its own penalty) counts towards it.
func (s *session) failureDelay(ctx context.Context) {
	d := s.srv.o().Limits.AuthFailureDelay
	if d <= 0 {
		return
	}
	wait := time.Until(s.loginStart.Add(d * time.Duration(s.authFails)))
	if wait <= 0 {
		return
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// forwardedID is the ID imapgate sends to the backend before login: the
// client's real address for Dovecot's login_trusted_networks, and the
// client's own fields.
func (s *session) forwardedID() []string {
	if s.srv.o().Backend.NoForwardID {
		return nil
	}
	f := []string{
		"x-originating-ip", s.remote.Addr().String(),
		"x-originating-port", strconv.Itoa(int(s.remote.Port())),
		"x-connected-ip", s.local.Addr().String(),
		"x-connected-port", strconv.Itoa(int(s.local.Port())),
		"x-session-id", s.id,
	}
	for i := 0; i+1 < len(s.clientID); i += 2 {
		if !strings.HasPrefix(strings.ToLower(s.clientID[i]), "x-") {
			f = append(f, s.clientID[i], s.clientID[i+1])
		}
	}
	return f
}
