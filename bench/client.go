package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// Security is how a benchmark client starts its connection.
type Security uint8

const (
	// ImplicitTLS handshakes TLS first (port 993).
	ImplicitTLS Security = iota
	// StartTLS reads the cleartext greeting, then upgrades with STARTTLS.
	StartTLS
	// Cleartext never uses TLS (for debugging against a plain port).
	Cleartext
)

func (s Security) String() string {
	switch s {
	case StartTLS:
		return "starttls"
	case Cleartext:
		return "cleartext"
	}
	return "tls"
}

// Dialer opens benchmark connections.
type Dialer struct {
	// Addr is host:port.
	Addr string
	// Security is how the connection starts; the zero value is implicit TLS.
	Security Security
	// TLS is the client configuration. Nil means verification against the
	// system roots with the host of Addr as server name.
	TLS *tls.Config
	// Timeout bounds the connect, the handshake and the greeting. Zero
	// means 10 s.
	Timeout time.Duration
	// ReadBuffer is the size of the connection's read buffer. Zero means
	// 4 KiB, which keeps thousands of idle sessions cheap; bulk FETCH
	// wants more.
	ReadBuffer int
}

// Conn is one IMAP client connection speaking just enough IMAP for load
// generation: every command is written in one piece and its response is
// read to the tagged line, literals skipped without copying. It is not
// safe for concurrent use.
type Conn struct {
	nc    net.Conn // the TLS connection, or the TCP one for Cleartext
	tcp   net.Conn
	cnt   countingReader
	r     *bufio.Reader
	rsize int
	tag   uint64
	wbuf  []byte
	// TLS describes the negotiated session; zero for Cleartext.
	TLS tls.ConnectionState
}

// countingReader counts the bytes read off the wire (after decryption).
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// Dial connects, does TLS as configured and reads the greeting.
func (d *Dialer) Dial(ctx context.Context) (*Conn, error) {
	timeout := d.Timeout
	if timeout == 0 {
		timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var nd net.Dialer
	tcp, err := nd.DialContext(ctx, "tcp", d.Addr)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		tcp.SetDeadline(dl)
	}
	c := &Conn{nc: tcp, tcp: tcp, rsize: d.ReadBuffer}
	if c.rsize <= 0 {
		c.rsize = 4 << 10
	}
	c.cnt.r = tcp
	c.r = bufio.NewReaderSize(&c.cnt, c.rsize)
	fail := func(err error) (*Conn, error) {
		tcp.Close()
		return nil, err
	}
	if d.Security == ImplicitTLS {
		if err := c.handshake(ctx, d.tlsConfig()); err != nil {
			return fail(err)
		}
	}
	line, err := c.readLine()
	if err != nil {
		return fail(fmt.Errorf("greeting: %w", err))
	}
	if !bytes.HasPrefix(line, []byte("* OK")) {
		return fail(fmt.Errorf("greeting: %q", line))
	}
	if d.Security == StartTLS {
		if _, err := c.Command("STARTTLS"); err != nil {
			return fail(err)
		}
		if err := c.handshake(ctx, d.tlsConfig()); err != nil {
			return fail(err)
		}
	}
	tcp.SetDeadline(time.Time{})
	return c, nil
}

func (d *Dialer) tlsConfig() *tls.Config {
	if d.TLS != nil {
		return d.TLS
	}
	host, _, _ := net.SplitHostPort(d.Addr)
	return &tls.Config{ServerName: host}
}

func (c *Conn) handshake(ctx context.Context, cfg *tls.Config) error {
	tc := tls.Client(c.tcp, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("TLS: %w", err)
	}
	c.nc = tc
	c.TLS = tc.ConnectionState()
	// Anything buffered before the handshake was cleartext and is dropped.
	c.cnt = countingReader{r: tc}
	c.r = bufio.NewReaderSize(&c.cnt, c.rsize)
	return nil
}

// Close closes the connection without LOGOUT.
func (c *Conn) Close() error { return c.nc.Close() }

// BytesRead is how many bytes (after TLS) were read from the connection.
func (c *Conn) BytesRead() int64 { return c.cnt.n }

// SetDeadline sets the deadline of the underlying connection.
func (c *Conn) SetDeadline(t time.Time) error { return c.nc.SetDeadline(t) }

// Reply is what a command got back.
type Reply struct {
	Status string // OK, NO or BAD
	Text   string // the rest of the tagged line
	Exists int    // the last "* N EXISTS", or -1
	Bytes  int64  // bytes read for the response, literals included
}

// StatusError is a tagged NO or BAD.
type StatusError struct {
	Command string
	Reply   Reply
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("%s: %s %s", e.Command, e.Reply.Status, e.Reply.Text)
}

// Command sends one command (without tag and CRLF) and reads its response.
// A NO or BAD is returned as a *StatusError along with the reply.
func (c *Conn) Command(cmd string) (Reply, error) {
	tag, err := c.send(cmd)
	if err != nil {
		return Reply{}, err
	}
	return c.response(tag, cmd)
}

