package proxy

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapserver"
)

// This file checks imapgate's pre-auth reader against go-imap v2's own
// command parser (reached through its server: the parser itself is
// internal) where both apply: LOGIN with two astrings, 7-bit, with the
// escapes RFC 3501 allows and literals go-imap buffers (up to 4 KiB).

// goimapRef is a go-imap server whose sessions record LOGIN's arguments.
type goimapRef struct {
	srv   *imapserver.Server
	conns chan net.Conn
	done  chan struct{}
	mu    sync.Mutex
	got   map[*refSession][2]string
}

type refSession struct {
	imapserver.Session // nil: nothing but Login and Close is reached before login
	ref                *goimapRef
}

func (s *refSession) Login(user, pass string) error {
	s.ref.mu.Lock()
	s.ref.got[s] = [2]string{user, pass}
	s.ref.mu.Unlock()
	return &imap.Error{Type: imap.StatusResponseTypeNo, Code: imap.ResponseCodeAuthenticationFailed, Text: "recorded"}
}

func (s *refSession) Close() error { return nil }

// chanListener hands out the connections sent on its channel.
type chanListener struct {
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}
func (l *chanListener) Close() error   { l.once.Do(func() { close(l.closed) }); return nil }
func (l *chanListener) Addr() net.Addr { return &net.TCPAddr{} }

func newGoimapRef(tb testing.TB) *goimapRef {
	ref := &goimapRef{conns: make(chan net.Conn), done: make(chan struct{}), got: map[*refSession][2]string{}}
	ref.srv = imapserver.New(&imapserver.Options{
		NewSession: func(*imapserver.Conn) (imapserver.Session, *imapserver.GreetingData, error) {
			return &refSession{ref: ref}, nil, nil
		},
		Caps:         imap.CapSet{imap.CapIMAP4rev1: {}, imap.CapLiteralPlus: {}},
		InsecureAuth: true,
		Logger:       discardLogger{},
	})
	ln := &chanListener{conns: ref.conns, closed: make(chan struct{})}
	go func() {
		defer close(ref.done)
		ref.srv.Serve(ln)
	}()
	tb.Cleanup(func() {
		ref.srv.Close()
		ln.Close()
		<-ref.done
	})
	return ref
}

type discardLogger struct{}

func (discardLogger) Printf(string, ...any) {}

// login sends in (one LOGIN command, tagged "a") to go-imap and reports
// the arguments it logged in with, or ok=false if it refused the syntax.
func (ref *goimapRef) login(tb testing.TB, in string) (user, pass string, ok bool) {
	tb.Helper()
	client, server := net.Pipe()
	defer client.Close()
	ref.conns <- server
	client.SetDeadline(time.Now().Add(2 * time.Second))
	br := bufio.NewReader(client)
	if _, err := br.ReadString('\n'); err != nil {
		tb.Fatalf("go-imap greeting: %v", err)
	}
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		client.Write([]byte(in))
	}()
	for {
		l, err := br.ReadString('\n')
		if err != nil {
			if errors.Is(err, net.ErrClosed) || strings.Contains(err.Error(), "closed") {
				break
			}
			tb.Fatalf("go-imap answer to %q: %v", in, err)
		}
		if strings.HasPrefix(l, "a ") {
			break
		}
	}
	// End the exchange as go-imap expects, with a LOGOUT and its close,
	// never by cutting the pipe in the middle of it: go-imap v2 beta.8 can
	// leave its encoder locked when a write fails, and that connection's
	// goroutine then never ends (goleak saw it).
	<-wrote
	go client.Write([]byte("z LOGOUT\r\n"))
	io.Copy(io.Discard, br) // until go-imap closes, or the deadline
	ref.mu.Lock()
	defer ref.mu.Unlock()
	for s, v := range ref.got {
		delete(ref.got, s)
		return v[0], v[1], true
	}
	return "", "", false
}

// oursLogin parses in with imapgate's reader; ok reports a LOGIN with two
// strings.
func oursLogin(in string) (user, pass string, ok bool) {
	lim := readLimits{maxLine: 8 << 10, maxLiteral: 4096, maxCommand: 64 << 10, maxArgs: 16}
	r, _ := newTestReader(in, lim)
	cmd, err := r.readCommand()
	if err != nil || cmd.name != "LOGIN" || len(cmd.args) != 2 || !cmd.args[0].isString() || !cmd.args[1].isString() {
		return "", "", false
	}
	return cmd.args[0].val, cmd.args[1].val, true
}

// encodeArg writes s as an IMAP string the way enc says: 0 atom (when s
// is one), 1 quoted, 2 synchronising literal, 3 LITERAL+.
func encodeArg(s string, enc uint8) string {
	switch enc % 4 {
	case 0:
		if s != "" && !strings.EqualFold(s, "NIL") && strings.IndexFunc(s, func(r rune) bool { return r > 0x7e || !isAtomChar(byte(r)) }) < 0 {
			return s
		}
		fallthrough
	case 1:
		if isQuotable(s) {
			return quote(s)
		}
		fallthrough
	case 2:
		return fmt.Sprintf("{%d}\r\n%s", len(s), s)
	}
	return fmt.Sprintf("{%d+}\r\n%s", len(s), s)
}

