package proxy

import (
	"bufio"
	"net/netip"

	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"github.com/emersion/go-sasl"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/imapgate/imapgate/routing"
)

// This file is the backend leg of a login: dial, TLS, greeting, STARTTLS,
// ID and the login itself, all under one deadline. It speaks just enough
// IMAP client to get to the Authenticated state.

// backendLogin is a backend connection in the Authenticated state.
type backendLogin struct {
	conn    net.Conn
	caps    string // the backend's capabilities after login
	pending []byte // bytes the backend sent after its tagged OK
}

// backendRefusedError is the backend's NO (or BAD) to the credentials: the
// client is told its code and text and may try again.
type backendRefusedError struct {
	code string // response code without brackets, e.g. AUTHENTICATIONFAILED
	text string
}

func (e *backendRefusedError) Error() string {
	if e.code != "" {
		return "[" + e.code + "] " + e.text
	}
	return e.text
}

// maxBackendLine bounds one response line from a backend before login.
const maxBackendLine = 16 << 10

// backendReadBuffer is the size of the backend reader's buffer: a whole
// line must fit into it, or ReadSlice fails before maxBackendLine.
const backendReadBuffer = maxBackendLine

// backendConn is the small IMAP client used until the splice starts.
type backendConn struct {
	conn   net.Conn
	br     *bufio.Reader
	n      int    // tag counter
	queued string // a command to send with the next one, its answer unread
}

// clientInfo is what a backend may learn about the client.
type clientInfo struct {
	remote, local netip.AddrPort
	id            []string // ID pairs to forward; nil means none
}

// relayFunc shows the client a SASL challenge from the backend and
// returns the client's answer line.
type relayFunc func(challenge string) (string, error)

// loginBackend logs in to b on behalf of the client: with its own
// credentials, or as the master user once they are verified. Any error
// other than *backendRefusedError (and the client going away) means the
// backend is unavailable.
func (s *Server) loginBackend(ctx context.Context, b *routing.Backend, cr *credentials, ci *clientInfo, relay relayFunc) (*backendLogin, error) {
	mst := s.o().Backend.Master
	if mst == nil || cr.oauth != nil {
		return s.dialLogin(ctx, b, cr, ci, relay)
	}
	if cr.authzid != "" && !strings.EqualFold(cr.authzid, cr.user) {
		return nil, &backendRefusedError{code: "AUTHORIZATIONFAILED", text: "Logging in as another user is not allowed here"}
	}
	var err error
	if _, ok := mst.Verifier.(backendVerifier); ok {
		var bl *backendLogin
		if bl, err = s.dialLogin(ctx, b, cr, ci, nil); err == nil {
			io.WriteString(bl.conn, "ig0 LOGOUT\r\n")
			bl.conn.Close()
		}
	} else if err = mst.Verifier.VerifyPassword(ctx, cr.user, cr.pass); errors.Is(err, ErrBadPassword) {
		err = &backendRefusedError{code: "AUTHENTICATIONFAILED", text: "Authentication failed."}
	}
	if err != nil {
		return nil, err
	}
	mc := &credentials{mech: sasl.Plain, authzid: cr.user, user: mst.User, pass: mst.Password}
	if mst.Form == MasterSeparator {
		sep := mst.Separator
		if sep == "" {
			sep = "*"
		}
		mc = &credentials{mech: "LOGIN", user: cr.user + sep + mst.User, pass: mst.Password}
	}
	return s.dialLogin(ctx, b, mc, ci, nil)
}

// VerifyOnBackend is a PasswordVerifier for master logins that checks the
// client's password by logging in to its backend with it (and out again)
// on a separate connection: every login then costs the backend two.
var VerifyOnBackend PasswordVerifier = backendVerifier{}

type backendVerifier struct{}

func (backendVerifier) VerifyPassword(context.Context, string, string) error {
	return errors.New("proxy: VerifyOnBackend only works inside a Server")
}