// send writes "TAG cmd\r\n" in one write and returns the tag.
func (c *Conn) send(cmd string) (string, error) {
	c.tag++
	c.wbuf = c.wbuf[:0]
	c.wbuf = append(c.wbuf, 'a')
	c.wbuf = strconv.AppendUint(c.wbuf, c.tag, 10)
	tag := string(c.wbuf)
	c.wbuf = append(c.wbuf, ' ')
	c.wbuf = append(c.wbuf, cmd...)
	c.wbuf = append(c.wbuf, '\r', '\n')
	_, err := c.nc.Write(c.wbuf)
	return tag, err
}

// response reads untagged data and literals up to the line tagged tag.
func (c *Conn) response(tag, cmd string) (Reply, error) {
	start := c.cnt.n - int64(c.r.Buffered())
	rep := Reply{Exists: -1}
	prefix := []byte(tag + " ")
	for {
		line, err := c.readLine()
		if err != nil {
			return rep, fmt.Errorf("%s: %w", verb(cmd), err)
		}
		if bytes.HasPrefix(line, prefix) {
			rest := string(line[len(prefix):])
			rep.Status, rep.Text, _ = strings.Cut(rest, " ")
			rep.Bytes = c.cnt.n - int64(c.r.Buffered()) - start
			if rep.Status != "OK" {
				return rep, &StatusError{Command: verb(cmd), Reply: rep}
			}
			return rep, nil
		}
		if n, ok := existsCount(line); ok {
			rep.Exists = n
		}
	}
}

// readLine returns one logical response line without CRLF; literals
// inside it are skipped and replaced by "{N}". The slice is only valid
// until the next read.
func (c *Conn) readLine() ([]byte, error) {
	var long []byte // only for lines longer than the buffer or with literals
	for {
		frag, err := c.r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			long = append(long, frag...)
			continue
		}
		if err != nil {
			return nil, err
		}
		frag = bytes.TrimSuffix(frag, []byte("\r\n"))
		if n, ok := literalLen(frag); ok {
			long = append(long, frag...)
			if _, err := c.r.Discard(int(n)); err != nil {
				return nil, err
			}
			continue
		}
		if long == nil {
			return frag, nil
		}
		return append(long, frag...), nil
	}
}

// literalLen reports the N of a line ending in "{N}" (or "{N+}").
func literalLen(line []byte) (int64, bool) {
	if len(line) < 3 || line[len(line)-1] != '}' {
		return 0, false
	}
	i := bytes.LastIndexByte(line, '{')
	if i < 0 {
		return 0, false
	}
	num := bytes.TrimSuffix(line[i+1:len(line)-1], []byte("+"))
	n, err := strconv.ParseInt(string(num), 10, 64)
	if err != nil || n < 0 {
		return 0, false
	}
	return n, true
}

// existsCount parses "* N EXISTS".
func existsCount(line []byte) (int, bool) {
	rest, ok := bytes.CutPrefix(line, []byte("* "))
	if !ok {
		return 0, false
	}
	num, word, ok := bytes.Cut(rest, []byte(" "))
	if !ok || !bytes.EqualFold(word, []byte("EXISTS")) {
		return 0, false
	}
	n, err := strconv.Atoi(string(num))
	return n, err == nil
}

func verb(cmd string) string {
	v, _, _ := strings.Cut(cmd, " ")
	return v
}

// Login logs in with LOGIN and quoted strings.
func (c *Conn) Login(user, pass string) error {
	_, err := c.Command("LOGIN " + quote(user) + " " + quote(pass))
	return err
}

// Idle starts IDLE and returns once the server's continuation arrived.
func (c *Conn) Idle() error {
	tag, err := c.send("IDLE")
	if err != nil {
		return err
	}
	for {
		line, err := c.readLine()
		if err != nil {
			return fmt.Errorf("IDLE: %w", err)
		}
		if len(line) > 0 && line[0] == '+' {
			return nil
		}
		if bytes.HasPrefix(line, []byte(tag+" ")) {
			return fmt.Errorf("IDLE: %s", line)
		}
	}
}

// Append stores msg in mailbox with a synchronising literal.
func (c *Conn) Append(mailbox string, msg []byte) error {
	tag, err := c.send(fmt.Sprintf("APPEND %s {%d}", quote(mailbox), len(msg)))
	if err != nil {
		return err
	}
	line, err := c.readLine()
	if err != nil {
		return fmt.Errorf("APPEND: %w", err)
	}
	if len(line) == 0 || line[0] != '+' {
		return fmt.Errorf("APPEND: no continuation: %q", line)
	}
	if _, err := c.nc.Write(append(append([]byte(nil), msg...), '\r', '\n')); err != nil {
		return err
	}
	_, err = c.response(tag, "APPEND")
	return err
}

// quote makes an IMAP quoted string; the benchmark's user names and
// passwords never need a literal.
func quote(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		if s[i] == '"' || s[i] == '\\' {
			b.WriteByte('\\')
		}
		b.WriteByte(s[i])
	}
	b.WriteByte('"')
	return b.String()
}
