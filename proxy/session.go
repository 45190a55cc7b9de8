package proxy

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base32"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

// Session states, as metrics and operators see them.
const (
	statePreAuth = "preauth"
	stateLogin   = "login"
	stateSpliced = "spliced"
	stateClosed  = "closed"
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
	// loginStart is when the current login command arrived: its failure
	// delay counts from there.
	loginStart time.Time

	// wmu serialises writes to the client: the session's own replies, the
	// backend-to-client pump and a BYE from kick.
	wmu        sync.Mutex
	atBoundary bool // the last byte written to the client ended a line

	mu        sync.Mutex // guards the fields below
	state     string
	user      string
	backend   *routing.Backend
	bconn     net.Conn
	closed    bool
	reason    string      // how the session ended, once known
	halfClose *time.Timer // armed when one side of a splice closed
	up, down  *direction  // set when the splice starts

	dirsLeft atomic.Int32 // directions of the splice still running

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
		state:      statePreAuth,
		atBoundary: true,
	}
	sess.deadline = sess.start.Add(s.o().Timeouts.Login)
	return sess
}

// logger returns the session's logger. It is built per use rather than
// kept: a zap logger with fields holds an encoder buffer of about 1 KiB,
// and an idle session should cost as little as possible.
func (s *session) logger(extra ...zap.Field) *zap.Logger {
	return s.srv.log.With(s.logFields(extra...)...)
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
	m.SessionState(s.lst.Name, "", "", statePreAuth)
	defer func() {
		if p := recover(); p != nil {
			s.logger().Error("session panic", zap.Any("panic", p), zap.ByteString("stack", debug.Stack()))
			s.setReason("panic")
			s.writeString(fe.panicLine)
			spliced = false
		}
	}()

	if s.lst.Mode == ImplicitTLS {
		if err := s.startTLS(ctx); err != nil {
			s.setReason("tls_handshake")
			s.logger().Debug("TLS handshake failed", zap.Error(err))
			return false
		}
	}
	s.newReader()
	if !s.writeString(fe.greeting(s)) {
		return false
	}
	bl := fe.preAuth(s, ctx)
	if bl == nil {
		return false
	}
	return s.splice(bl)
}

// imapPreAuth is the IMAP front end's Not Authenticated state.
func imapPreAuth(s *session, ctx context.Context) *backendLogin {
	bl, err := s.preAuth(ctx)
	if err != nil {
		return nil
	}
	return bl
}

// imapGreeting is the IMAP greeting, with the pre-auth capabilities.
func imapGreeting(s *session) string {
	return "* OK [CAPABILITY " + s.capabilities() + "] " + s.srv.o().Greeting + "\r\n"
}