// dialLogin connects to b and logs in with cr. Two deadlines apply: the
// setup (connect, TLS, greeting, STARTTLS, CAPABILITY) is bounded by
// Timeouts.BackendLogin, the answer to the credentials by BackendAuth (a
// backend may take its time to say NO to a wrong password).
func (s *Server) dialLogin(ctx context.Context, b *routing.Backend, cr *credentials, ci *clientInfo, relay relayFunc) (*backendLogin, error) {
	// The setup's bound is the connection's deadline (and the dial's),
	// not a context of its own: one timer fewer a login.
	deadline := time.Now().Add(s.o().Timeouts.BackendLogin)
	t0 := time.Now()
	if pc := s.poolTake(b); pc != nil {
		// Greeted already (pool.go): no connect, no greeting to wait for.
		// A failure that is not the backend's answer (it dropped the
		// waiting connection) is tried again on a fresh one, unless the
		// client already took part in the exchange (a relayed OAuth).
		bl, err := s.loginOn(ctx, backendAttempt{conn: pc, b: b, cr: cr, ci: ci, relay: relay, deadline: deadline})
		var refused *backendRefusedError
		if err == nil || cr.oauth != nil || errors.As(err, &refused) {
			// A NO to the credentials is an answer: the backend is up.
			s.o().Metrics.BackendLogin(b.ID, 0, time.Since(t0), err == nil || refused != nil)
			if err != nil {
				pc.Close()
				return nil, err
			}
			bl.conn = unwrapGreeted(bl.conn)
			return bl, nil
		}
		// The backend dropped the waiting connection: dial a fresh one.
		pc.Close()
	}
	login := func(pipeline bool) (*backendLogin, error) {
		return s.dialThen(ctx, b, b.Addr, t0, deadline, func(conn net.Conn) (*backendLogin, error) {
			return s.loginOn(ctx, backendAttempt{conn: conn, b: b, cr: cr, ci: ci, relay: relay, deadline: deadline, pipeline: pipeline})
		})
	}
	bl, err := login(!s.o().Backend.NoPipelinedLogin)
	if errors.Is(err, errGreetingChanged) {
		bl, err = login(false)
	}
	return bl, err
}

// dialThen connects to addr, b's server for one protocol, within ctx,
// Timeouts.BackendConnect and deadline (zero: none), and logs in on the connection with login. It
// reports the backend login to the metrics (a NO to the credentials is an
// answer: the backend is up) and closes the connection if login fails.
func (s *Server) dialThen(ctx context.Context, b *routing.Backend, addr string, t0, deadline time.Time, login func(net.Conn) (*backendLogin, error)) (*backendLogin, error) {
	d := s.o().Timeouts.dialer()
	d.Deadline = deadline
	conn, err := d.DialContext(ctx, "tcp", addr)
	dialTook := time.Since(t0)
	if err != nil {
		s.o().Metrics.BackendLogin(b.ID, dialTook, 0, false)
		return nil, fmt.Errorf("dial: %w", err)
	}
	bl, err := login(conn)
	var refused *backendRefusedError
	up := err == nil || errors.As(err, &refused) || errors.Is(err, errGreetingChanged)
	s.o().Metrics.BackendLogin(b.ID, dialTook, time.Since(t0)-dialTook, up)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return bl, nil
}

// backendPrologue starts every protocol's backend leg: the PROXY header
// b asks for, then, for implicit TLS, the handshake. It returns the
// connection to speak the protocol on.
func (s *Server) backendPrologue(ctx context.Context, conn net.Conn, b *routing.Backend, ci *clientInfo) (net.Conn, error) {
	if v := b.ProxyProtocol; v == 1 || v == 2 {
		if err := writeProxyHeader(conn, v, ci.remote, ci.local); err != nil {
			return nil, fmt.Errorf("PROXY header: %w", err)
		}
	}
	if b.Security != routing.SecurityTLS {
		return conn, nil
	}
	tc := tls.Client(conn, s.backendTLS(b))
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, fmt.Errorf("TLS handshake: %w", err)
	}
	return tc, nil
}