// comparable reports whether a raw LOGIN argument line is one both
// parsers are meant to agree on. Where go-imap is lenient and imapgate
// keeps to RFC 3501 they differ on purpose, and such lines are left out:
// any escape in a quoted string (RFC 3501: only \" and \\), a trailing
// space, a quoted string that runs past the line end (go-imap reads on
// into the next line). Literals and 8-bit bytes are the generated half's.
func comparable(raw string) bool {
	if strings.HasSuffix(raw, " ") {
		return false
	}
	inQuote := false
	for i := 0; i < len(raw); i++ {
		c := raw[i]
		if c < 0x20 || c > 0x7e || c == '{' {
			return false
		}
		switch {
		case c == '"':
			inQuote = !inQuote
		case c == '\\' && inQuote:
			if i+1 >= len(raw) || (raw[i+1] != '"' && raw[i+1] != '\\') {
				return false
			}
			i++
		}
	}
	return !inQuote
}

var diffSeeds = []struct {
	user, pass string
	encU, encP uint8
	raw        string
}{
	{"alice@example.org", "alicepass", 0, 0, `alice secret`},
	{"bob", "pa ss", 1, 1, `"bob" "pa ss"`},
	{"carol", `q"uo\te`, 2, 3, `"a\"b" "c\\d"`},
	{"dave", "", 3, 1, `"" ""`},
	{"pass]word", "x", 0, 2, `user pass]word`},
	{"x", "nil", 1, 0, `NIL NIL`},
	{"p%q", "(", 0, 0, `a  b`},
	{"", "", 0, 0, `a b `},
	{"u", "p", 0, 0, `(a) b`},
	{"u", "p", 0, 0, `"unterminated b`},
	{"u", "p", 0, 0, `a*b c`},
	{"u", "p", 0, 0, `a "b"c`},
	{"u", "p", 0, 0, `"a"b c`},
}

// TestDifferentialGoIMAP runs the seeds through both parsers.
func TestDifferentialGoIMAP(t *testing.T) {
	ref := newGoimapRef(t)
	for _, s := range diffSeeds {
		checkDifferential(t, ref, s.user, s.pass, s.encU, s.encP, s.raw)
	}
}

func FuzzDifferentialGoIMAP(f *testing.F) {
	for _, s := range diffSeeds {
		f.Add(s.user, s.pass, s.encU, s.encP, s.raw)
	}
	ref := newGoimapRef(f)
	f.Fuzz(func(t *testing.T, user, pass string, encU, encP uint8, raw string) {
		checkDifferential(t, ref, user, pass, encU, encP, raw)
	})
}

func checkDifferential(t *testing.T, ref *goimapRef, user, pass string, encU, encP uint8, raw string) {
	t.Helper()
	// Generated: a well-formed LOGIN, whatever the values (literals up to
	// go-imap's 4 KiB), must give both parsers the values back.
	if len(user) <= 4096 && len(pass) <= 4096 {
		in := "a LOGIN " + encodeArg(user, encU) + " " + encodeArg(pass, encP) + "\r\n"
		ou, op, ok := oursLogin(in)
		gu, gp, gok := ref.login(t, in)
		if !ok || ou != user || op != pass {
			t.Errorf("imapgate read %q as (%q, %q, %v), want (%q, %q)", in, ou, op, ok, user, pass)
		}
		if !gok || gu != user || gp != pass {
			t.Errorf("go-imap read %q as (%q, %q, %v), want (%q, %q)", in, gu, gp, gok, user, pass)
		}
	}
	// Raw: an argument line both are meant to agree on.
	if comparable(raw) && len(raw) < 1024 {
		in := "a LOGIN " + raw + "\r\n"
		ou, op, ok := oursLogin(in)
		gu, gp, gok := ref.login(t, in)
		if ok != gok || ou != gu || op != gp {
			t.Errorf("%q: imapgate (%q, %q, %v), go-imap (%q, %q, %v)", in, ou, op, ok, gu, gp, gok)
		}
	}
}

// grammarGen builds a pre-auth command from fuzz bytes, following the
// grammar imapgate reads (RFC 3501 with RFC 7888 literals): every command
// it builds is valid, so the reader must return exactly its tokens.
type grammarGen struct {
	b []byte
	i int
}

func (g *grammarGen) next() byte {
	if g.i >= len(g.b) {
		return 0
	}
	g.i++
	return g.b[g.i-1]
}

func (g *grammarGen) str(alphabet string, minLen int) string {
	n := minLen + int(g.next()%12)
	var sb strings.Builder
	for range n {
		sb.WriteByte(alphabet[int(g.next())%len(alphabet)])
	}
	return sb.String()
}