// finish closes everything and logs the session's one summary line.
func (s *session) finish() {
	s.mu.Lock()
	s.closed = true
	from := s.state
	s.state = stateClosed
	bc, b, user := s.bconn, s.backend, s.user
	if s.reason == "" {
		s.reason = "client_closed"
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
	m.SessionState(s.lst.Name, bid, from, stateClosed)
	m.SessionEnded(s.lst.Name, bid, reason, in, out, d)
	s.srv.log.Info("session end", s.logFields(
		zap.String("user", user), zap.String("backend", bid),
		zap.Int64("bytes_in", in), zap.Int64("bytes_out", out),
		zap.Duration("duration", d), zap.String("end", reason))...)
}

func (s *session) setReason(r string) {
	s.mu.Lock()
	if s.reason == "" {
		s.reason = r
	}
	s.mu.Unlock()
}

func (s *session) setState(to string) {
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
		ID: s.id, Client: s.remote.String(), Listener: s.lst.Name, State: s.state,
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
func (s *session) kick(reason, text string) {
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
		s.setReason("client_write_error")
		return false
	}
	s.atBoundary = len(b) > 0 && b[len(b)-1] == '\n'
	return true
}

func (s *session) writeString(str string) bool { return s.write([]byte(str)) }

func (s *session) newReader() {
	lim := s.srv.o().Limits
	s.r = &cmdReader{
		br:   bufio.NewReaderSize(s.client, cmdReaderBuffer),
		cont: s,
		lim: readLimits{
			maxLine:    lim.MaxLineLength,
			maxLiteral: lim.MaxLiteralSize,
			maxCommand: lim.MaxCommandSize,
			maxArgs:    256,
		},
	}
}

// continueLiteral implements continuer.
func (s *session) continueLiteral() error {
	if !s.writeString("+ Ready for literal data\r\n") {
		return net.ErrClosed
	}
	return nil
}

// startTLS runs the server-side handshake under its own deadline.
func (s *session) startTLS(ctx context.Context) error {
	if s.srv.o().TLS == nil {
		return errors.New("no TLS configuration")
	}
	tc := tls.Server(wrapForSplice(s.raw), s.srv.o().TLS)
	if err := handshakeBy(ctx, tc, s.raw, s.srv.o().Timeouts.TLSHandshake); err != nil {
		return err
	}
	if tc.ConnectionState().NegotiatedProtocol == "acme-tls/1" {
		// A CA validating a TLS-ALPN-01 challenge: the handshake was all
		// it wanted (the tls package allows this ALPN only then).
		s.setReason("acme_challenge")
		return errors.New("ACME TLS-ALPN-01 validation")
	}
	s.wmu.Lock()
	s.client = tc
	s.wmu.Unlock()
	s.tls = true
	return nil
}

// authAllowed reports whether credentials may be sent on this connection
// now: over TLS, or from a network the listener trusts.
func (s *session) authAllowed() bool {
	if s.tls {
		return true
	}
	return trusted(s.lst.InsecureAuth, s.remote.Addr())
}

// capabilities is the pre-auth capability list for the session's state.
func (s *session) capabilities() string {
	o := s.srv.o().Capabilities
	var caps []string
	if len(o.Replace) > 0 {
		caps = append(caps, o.Replace...)
	} else {
		caps = append(caps, "IMAP4rev1")
		if o.IMAP4rev2 {
			caps = append(caps, "IMAP4rev2")
		}
		caps = append(caps, "SASL-IR", "LITERAL+", "ID", "ENABLE", "IDLE")
		caps = append(caps, o.Extra...)
	}
	if !s.tls && s.srv.o().TLS != nil {
		caps = append(caps, "STARTTLS")
	}
	if s.authAllowed() {
		for _, m := range s.srv.o().Capabilities.AuthMechanisms {
			caps = append(caps, "AUTH="+strings.ToUpper(m))
		}
	} else {
		caps = append(caps, "LOGINDISABLED")
	}
	return strings.Join(caps, " ")
}

// readTimeout is the read deadline for the next pre-auth command.
func (s *session) readDeadline() time.Time {
	d := time.Now().Add(s.srv.o().Timeouts.PreAuthIdle)
	if s.deadline.Before(d) {
		return s.deadline
	}
	return d
}

// preAuth answers commands until a login succeeds (it returns the backend
// connection) or the session must end (nil).
func (s *session) preAuth(ctx context.Context) (*backendLogin, error) {
	first := true
	for {
		s.raw.SetReadDeadline(s.readDeadline())
		if first && !s.tls {
			if b, err := s.r.br.Peek(1); err == nil && b[0] == 0x16 {
				// A TLS ClientHello on a cleartext port: there will be no
				// line ending to wait for.
				s.setReason("protocol_mismatch")
				s.writeString("* BYE [CLIENTBUG] This port speaks cleartext IMAP; use STARTTLS or the implicit-TLS port\r\n")
				return nil, nil
			}
		}
		cmd, err := s.r.readCommand()
		if err != nil {
			var pe *protoError
			if !errors.As(err, &pe) {
				s.endOnReadError(err)
				return nil, err
			}
			if first && pe.tag == "" || pe.fatal {
				s.setReason("protocol_error")
				if pe.code == "TOOBIG" {
					s.srv.o().Metrics.LimitHit("line_length")
				}
				s.writeString("* BYE " + pe.Error() + "\r\n")
				return nil, nil
			}
			if !s.bad(pe.tag, pe.Error()) {
				return nil, nil
			}
			first = false
			continue
		}
		if first && isOtherProtocol(cmd) {
			s.setReason("protocol_mismatch")
			s.writeString("* BYE [CLIENTBUG] This is an IMAP server\r\n")
			return nil, nil
		}
		first = false
		bl, end := s.handle(ctx, cmd)
		if end || bl != nil {
			return bl, nil
		}
	}
}

// timedOut records why a pre-auth read timed out, in every protocol: the
// wait for the next command (preauth_idle), or the whole Not
// Authenticated state (login_timeout). The caller says goodbye.
func (s *session) timedOut() {
	reason := "preauth_idle"
	if !time.Now().Before(s.deadline) {
		reason = "login_timeout"
	}
	s.srv.o().Metrics.LimitHit(reason)
	s.setReason(reason)
}

// endOnReadError records why reading a command failed.
func (s *session) endOnReadError(err error) {
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		s.timedOut()
		s.writeString("* BYE Autologout; idle for too long\r\n")
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed):
		s.setReason("client_closed")
	default:
		s.setReason("client_read_error")
	}
}