func (s *Server) backendTLS(b *routing.Backend) *tls.Config {
	cfg := b.TLS
	if cfg == nil {
		cfg = s.o().Backend.TLS
	}
	if cfg == nil {
		cfg = &tls.Config{}
	}
	if cfg.ServerName == "" {
		cfg = cfg.Clone()
		host, _, err := net.SplitHostPort(b.Addr)
		if err != nil {
			host = b.Addr
		}
		cfg.ServerName = host
	}
	return cfg
}

// backendAttempt is one login on an open backend connection (dialled,
// or taken greeted from the pool), in any protocol: what the protocol's
// loginOn needs besides the contexts that bound it.
type backendAttempt struct {
	conn  net.Conn // the TCP connection, before any PROXY header or TLS
	b     *routing.Backend
	cr    *credentials // what to log in with (the master user's, if so configured)
	ci    *clientInfo  // what the backend may learn about the client
	relay relayFunc    // shows the client a backend's SASL challenge; nil: never asked
	// pipeline lets the credentials go before the greeting is read
	// (pipelinedLogin); not for a connection the pool greeted already.
	pipeline bool
	// deadline ends the setup (connect, TLS, greeting, STARTTLS,
	// CAPABILITY): the connection's deadline until the credentials go out.
	deadline time.Time
}