const (
	tagAlphabet  = "abcXYZ0189.-_]!#$&'/:;<=>?@^`|~"
	atomAlphabet = tagAlphabet + "+"
	anyAlphabet  = atomAlphabet + " \"\\(){}%*\x01\xc3\xa4"
)

// command returns the wire form, the tokens it must read as, and how
// many continuations it asks for.
func (g *grammarGen) command() (wire string, cmd command, conts int) {
	cmd.tag = g.str(tagAlphabet, 1)
	cmd.name = strings.ToUpper(g.str("abcdefghijklmnopqrstuvwxyz", 1))
	var sb strings.Builder
	sb.WriteString(cmd.tag + " " + cmd.name)
	depth := 0
	nargs := int(g.next() % 8)
	prevOpen := false
	for a := 0; a < nargs; a++ {
		kind := g.next() % 7
		if kind == 6 && depth == 0 {
			kind = 5
		}
		if !(kind == 6 || prevOpen) {
			sb.WriteByte(' ')
		} else if kind != 6 && g.next()%2 == 0 {
			sb.WriteByte(' ') // a space after "(" is tolerated
		}
		prevOpen = false
		switch kind {
		case 0, 1: // atom
			v := g.str(atomAlphabet, 1)
			sb.WriteString(v)
			cmd.args = append(cmd.args, token{kind: tokAtom, val: v})
		case 2: // quoted, escapes included
			v := g.str(anyAlphabet[:len(anyAlphabet)-5]+"\xc3\xa4", 0)
			v = strings.NewReplacer("\x01", "").Replace(v)
			sb.WriteString(quote(v))
			cmd.args = append(cmd.args, token{kind: tokQuoted, val: v})
		case 3, 4: // literal, synchronising or not
			v := g.str(anyAlphabet+"\r\n\x00", 0)
			plus := ""
			if kind == 4 {
				plus = "+"
			} else {
				conts++
			}
			fmt.Fprintf(&sb, "{%d%s}\r\n%s", len(v), plus, v)
			cmd.args = append(cmd.args, token{kind: tokLiteral, val: v})
		case 5:
			sb.WriteByte('(')
			depth++
			prevOpen = true
			cmd.args = append(cmd.args, token{kind: tokLParen})
		case 6:
			sb.WriteByte(')')
			depth--
			cmd.args = append(cmd.args, token{kind: tokRParen})
		}
	}
	for ; depth > 0; depth-- {
		sb.WriteByte(')')
		cmd.args = append(cmd.args, token{kind: tokRParen})
	}
	sb.WriteString("\r\n")
	return sb.String(), cmd, conts
}

// FuzzReadCommandGrammar: commands built from the grammar are read back
// token for token, with one continuation per synchronising literal; the
// same bytes with one byte changed never panic, hang or overrun a limit
// (FuzzReadCommand's checks).
func FuzzReadCommandGrammar(f *testing.F) {
	for _, s := range []string{"", "\x00\x01\x02\x03", "abcdefghijklmnop", "\x05\x03\x04\x06\x02\x01\x00\x07\x08", "\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf7"} {
		f.Add([]byte(s), uint16(0), byte(0))
	}
	f.Fuzz(func(t *testing.T, data []byte, at uint16, to byte) {
		g := &grammarGen{b: data}
		wire, want, conts := g.command()
		lim := readLimits{maxLine: 1 << 20, maxLiteral: 1 << 20, maxCommand: 1 << 20, maxArgs: 64}
		r, c := newTestReader(wire, lim)
		got, err := r.readCommand()
		if err != nil {
			t.Fatalf("valid command %q: %v", wire, err)
		}
		if got.tag != want.tag || got.name != want.name || len(got.args) != len(want.args) {
			t.Fatalf("%q read as %+v, want %+v", wire, got, want)
		}
		for i := range want.args {
			if got.args[i] != want.args[i] {
				t.Fatalf("%q: arg %d = %+v, want %+v", wire, i, got.args[i], want.args[i])
			}
		}
		if c.n != conts {
			t.Fatalf("%q: %d continuations, want %d", wire, c.n, conts)
		}
		// One byte changed: anything may come back, within the limits.
		if len(wire) > 0 {
			b := []byte(wire)
			b[int(at)%len(b)] = to
			tl := testLimits()
			r, _ := newTestReader(string(b), tl)
			for i := 0; i < 4; i++ {
				cmd, err := r.readCommand()
				if err != nil {
					var pe *protoError
					if errors.As(err, &pe) && !pe.fatal {
						continue
					}
					break
				}
				for _, a := range cmd.args {
					if a.kind == tokLiteral && len(a.val) > tl.maxLiteral {
						t.Fatalf("literal of %d bytes passed the %d limit", len(a.val), tl.maxLiteral)
					}
				}
			}
		}
	})
}
