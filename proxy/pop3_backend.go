package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/imapgate/imapgate/routing"
)

// This file is the backend leg of a POP3 login: dial, PROXY header, TLS,
// greeting, CAPA, STLS, XCLIENT (the client's address, which Dovecot
// takes from its login_trusted_networks) and AUTH PLAIN, under one
// deadline, as backend.go does for IMAP.

// pop3LoginBackend logs in to b's POP3 service for the client: with its
// own credentials, or as the master user once they are verified.
func (s *Server) pop3LoginBackend(ctx context.Context, b *routing.Backend, cr *credentials, ci *clientInfo, relay relayFunc) (*backendLogin, error) {
	if b.POP3Addr == "" {
		return nil, fmt.Errorf("backend %s has no POP3 address", b.ID)
	}
	return s.loginAt(ctx, b.POP3Addr, backendAttempt{b: b, cr: cr, ci: ci, relay: relay}, s.pop3LoginOn)
}

// pop3Conn is the small POP3 client used until the splice.
type pop3Conn struct {
	conn net.Conn
	br   *bufio.Reader
}

func (pc *pop3Conn) line() (string, error) {
	l, err := pc.br.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		return "", errors.New("backend response line too long")
	}
	if err != nil {
		return "", err
	}
	return string(bytes.TrimRight(l, "\r\n")), nil
}

// cmd sends a command and reads its status line: the text after +OK, or
// an error (*backendRefusedError for -ERR).
func (pc *pop3Conn) cmd(c string) (string, error) {
	if c != "" {
		if _, err := io.WriteString(pc.conn, c+"\r\n"); err != nil {
			return "", err
		}
	}
	l, err := pc.line()
	if err != nil {
		return "", err
	}
	return pop3Status(l)
}

// pop3Status parses a status line: the text after +OK, or an error
// (*backendRefusedError for -ERR).
func pop3Status(l string) (string, error) {
	if rest, ok := strings.CutPrefix(l, "+OK"); ok {
		return strings.TrimPrefix(rest, " "), nil
	}
	if rest, ok := strings.CutPrefix(l, "-ERR"); ok {
		code, text := respCode(strings.TrimPrefix(rest, " "))
		return "", &backendRefusedError{code: sanitize(code), text: sanitize(text)}
	}
	return "", fmt.Errorf("unexpected POP3 response %q", truncate(l))
}

// authRelay runs AUTH mech with payload as the initial response; a
// challenge (the OAuth error) goes to relay and its answer back.
func (pc *pop3Conn) authRelay(mech string, payload []byte, relay relayFunc) (string, error) {
	if _, err := io.WriteString(pc.conn, "AUTH "+mech+" "+base64.StdEncoding.EncodeToString(payload)+"\r\n"); err != nil {
		return "", err
	}
	for range 3 {
		l, err := pc.line()
		if err != nil {
			return "", err
		}
		chal, ok := strings.CutPrefix(l, "+ ")
		if !ok {
			if l == "+" {
				chal, ok = "", true
			}
		}
		if !ok {
			return pop3Status(l)
		}
		resp := "*"
		if relay != nil {
			if resp, err = relay(chal); err != nil {
				return "", errClientGone
			}
		}
		if _, err := io.WriteString(pc.conn, resp+"\r\n"); err != nil {
			return "", err
		}
	}
	return "", errors.New("too many SASL challenges")
}

// capa runs CAPA and returns the capability lines (none if refused).
func (pc *pop3Conn) capa() ([]string, error) {
	if _, err := pc.cmd("CAPA"); err != nil {
		var refused *backendRefusedError
		if errors.As(err, &refused) {
			return nil, nil
		}
		return nil, fmt.Errorf("CAPA: %w", err)
	}
	var caps []string
	for {
		l, err := pc.line()
		if err != nil {
			return nil, fmt.Errorf("CAPA: %w", err)
		}
		if l == "." {
			return caps, nil
		}
		if len(caps) > 100 {
			return nil, errors.New("CAPA: too many lines")
		}
		caps = append(caps, l)
	}
}

func hasPOP3Cap(caps []string, want string) bool {
	for _, c := range caps {
		if k, _, _ := strings.Cut(c, " "); strings.EqualFold(k, want) {
			return true
		}
	}
	return false
}

// pop3LoginOn logs in on a.conn, within ctx and a.deadline (loginAt).
func (s *Server) pop3LoginOn(ctx context.Context, a backendAttempt) (*backendLogin, error) {
	b, cr, ci, relay := a.b, a.cr, a.ci, a.relay
	conn, stop, err := s.openBackend(ctx, a)
	if err != nil {
		return nil, err
	}
	defer stop()
	pc := &pop3Conn{conn: conn, br: bufio.NewReaderSize(conn, 4096)}
	greet, err := pc.cmd("")
	if err != nil {
		return nil, fmt.Errorf("greeting: %w", err)
	}
	caps, err := pc.capa()
	if err != nil {
		return nil, err
	}
	// Dovecot says "[XCLIENT]" in its greeting to login_trusted_networks.
	xclient := strings.Contains(greet, "[XCLIENT]") || hasPOP3Cap(caps, "XCLIENT")
	if b.Security == routing.SecurityStartTLS {
		if _, err := pc.cmd("STLS"); err != nil {
			return nil, fmt.Errorf("STLS: %w", err)
		}
		if pc.br.Buffered() > 0 {
			// Sent in cleartext after the +OK: possibly injected.
			return nil, errors.New("backend sent data after its STLS reply")
		}
		tc := tls.Client(conn, s.backendTLS(b))
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, fmt.Errorf("STLS handshake: %w", err)
		}
		conn = tc
		pc = &pop3Conn{conn: conn, br: bufio.NewReaderSize(conn, 4096)}
		if caps, err = pc.capa(); err != nil {
			return nil, err
		}
		// What the backend says inside TLS is what counts.
		xclient = strings.Contains(greet, "[XCLIENT]") || hasPOP3Cap(caps, "XCLIENT")
	}
	if !s.o().Backend.NoForwardID && xclient && ci.remote.IsValid() {
		// Dovecot answers with a fresh greeting-like +OK.
		if _, err := pc.cmd("XCLIENT ADDR=" + ci.remote.Addr().String() + " PORT=" + strconv.Itoa(int(ci.remote.Port()))); err != nil {
			return nil, fmt.Errorf("XCLIENT: %w", err)
		}
	}
	var text string
	if cr.oauth != nil {
		text, err = pc.authRelay(cr.mech, cr.oauth, relay)
	} else {
		plain := base64.StdEncoding.EncodeToString([]byte(cr.authzid + "\x00" + cr.user + "\x00" + cr.pass))
		text, err = pc.cmd("AUTH PLAIN " + plain)
	}
	if err != nil {
		return nil, err
	}
	conn.SetDeadline(time.Time{})
	bl := &backendLogin{conn: conn, caps: sanitize(text)}
	if n := pc.br.Buffered(); n > 0 {
		bl.pending, _ = pc.br.Peek(n)
		bl.pending = bytes.Clone(bl.pending)
	}
	if bl.caps == "" {
		bl.caps = "Logged in."
	}
	return bl, nil
}