// loginOn logs in on a.conn. a.deadline bounds the setup; then
// Timeouts.BackendAuth bounds the answer to the credentials. lctx, the
// session's login, bounds both.
func (s *Server) loginOn(lctx context.Context, a backendAttempt) (*backendLogin, error) {
	conn, b, cr, ci, relay, deadline := a.conn, a.b, a.cr, a.ci, a.relay, a.deadline
	// The conn's deadline covers every read and write, the handshakes'
	// too. A cancelled context closes the conn: the cancel function uses
	// the TCP connection itself (conn becomes the TLS one below), and it
	// runs on another goroutine.
	raw := conn
	raw.SetDeadline(deadline)
	stop := context.AfterFunc(lctx, func() { raw.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	conn, err := s.backendPrologue(lctx, conn, b, ci)
	if err != nil {
		return nil, err
	}
	bc := &backendConn{conn: rawIOConn(conn), br: nil}
	bc.br = getBackendReader(bc.conn)
	defer func() { putBackendReader(bc.br) }()
	// The credentials go out before the greeting is read when the
	// backend's last greeting says how it wants them (pipelinedLogin).
	var early *loginPlan
	var earlyTag string
	if a.pipeline {
		if p, ok := s.pipelinedLogin(b, cr, ci); ok {
			bc.queueID(p, ci)
			if earlyTag, err = bc.startLogin(p, cr); err != nil {
				return nil, err
			}
			early = &p
		}
	}
	greet, err := bc.readLine()
	if err != nil {
		return nil, fmt.Errorf("reading greeting: %w", err)
	}
	caps, err := parseGreeting(greet)
	if err != nil {
		return nil, err
	}
	s.rememberGreeting(b, caps)
	if early != nil && caps == "" {
		return nil, errGreetingChanged
	}
	if caps == "" {
		if caps, err = bc.capability(); err != nil {
			return nil, err
		}
	}
	if b.Security == routing.SecurityStartTLS {
		if !hasCap(caps, "STARTTLS") {
			return nil, errors.New("backend does not offer STARTTLS")
		}
		if _, _, err := bc.simple("STARTTLS"); err != nil {
			return nil, notAuth("STARTTLS", err)
		}
		// Bytes after the tagged OK were sent in cleartext and could be
		// injected by anyone on the path: drop them with the reader.
		tc := tls.Client(conn, s.backendTLS(b))
		if err := tc.HandshakeContext(lctx); err != nil {
			return nil, fmt.Errorf("STARTTLS handshake: %w", err)
		}
		conn = tc
		putBackendReader(bc.br)
		bc.conn, bc.br = conn, getBackendReader(conn)
		if caps, err = bc.capability(); err != nil {
			return nil, err
		}
	}
	plan, err := planLogin(caps, cr, len(ci.id) > 0)
	if err != nil {
		return nil, err
	}
	if early != nil && plan != *early {
		// The backend says other than it said last time: what went out
		// early may not be what it wants now. Logged in over again,
		// the usual way (dialLogin).
		return nil, errGreetingChanged
	}
	if early == nil {
		bc.queueID(plan, ci)
	}

	// From here on the backend answers the credentials: it may take its
	// time over a wrong password, and that is not an outage.
	conn.SetDeadline(time.Now().Add(s.o().Timeouts.BackendAuth))
	if lctx.Err() != nil {
		// Cancelled before the new deadline: the cancel function's
		// deadline in the past may have been overwritten.
		raw.SetDeadline(time.Unix(1, 0))
	}

	var code string
	switch {
	case early != nil:
		code, err = bc.finishLogin(plan, earlyTag)
	case plan.kind == loginOAuth:
		code, err = bc.authenticate(cr.mech, cr.oauth, plan.saslIR, relay)
	case plan.kind == loginPlain:
		code, err = bc.authenticate(sasl.Plain, plainPayload(cr), plan.saslIR, nil)
	default:
		code, err = bc.loginCmd(cr, plan.literalPlus)
	}
	if err != nil {
		return nil, err
	}
	caps = ""
	if c, ok := strings.CutPrefix(code, "CAPABILITY "); ok {
		caps = c
	}
	if caps == "" {
		if caps, err = bc.capability(); err != nil {
			return nil, err
		}
	}
	stop()
	conn.SetDeadline(time.Time{})
	bl := &backendLogin{conn: conn, caps: caps}
	if n := bc.br.Buffered(); n > 0 {
		bl.pending, _ = bc.br.Peek(n)
		bl.pending = bytes.Clone(bl.pending)
	}
	return bl, nil
}

// A pipelined login: a backend greets every connection the same way, so
// once its greeting is known (Server.greetings, by address) the next login
// to it can send the ID and the credentials at once, without waiting for
// the greeting: one round trip to the backend, and one wake-up of the
// session, fewer. The greeting is still read, and checked: if it asks for
// another way of logging in than the one remembered, the connection is
// dropped and the login done over the usual way (errGreetingChanged). Only
// commands that go in one write are sent so (AUTHENTICATE PLAIN with
// SASL-IR, or LOGIN with quoted strings or LITERAL+), never OAuth (whose
// challenges are the client's), never before STARTTLS (the credentials
// would be cleartext), and the credentials only ever go to the backend
// the router chose, after its TLS handshake when it has one.

// errGreetingChanged: the greeting of a pipelined login asked for another
// login than the one sent.
var errGreetingChanged = errors.New("backend greeting changed since the last login")

// pipelinedLogin returns the plan for sending cr to b before its greeting,
// if its last greeting allows one.
func (s *Server) pipelinedLogin(b *routing.Backend, cr *credentials, ci *clientInfo) (loginPlan, bool) {
	if b.Security == routing.SecurityStartTLS || cr.oauth != nil {
		return loginPlan{}, false
	}
	v, ok := s.greetings.Load(greetingKey(b))
	if !ok || v.(string) == "" {
		return loginPlan{}, false
	}
	p, err := planLogin(v.(string), cr, len(ci.id) > 0)
	if err != nil || !p.oneWrite(cr) {
		return loginPlan{}, false
	}
	return p, true
}

// greetingKey is what a backend's greeting is remembered by: its address
// and how it is spoken to (a cleartext greeting may differ from one over
// TLS).
func greetingKey(b *routing.Backend) string {
	return strconv.Itoa(int(b.Security)) + " " + b.Addr
}

// rememberGreeting keeps the capabilities of b's greeting for the next
// login's pipelinedLogin (none before STARTTLS: never pipelined there).
func (s *Server) rememberGreeting(b *routing.Backend, caps string) {
	if b.Security == routing.SecurityStartTLS {
		return
	}
	k := greetingKey(b)
	if v, ok := s.greetings.Load(k); !ok || v.(string) != caps {
		s.greetings.Store(k, caps)
	}
}

// loginKind is how the credentials are sent.
type loginKind uint8

const (
	loginLogin loginKind = iota // the LOGIN command
	loginPlain                  // AUTHENTICATE PLAIN
	loginOAuth                  // AUTHENTICATE with the client's OAuth mechanism
)

// loginPlan is how a backend with given capabilities is logged in to:
// decided from them alone, so that two greetings that lead to the same
// plan are the same for the login.
type loginPlan struct {
	kind        loginKind
	saslIR      bool // the first response goes with the command
	literalPlus bool // LOGIN's literals need no continuation
	id          bool // the ID command goes first
}

// planLogin decides how to log in with cr to a backend offering caps;
// id reports that there are ID fields to forward.
func planLogin(caps string, cr *credentials, id bool) (loginPlan, error) {
	p := loginPlan{saslIR: hasCap(caps, "SASL-IR"), literalPlus: hasCap(caps, "LITERAL+"), id: id && hasCap(caps, "ID")}
	switch {
	case cr.oauth != nil:
		if !hasCap(caps, "AUTH="+cr.mech) {
			return p, fmt.Errorf("backend does not offer AUTH=%s", cr.mech)
		}
		p.kind = loginOAuth
	case hasCap(caps, "AUTH=PLAIN"):
		p.kind = loginPlain
	case cr.authzid != "":
		return p, errors.New("backend lacks AUTH=PLAIN, needed for a login with an authorization identity")
	case hasCap(caps, "LOGINDISABLED"):
		return p, errors.New("backend has LOGINDISABLED and no AUTH=PLAIN (configure TLS or STARTTLS to it)")
	default:
		p.kind = loginLogin
	}
	if p.kind != loginLogin {
		p.literalPlus = false // not what decides it
	} else {
		p.saslIR = false
	}
	return p, nil
}

// oneWrite reports whether p sends cr in one write, with no
// continuation to wait for.
func (p loginPlan) oneWrite(cr *credentials) bool {
	switch p.kind {
	case loginPlain:
		return p.saslIR
	case loginLogin:
		return p.literalPlus || isQuotable(cr.user) && isQuotable(cr.pass)
	}
	return false
}

// queueID puts the ID command, if p has one, before the next command, in
// the same write. Its answer is skipped when the login's is read: it does
// not matter (a backend that dislikes our ID still lets the client log in),
// and this saves a round trip.
func (bc *backendConn) queueID(p loginPlan, ci *clientInfo) {
	if p.id {
		bc.queued = bc.nextTag() + " ID " + idList(ci.id) + "\r\n"
	}
}

// startLogin sends cr as p says, in one write (p.oneWrite), and returns
// the command's tag; finishLogin reads its answer.
func (bc *backendConn) startLogin(p loginPlan, cr *credentials) (string, error) {
	tag := bc.nextTag()
	var cmd string
	if p.kind == loginPlain {
		cmd = tag + " AUTHENTICATE PLAIN " + base64.StdEncoding.EncodeToString(plainPayload(cr)) + "\r\n"
	} else {
		cmd = tag + " LOGIN " + loginArg(cr.user) + " " + loginArg(cr.pass) + "\r\n"
	}
	return tag, bc.send(cmd)
}

func (bc *backendConn) finishLogin(p loginPlan, tag string) (string, error) {
	if p.kind == loginPlain {
		return bc.authResult(tag, "", true, nil)
	}
	code, _, err := bc.result(tag)
	return code, err
}

// loginArg is a LOGIN argument in one write: quoted, or a LITERAL+
// literal.
func loginArg(s string) string {
	if isQuotable(s) {
		return quote(s)
	}
	return "{" + strconv.Itoa(len(s)) + "+}\r\n" + s
}

// plainPayload is the PLAIN message for cr (RFC 4616).
func plainPayload(cr *credentials) []byte {
	return []byte(cr.authzid + "\x00" + cr.user + "\x00" + cr.pass)
}

// parseGreeting checks the backend's greeting and returns the capability
// list it carries, if any.
func parseGreeting(line string) (caps string, err error) {
	rest, ok := strings.CutPrefix(line, "* ")
	if !ok {
		return "", fmt.Errorf("unexpected greeting %q", truncate(line))
	}
	status, rest, _ := strings.Cut(rest, " ")
	switch strings.ToUpper(status) {
	case "OK":
	case "PREAUTH":
		return "", errors.New("backend greeted with PREAUTH: it must ask for credentials")
	default:
		return "", fmt.Errorf("backend greeting: %q", truncate(line))
	}
	code, _ := respCode(rest)
	if c, ok := strings.CutPrefix(code, "CAPABILITY "); ok {
		return c, nil
	}
	return "", nil
}

// respCode splits "[CODE args] text" into the code and the text.
func respCode(s string) (code, text string) {
	if !strings.HasPrefix(s, "[") {
		return "", s
	}
	end := strings.IndexByte(s, ']')
	if end < 0 {
		return "", s
	}
	return s[1:end], strings.TrimPrefix(s[end+1:], " ")
}

func truncate(s string) string {
	if len(s) > 200 {
		return s[:200] + "..."
	}
	return s
}

func hasCap(caps, want string) bool {
	for c := range strings.FieldsSeq(caps) {
		if strings.EqualFold(c, want) {
			return true
		}
	}
	return false
}

// readLine reads one response line without CRLF. Literals in it (a line
// ending in {N}) are skipped: nothing before login needs their contents.
func (bc *backendConn) readLine() (string, error) {
	var sb strings.Builder
	for {
		line, err := bc.br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) || sb.Len()+len(line) > maxBackendLine {
			return "", errors.New("backend response line too long")
		}
		if err != nil {
			return "", err
		}
		line = bytes.TrimRight(line, "\r\n")
		n, ok := literalSuffix(line)
		if !ok && sb.Len() == 0 {
			return string(line), nil // the usual line: one copy, no builder
		}
		sb.Write(line)
		if !ok {
			return sb.String(), nil
		}
		if n > maxBackendLine {
			return "", errors.New("backend literal too long")
		}
		if _, err := bc.br.Discard(n); err != nil {
			return "", err
		}
	}
}

// literalSuffix reports a literal announced at the end of line.
func literalSuffix(line []byte) (int, bool) {
	if len(line) < 3 || line[len(line)-1] != '}' {
		return 0, false
	}
	i := bytes.LastIndexByte(line, '{')
	if i < 0 {
		return 0, false
	}
	n, err := strconv.Atoi(strings.TrimRight(string(line[i+1:len(line)-1]), "+-"))
	if err != nil || n < 0 {
		return 0, false
	}
	return n, true
}

func (bc *backendConn) nextTag() string {
	bc.n++
	return "ig" + strconv.Itoa(bc.n)
}

func (bc *backendConn) send(s string) error {
	if bc.queued != "" {
		s, bc.queued = bc.queued+s, ""
	}
	_, err := io.WriteString(bc.conn, s)
	return err
}

// result reads responses until the tagged one for tag. It returns the
// response code of a tagged OK and any untagged CAPABILITY seen; a tagged
// NO or BAD becomes *backendRefusedError.
func (bc *backendConn) result(tag string) (code, untaggedCaps string, err error) {
	for {
		line, err := bc.readLine()
		if err != nil {
			return "", "", err
		}
		if rest, ok := strings.CutPrefix(line, "* "); ok {
			if c, ok := cutPrefixFold(rest, "CAPABILITY "); ok {
				untaggedCaps = c
			} else if c, ok := cutPrefixFold(rest, "BYE"); ok {
				return "", "", fmt.Errorf("backend said BYE%s", truncate(c))
			}
			continue
		}
		rest, ok := strings.CutPrefix(line, tag+" ")
		if !ok {
			if strings.HasPrefix(line, "+") {
				return "", "", errors.New("unexpected continuation request")
			}
			continue
		}
		status, rest, _ := strings.Cut(rest, " ")
		code, text := respCode(rest)
		switch strings.ToUpper(status) {
		case "OK":
			return code, untaggedCaps, nil
		case "NO", "BAD":
			return "", "", &backendRefusedError{code: sanitize(code), text: sanitize(text)}
		}
		return "", "", fmt.Errorf("unexpected response %q", truncate(line))
	}
}

func cutPrefixFold(s, prefix string) (string, bool) {
	if len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix) {
		return s[len(prefix):], true
	}
	return "", false
}