// isOtherProtocol spots a first line that is not IMAP at all: an HTTP
// request line, SMTP or POP3 greetings. Such clients get BYE at once.
func isOtherProtocol(cmd *command) bool {
	switch strings.ToUpper(cmd.tag) {
	case "GET", "POST", "PUT", "HEAD", "OPTIONS", "CONNECT", "DELETE", "PATCH", "TRACE":
		for _, a := range cmd.args {
			if strings.HasPrefix(a.val, "HTTP/") {
				return true
			}
		}
	case "EHLO", "HELO", "USER", "CAPA", "STLS", "QUIT", "PROXY":
		return true
	}
	return false
}

// bad answers a bad command and reports whether the session goes on.
func (s *session) bad(tag, text string) bool {
	s.badCmds++
	if tag == "" {
		tag = "*"
	}
	if s.badCmds >= s.srv.o().Limits.MaxBadCommands {
		s.srv.o().Metrics.LimitHit("bad_commands")
		s.setReason("bad_commands")
		s.writeString(tag + " BAD " + text + "\r\n* BYE Too many invalid commands\r\n")
		return false
	}
	return s.writeString(tag + " BAD " + text + "\r\n")
}

// handle answers one pre-auth command. It returns the backend connection
// after a successful login, or end=true when the session must close.
func (s *session) handle(ctx context.Context, cmd *command) (bl *backendLogin, end bool) {
	name := cmd.name
	switch name {
	case "CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "LOGIN", "AUTHENTICATE", "ID", "ENABLE":
		s.srv.o().Metrics.PreAuthCommand(strings.ToLower(name))
	default:
		s.srv.o().Metrics.PreAuthCommand("other")
	}
	switch name {
	case "CAPABILITY":
		if len(cmd.args) != 0 {
			return nil, !s.bad(cmd.tag, "CAPABILITY takes no arguments")
		}
		return nil, !s.writeString("* CAPABILITY " + s.capabilities() + "\r\n" + cmd.tag + " OK CAPABILITY completed\r\n")
	case "NOOP":
		return nil, !s.writeString(cmd.tag + " OK NOOP completed\r\n")
	case "LOGOUT":
		s.setReason("logout")
		s.writeString("* BYE Logging out\r\n" + cmd.tag + " OK LOGOUT completed\r\n")
		return nil, true
	case "STARTTLS":
		return nil, !s.cmdStartTLS(ctx, cmd)
	case "ID":
		return nil, !s.cmdID(cmd)
	case "ENABLE":
		return nil, !s.writeString(cmd.tag + " BAD [CLIENTBUG] ENABLE is only valid after login\r\n")
	case "LOGIN":
		if len(cmd.args) != 2 || !cmd.args[0].isString() || !cmd.args[1].isString() {
			return nil, !s.bad(cmd.tag, "LOGIN takes a user name and a password")
		}
		return s.login(ctx, cmd.tag, credentials{user: cmd.args[0].val, pass: cmd.args[1].val})
	case "AUTHENTICATE":
		return s.cmdAuthenticate(ctx, cmd)
	}
	return nil, !s.bad(cmd.tag, "Unknown command or not valid before login")
}

func (s *session) cmdStartTLS(ctx context.Context, cmd *command) bool {
	if s.tls {
		return s.bad(cmd.tag, "TLS is already active")
	}
	if s.srv.o().TLS == nil {
		return s.bad(cmd.tag, "STARTTLS is not available")
	}
	if len(cmd.args) != 0 {
		return s.bad(cmd.tag, "STARTTLS takes no arguments")
	}
	if !s.writeString(cmd.tag + " OK Begin TLS negotiation now\r\n") {
		return false
	}
	return s.upgradeTLS(ctx, "STARTTLS")
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
	s.r = nil
	if err := s.startTLS(ctx); err != nil {
		s.setReason("tls_handshake")
		s.logger().Debug(command+" handshake failed", zap.Error(err))
		return false
	}
	s.newReader()
	return true
}

// maxIDFields and friends bound the client's ID (RFC 2971 limits).
const (
	maxIDFields   = 30
	maxIDKeyLen   = 30
	maxIDValueLen = 1024
)

