package lmtp

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/textproto"
	"strconv"
	"strings"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/imapgate/imapgate/routing"
)

// This file is the backend leg: dial, TLS, greeting, LHLO, STARTTLS and
// XCLIENT by hand (go-smtp's client has no XCLIENT), then go-smtp's LMTP
// client for the transaction itself.

// errLoop says the backend greeted as an imapgate.
var errLoop = errors.New("backend is an imapgate (mail loop)")

// backendTx is one backend's share of a transaction.
type backendTx struct {
	b     *routing.Backend
	conn  net.Conn // under the client: deadlines for message chunks
	c     *smtp.Client
	err   error             // the connection failed: every recipient on it gets 4xx
	rcpts []*rcpt           // accepted by this backend, in order
	dataC *smtp.DataCommand // between DATA and the final dot
	open  bool              // MAIL sent, the transaction not ended yet
}

// client is what the backend may learn about the MTA's connection.
type client struct {
	remote netip.AddrPort
	helo   string
}

// dial connects to b's LMTP service and says hello, forwarding the MTA's
// address with XCLIENT when the backend offers it.
func (s *Server) dial(ctx context.Context, b *routing.Backend, cl client) (*backendTx, error) {
	addr := b.AddrFor(routing.ProtocolLMTP)
	if addr == "" {
		return nil, errNoLMTP
	}
	t := s.o.Timeouts
	d := net.Dialer{Timeout: t.BackendConnect}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			conn.Close()
		}
	}()
	conn.SetDeadline(time.Now().Add(t.Backend))
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	if b.LMTPSecurity == routing.SecurityTLS {
		tc := tls.Client(conn, s.backendTLS(b, addr))
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, fmt.Errorf("TLS handshake: %w", err)
		}
		conn = tc
	}
	br := bufio.NewReader(conn)
	_, greet, err := textproto.NewReader(br).ReadResponse(220)
	if err != nil {
		return nil, fmt.Errorf("greeting: %w", err)
	}
	if strings.Contains(greet, marker) {
		return nil, errLoop
	}
	ext, err := s.lhlo(conn, br)
	if err != nil {
		return nil, err
	}
	if b.LMTPSecurity == routing.SecurityStartTLS {
		if _, ok := ext["STARTTLS"]; !ok {
			return nil, errors.New("backend does not offer STARTTLS")
		}
		if _, err := io.WriteString(conn, "STARTTLS\r\n"); err != nil {
			return nil, err
		}
		if _, _, err := textproto.NewReader(br).ReadResponse(220); err != nil {
			return nil, fmt.Errorf("STARTTLS: %w", err)
		}
		// Bytes after the 220 came in cleartext and could have been
		// injected on the path (CVE-2011-0411): refuse rather than read.
		if br.Buffered() > 0 {
			return nil, errors.New("backend sent data after its STARTTLS reply")
		}
		tc := tls.Client(conn, s.backendTLS(b, addr))
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, fmt.Errorf("STARTTLS handshake: %w", err)
		}
		conn = tc
		br = bufio.NewReader(conn)
		if ext, err = s.lhlo(conn, br); err != nil {
			return nil, err
		}
	}
	// go-smtp's client starts by reading a greeting: after XCLIENT the
	// backend sends a fresh one (its reply to XCLIENT); without XCLIENT it
	// is given a stand-in, and its LHLO is then the second one (allowed).
	var r io.Reader = br
	if params, ok := ext["XCLIENT"]; ok {
		if _, err := io.WriteString(conn, xclient(params, cl)+"\r\n"); err != nil {
			return nil, err
		}
	} else {
		r = io.MultiReader(strings.NewReader("220 ready\r\n"), br)
	}
	c := smtp.NewClientLMTP(&readerConn{Conn: conn, r: r})
	c.CommandTimeout = t.Backend
	c.SubmissionTimeout = t.Backend
	if err := c.Hello(s.o.Hostname); err != nil {
		return nil, fmt.Errorf("LHLO after XCLIENT: %w", err)
	}
	conn.SetDeadline(time.Time{})
	ok = true
	return &backendTx{b: b, conn: conn, c: c}, nil
}

// lhlo sends LHLO and returns the extensions by keyword.
func (s *Server) lhlo(conn net.Conn, br *bufio.Reader) (map[string]string, error) {
	if _, err := io.WriteString(conn, "LHLO "+s.o.Hostname+"\r\n"); err != nil {
		return nil, err
	}
	_, msg, err := textproto.NewReader(br).ReadResponse(250)
	if err != nil {
		return nil, fmt.Errorf("LHLO: %w", err)
	}
	ext := make(map[string]string)
	lines := strings.Split(msg, "\n")
	for _, l := range lines[1:] {
		k, v, _ := strings.Cut(l, " ")
		ext[strings.ToUpper(k)] = v
	}
	return ext, nil
}

// xclient builds the XCLIENT command for the attributes the backend
// names (Postfix's XCLIENT, which Dovecot implements).
func xclient(params string, cl client) string {
	offered := make(map[string]bool)
	for _, p := range strings.Fields(params) {
		offered[strings.ToUpper(p)] = true
	}
	var b strings.Builder
	b.WriteString("XCLIENT")
	if offered["ADDR"] && cl.remote.IsValid() {
		a := cl.remote.Addr()
		v := a.String()
		if a.Is6() {
			v = "IPV6:" + v
		}
		b.WriteString(" ADDR=" + xtext(v))
	}
	if offered["PORT"] && cl.remote.IsValid() {
		b.WriteString(" PORT=" + strconv.Itoa(int(cl.remote.Port())))
	}
	if offered["HELO"] && cl.helo != "" {
		b.WriteString(" HELO=" + xtext(cl.helo))
	}
	return b.String()
}

// xtext encodes s as RFC 3461 xtext.
func xtext(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 33 || c > 126 || c == '+' || c == '=' {
			fmt.Fprintf(&b, "+%02X", c)
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}

func (s *Server) backendTLS(b *routing.Backend, addr string) *tls.Config {
	cfg := b.TLS
	if cfg == nil {
		cfg = s.o.BackendTLS
	}
	if cfg == nil {
		cfg = &tls.Config{}
	}
	if cfg.ServerName == "" {
		cfg = cfg.Clone()
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			host = addr
		}
		cfg.ServerName = host
	}
	return cfg
}

// readerConn reads through r (a buffered reader over Conn, or what it
// already holds) and writes to Conn.
type readerConn struct {
	net.Conn
	r io.Reader
}

func (c *readerConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// close ends the backend connection: politely when it is idle, at once
// when a message was cut short (the backend then delivers nothing).
func (tx *backendTx) close(polite bool) {
	if tx.c == nil {
		return
	}
	if polite && tx.err == nil && tx.dataC == nil {
		tx.conn.SetDeadline(time.Now().Add(time.Second))
		tx.c.Quit()
	}
	tx.c.Close()
}