// sanitize makes backend text safe to repeat to the client.
func sanitize(s string) string {
	b := []byte(truncate(s))
	for i, c := range b {
		if c < 0x20 || c >= 0x7f || c == '[' || c == ']' {
			b[i] = ' '
		}
	}
	return strings.TrimSpace(string(b))
}

// notAuth turns the backend's NO or BAD to a command other than the login
// into an unavailable backend: only the answer to the credentials is an
// authentication failure (charged to the limits, its text shown to the
// client). The refusal is described, not wrapped.
func notAuth(cmd string, err error) error {
	var refused *backendRefusedError
	if errors.As(err, &refused) {
		return fmt.Errorf("%s refused by the backend: %s", cmd, refused.Error())
	}
	return fmt.Errorf("%s: %w", cmd, err)
}

// simple sends a command without literals and waits for its result.
func (bc *backendConn) simple(cmd string) (code, caps string, err error) {
	tag := bc.nextTag()
	if err := bc.send(tag + " " + cmd + "\r\n"); err != nil {
		return "", "", err
	}
	return bc.result(tag)
}

func (bc *backendConn) capability() (string, error) {
	_, caps, err := bc.simple("CAPABILITY")
	if err != nil {
		return "", notAuth("CAPABILITY", err)
	}
	if caps == "" {
		return "", errors.New("backend sent no capabilities")
	}
	return caps, nil
}