func (s *session) cmdID(cmd *command) bool {
	a := cmd.args
	var fields []string
	switch {
	case len(a) == 1 && a[0].isNil():
	case len(a) >= 2 && a[0].kind == tokLParen && a[len(a)-1].kind == tokRParen && len(a)%2 == 0:
		for i := 1; i+1 < len(a)-1; i += 2 {
			k, v := a[i], a[i+1]
			if !k.isString() || k.kind == tokAtom || !(v.isString() || v.isNil()) {
				return s.bad(cmd.tag, "ID takes a list of string pairs or NIL")
			}
			if len(fields)/2 >= maxIDFields || len(k.val) > maxIDKeyLen || len(v.val) > maxIDValueLen {
				return s.bad(cmd.tag, "ID field too long or too many fields")
			}
			if v.isNil() && v.kind == tokAtom {
				continue
			}
			fields = append(fields, k.val, v.val)
		}
	default:
		return s.bad(cmd.tag, "ID takes a list of string pairs or NIL")
	}
	s.clientID = fields
	return s.writeString(`* ID ("name" "imapgate" "vendor" "imapgate")` + "\r\n" + cmd.tag + " OK ID completed\r\n")
}

// credentials are what the client logged in with. They never reach a log.
type credentials struct {
	mech    string // "LOGIN" (the command) or the SASL mechanism
	authzid string // PLAIN's authorization identity, or ""
	user    string
	pass    string
	oauth   []byte // XOAUTH2/OAUTHBEARER: the client's response, relayed as is
}

// routingUser is the name a login is routed by: the authorization identity
// when given, else the user.
func (c *credentials) routingUser() string {
	if c.authzid != "" {
		return c.authzid
	}
	return c.user
}

// login routes the user, logs in to the backend and answers the client.
func (s *session) login(ctx context.Context, tag string, cr credentials) (*backendLogin, bool) {
	if cr.mech == "" {
		cr.mech = "LOGIN"
	}
	m := s.srv.o().Metrics
	if !s.authAllowed() {
		m.Login("refused", "privacy_required")
		return nil, !s.writeString(tag + " NO [PRIVACYREQUIRED] Use STARTTLS before logging in\r\n")
	}
	if strings.ContainsAny(cr.user+cr.pass+cr.authzid, "\x00\r\n") || cr.user == "" {
		m.Login("refused", "invalid_credentials")
		return nil, !s.bad(tag, "[CLIENTBUG] Invalid characters in credentials")
	}
	user := routing.NormalizeUser(cr.routingUser())
	log := s.logger(zap.String("user", user), zap.String("mech", cr.mech))
	res := s.runLogin(ctx, &cr, user, log, func(lctx context.Context, b *routing.Backend) (*backendLogin, error) {
		return s.srv.loginBackend(lctx, b, &cr, s.clientInfo(), s.readContinuation)
	})
	switch res.end {
	case loginExpired:
		s.writeString("* BYE Autologout; idle for too long\r\n")
		return nil, true
	case loginLimited:
		return s.loginRefused(ctx, tag, "LIMIT", "Too many failed logins, try again later")
	case loginNoRoute:
		return nil, !s.writeString(tag + " NO [UNAVAILABLE] No server is available for this account right now, try again later\r\n")
	case loginRefused:
		code := res.refused.code
		if code == "" {
			code = "AUTHENTICATIONFAILED"
		}
		return s.loginRefused(ctx, tag, code, res.refused.text)
	case loginNotPlaced:
		return nil, !s.writeString(tag + " NO [UNAVAILABLE] Your account is moving, please try again\r\n")
	case loginUnavailable:
		return nil, !s.writeString(tag + " NO [UNAVAILABLE] The mail server is not reachable right now, try again later\r\n")
	case loginClientGone:
		return nil, true
	}
	bl := res.bl
	if !s.writeString(tag + " OK [CAPABILITY " + bl.caps + "] Logged in\r\n") {
		bl.conn.Close()
		return nil, true
	}
	return bl, false
}

// loginRefused answers a failed login after the failure delay, and hangs
// up after too many on this connection.
func (s *session) loginRefused(ctx context.Context, tag, code, text string) (*backendLogin, bool) {
	s.authFails++
	s.failureDelay(ctx)
	if text == "" {
		text = "Authentication failed."
	}
	reply := tag + " NO [" + code + "] " + text + "\r\n"
	if s.authFails >= s.srv.o().Limits.MaxAuthFailures {
		s.srv.o().Metrics.LimitHit("auth_failures")
		s.setReason("auth_failures")
		s.writeString(reply + "* BYE Too many login failures\r\n")
		return nil, true
	}
	return nil, !s.writeString(reply)
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
		"x-originating-port", fmt.Sprint(s.remote.Port()),
		"x-connected-ip", s.local.Addr().String(),
		"x-connected-port", fmt.Sprint(s.local.Port()),
		"x-session-id", s.id,
	}
	for i := 0; i+1 < len(s.clientID); i += 2 {
		if !strings.HasPrefix(strings.ToLower(s.clientID[i]), "x-") {
			f = append(f, s.clientID[i], s.clientID[i+1])
		}
	}
	return f
}
