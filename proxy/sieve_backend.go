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

// This file is the backend leg of a ManageSieve login: dial, PROXY
// header, TLS, the capability greeting, STARTTLS, XCLIENT (offered by
// Dovecot to its login_trusted_networks) and AUTHENTICATE "PLAIN", under
// one deadline.

// sieveLoginBackend logs in to b's ManageSieve for the client.
func (s *Server) sieveLoginBackend(ctx context.Context, b *routing.Backend, cr *credentials, ci *clientInfo) (*backendLogin, error) {
	if b.SieveAddr == "" {
		return nil, fmt.Errorf("backend %s has no ManageSieve address", b.ID)
	}
	return s.loginAt(ctx, b.SieveAddr, backendAttempt{b: b, cr: cr, ci: ci}, s.sieveLoginOn)
}

// loginAt is the backend login of POP3 and ManageSieve: the credentials
// to use (masterCredentials), then a dial to addr and loginOn on the new
// connection, all under Timeouts.BackendLogin.
func (s *Server) loginAt(ctx context.Context, addr string, a backendAttempt, loginOn func(context.Context, backendAttempt) (*backendLogin, error)) (*backendLogin, error) {
	cr, err := s.masterCredentials(ctx, a.cr)
	if err != nil {
		return nil, err
	}
	a.cr = cr
	a.deadline = time.Now().Add(s.o().Timeouts.BackendLogin)
	ctx, cancel := context.WithDeadline(ctx, a.deadline)
	defer cancel()
	return s.dialThen(ctx, a.b, addr, time.Now(), time.Time{}, func(conn net.Conn) (*backendLogin, error) {
		a.conn = conn
		return loginOn(ctx, a)
	})
}

// openBackend starts a POP3 or ManageSieve login on a.conn: every read
// and write is bounded by a.deadline, and ctx's end closes the
// connection, until stop is called; then comes the prologue (PROXY
// header, implicit TLS). The cancel function holds the TCP connection
// itself, since the one returned may be TLS over it and stop's function
// runs on another goroutine.
func (s *Server) openBackend(ctx context.Context, a backendAttempt) (conn net.Conn, stop func() bool, err error) {
	raw := a.conn
	raw.SetDeadline(a.deadline)
	stop = context.AfterFunc(ctx, func() { raw.SetDeadline(time.Unix(1, 0)) })
	if conn, err = s.backendPrologue(ctx, raw, a.b, a.ci); err != nil {
		stop()
		return nil, nil, err
	}
	return conn, stop, nil
}

// masterCredentials returns what to log in to a POP3 or ManageSieve
// backend with: the client's own credentials, or the master user's once
// the client's password is verified (Options.Backend.Master).
func (s *Server) masterCredentials(ctx context.Context, cr *credentials) (*credentials, error) {
	mst := s.o().Backend.Master
	if mst == nil || cr.oauth != nil {
		return cr, nil // OAuth is relayed as it is, as for IMAP
	}
	if cr.authzid != "" && !strings.EqualFold(cr.authzid, cr.user) {
		return nil, &backendRefusedError{code: "AUTH", text: "Logging in as another user is not allowed here"}
	}
	if _, onBackend := mst.Verifier.(backendVerifier); onBackend {
		// The client's own login on the backend is the check.
		return cr, nil
	}
	if err := mst.Verifier.VerifyPassword(ctx, cr.user, cr.pass); errors.Is(err, ErrBadPassword) {
		return nil, &backendRefusedError{code: "AUTH", text: "Authentication failed."}
	} else if err != nil {
		return nil, err
	}
	if mst.Form == MasterSeparator {
		sep := mst.Separator
		if sep == "" {
			sep = "*"
		}
		return &credentials{user: cr.user + sep + mst.User, pass: mst.Password}, nil
	}
	return &credentials{authzid: cr.user, user: mst.User, pass: mst.Password}, nil
}

// sieveResponse reads capability lines up to a status line (OK, NO,
// BYE); it returns the capabilities by name and the status line's words.
func sieveResponse(br *bufio.Reader) (map[string]string, []sieveArg, error) {
	lim := readLimits{maxLine: maxBackendLine, maxLiteral: maxBackendLine, maxCommand: 4 * maxBackendLine, maxArgs: 16}
	caps := make(map[string]string)
	for range 200 {
		args, err := readSieveCommand(br, lim)
		if err != nil {
			return nil, nil, err
		}
		if len(args) == 0 {
			continue
		}
		if !args[0].quoted {
			switch args[0].val {
			case "OK", "NO", "BYE":
				return caps, args, nil
			}
			return nil, nil, fmt.Errorf("unexpected ManageSieve response %q", truncate(args[0].val))
		}
		v := ""
		if len(args) > 1 {
			v = args[1].val
		}
		caps[strings.ToUpper(args[0].val)] = v
	}
	return nil, nil, errors.New("too many capability lines")
}