// authenticate runs AUTHENTICATE mech with payload as the first response
// and returns the tagged OK's code. Later challenges (the OAuth error
// challenge) go to relay and its answers back to the backend; without a
// relay they are cancelled.
func (bc *backendConn) authenticate(mech string, payload []byte, saslIR bool, relay relayFunc) (string, error) {
	first := base64.StdEncoding.EncodeToString(payload)
	if first == "" {
		first = "="
	}
	tag := bc.nextTag()
	cmd := tag + " AUTHENTICATE " + mech
	sent := saslIR
	if saslIR {
		cmd += " " + first
	}
	if err := bc.send(cmd + "\r\n"); err != nil {
		return "", err
	}
	return bc.authResult(tag, first, sent, relay)
}

// authResult reads the answer to AUTHENTICATE tag, answering challenges:
// the first with first unless it went with the command (sent), later
// ones through relay, or cancelled without one.
func (bc *backendConn) authResult(tag, first string, sent bool, relay relayFunc) (string, error) {
	for {
		line, err := bc.readLine()
		if err != nil {
			return "", err
		}
		if chal, ok := strings.CutPrefix(line, "+"); ok {
			resp := first
			switch {
			case !sent:
				sent = true
			case relay == nil:
				resp = "*"
			default:
				if resp, err = relay(strings.TrimPrefix(chal, " ")); err != nil {
					return "", errClientGone
				}
			}
			if err := bc.send(resp + "\r\n"); err != nil {
				return "", err
			}
			continue
		}
		if rest, ok := strings.CutPrefix(line, tag+" "); ok {
			status, rest, _ := strings.Cut(rest, " ")
			code, text := respCode(rest)
			switch strings.ToUpper(status) {
			case "OK":
				return code, nil
			case "NO", "BAD":
				return "", &backendRefusedError{code: sanitize(code), text: sanitize(text)}
			}
			return "", fmt.Errorf("unexpected response %q", truncate(line))
		}
		if c, ok := strings.CutPrefix(line, "* "); ok {
			if _, bye := cutPrefixFold(c, "BYE"); bye {
				return "", fmt.Errorf("backend said %q", truncate(line))
			}
		}
	}
}