// sieveStatus turns a status line into nil (OK) or an error.
func sieveStatus(st []sieveArg) error {
	if st[0].val == "OK" {
		return nil
	}
	text := ""
	if n := len(st); n > 1 && st[n-1].quoted {
		text = st[n-1].val
	}
	if st[0].val == "NO" {
		return &backendRefusedError{text: sanitize(text)}
	}
	return fmt.Errorf("backend said BYE %q", truncate(text))
}

// sieveLoginOn logs in on a.conn, within ctx and a.deadline (loginAt;
// ManageSieve relays no challenge: a.relay is not used).
func (s *Server) sieveLoginOn(ctx context.Context, a backendAttempt) (*backendLogin, error) {
	b, cr, ci := a.b, a.cr, a.ci
	conn, stop, err := s.openBackend(ctx, a)
	if err != nil {
		return nil, err
	}
	defer stop()
	br := bufio.NewReaderSize(conn, 4096)
	caps, st, err := sieveResponse(br)
	if err != nil {
		return nil, fmt.Errorf("greeting: %w", err)
	}
	if err := sieveStatus(st); err != nil {
		return nil, fmt.Errorf("greeting: %w", err)
	}
	cmd := func(c string) (map[string]string, error) {
		if _, err := io.WriteString(conn, c+"\r\n"); err != nil {
			return nil, err
		}
		caps, st, err := sieveResponse(br)
		if err != nil {
			return nil, err
		}
		return caps, sieveStatus(st)
	}
	if b.Security == routing.SecurityStartTLS {
		if _, ok := caps["STARTTLS"]; !ok {
			return nil, errors.New("backend does not offer STARTTLS")
		}
		if _, err := io.WriteString(conn, "STARTTLS\r\n"); err != nil {
			return nil, err
		}
		if _, st, err := sieveResponse(br); err != nil || sieveStatus(st) != nil {
			return nil, fmt.Errorf("STARTTLS: %v %v", err, sieveStatus(st))
		}
		if br.Buffered() > 0 {
			return nil, errors.New("backend sent data after its STARTTLS reply")
		}
		tc := tls.Client(conn, s.backendTLS(b))
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, fmt.Errorf("STARTTLS handshake: %w", err)
		}
		conn = tc
		br = bufio.NewReaderSize(conn, 4096)
		// The server re-sends its capabilities after the handshake.
		if caps, st, err = sieveResponse(br); err != nil || sieveStatus(st) != nil {
			return nil, fmt.Errorf("after STARTTLS: %v", err)
		}
	}
	if _, ok := caps["XCLIENT"]; ok && !s.o().Backend.NoForwardID && ci.remote.IsValid() {
		if _, err := cmd("XCLIENT ADDR=" + ci.remote.Addr().String() + " PORT=" + strconv.Itoa(int(ci.remote.Port()))); err != nil {
			return nil, fmt.Errorf("XCLIENT: %w", err)
		}
	}
	plain := base64.StdEncoding.EncodeToString([]byte(cr.authzid + "\x00" + cr.user + "\x00" + cr.pass))
	if _, err := io.WriteString(conn, `AUTHENTICATE "PLAIN" "`+plain+"\"\r\n"); err != nil {
		return nil, err
	}
	_, st, err = sieveResponse(br)
	if err != nil {
		return nil, fmt.Errorf("AUTHENTICATE: %w", err)
	}
	if err := sieveStatus(st); err != nil {
		return nil, err
	}
	text := "Logged in."
	if n := len(st); n > 1 && st[n-1].quoted {
		text = sanitize(st[n-1].val)
	}
	conn.SetDeadline(time.Time{})
	bl := &backendLogin{conn: conn, caps: "OK " + sieveQuote(text)}
	if n := br.Buffered(); n > 0 {
		bl.pending, _ = br.Peek(n)
		bl.pending = bytes.Clone(bl.pending)
	}
	return bl, nil
}