// awaitContinuation reads until a "+" (or the command's failure).
func (bc *backendConn) awaitContinuation(tag string) error {
	for {
		line, err := bc.readLine()
		if err != nil {
			return err
		}
		if strings.HasPrefix(line, "+") {
			return nil
		}
		if rest, ok := strings.CutPrefix(line, tag+" "); ok {
			status, rest, _ := strings.Cut(rest, " ")
			code, text := respCode(rest)
			if strings.EqualFold(status, "OK") {
				return errors.New("unexpected OK instead of continuation")
			}
			return &backendRefusedError{code: sanitize(code), text: sanitize(text)}
		}
	}
}

// loginCmd runs LOGIN with each argument as a quoted string, or as a
// literal when it cannot be quoted (8-bit, or quotes and backslashes are
// fine but CR/LF were refused earlier).
func (bc *backendConn) loginCmd(cr *credentials, literalPlus bool) (string, error) {
	tag := bc.nextTag()
	var cmd strings.Builder
	cmd.WriteString(tag + " LOGIN")
	for _, arg := range []string{cr.user, cr.pass} {
		cmd.WriteByte(' ')
		if isQuotable(arg) {
			cmd.WriteString(quote(arg))
			continue
		}
		if literalPlus {
			fmt.Fprintf(&cmd, "{%d+}\r\n%s", len(arg), arg)
			continue
		}
		fmt.Fprintf(&cmd, "{%d}\r\n", len(arg))
		if err := bc.send(cmd.String()); err != nil {
			return "", err
		}
		cmd.Reset()
		if err := bc.awaitContinuation(tag); err != nil {
			return "", err
		}
		cmd.WriteString(arg)
	}
	cmd.WriteString("\r\n")
	if err := bc.send(cmd.String()); err != nil {
		return "", err
	}
	code, _, err := bc.result(tag)
	return code, err
}

// isQuotable reports whether s fits into an IMAP4rev1 quoted string.
func isQuotable(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c == 0 || c == '\r' || c == '\n' || c >= 0x80 {
			return false
		}
	}
	return true
}

// quote returns s as an IMAP quoted string; s must be quotable.
func quote(s string) string {
	var b strings.Builder
	b.Grow(len(s) + 2)
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		if c := s[i]; c == '"' || c == '\\' {
			b.WriteByte('\\')
		}
		b.WriteByte(s[i])
	}
	b.WriteByte('"')
	return b.String()
}

// idList formats ID pairs as an IMAP list; values that cannot be quoted
// are dropped rather than sent as literals.
func idList(pairs []string) string {
	var b strings.Builder
	b.WriteByte('(')
	for i := 0; i+1 < len(pairs); i += 2 {
		if !isQuotable(pairs[i]) || !isQuotable(pairs[i+1]) {
			continue
		}
		if b.Len() > 1 {
			b.WriteByte(' ')
		}
		b.WriteString(quote(pairs[i]) + " " + quote(pairs[i+1]))
	}
	b.WriteByte(')')
	return b.String()
}
