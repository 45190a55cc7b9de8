package proxy

import (
	"bufio"
	"errors"
	"io"
	"strings"
	"testing"
)

type recContinuer struct{ n int }

func (c *recContinuer) continueLiteral() error { c.n++; return nil }

func testLimits() readLimits {
	return readLimits{maxLine: 256, maxLiteral: 64, maxCommand: 512, maxArgs: 16}
}

func newTestReader(in string, lim readLimits) (*cmdReader, *recContinuer) {
	c := &recContinuer{}
	// bufio's smallest buffer: every line longer than 16 bytes takes the
	// path that gathers a line from several reads.
	return &cmdReader{br: bufio.NewReaderSize(strings.NewReader(in), 16), cont: c, lim: lim}, c
}

func TestReadCommand(t *testing.T) {
	str := func(k tokKind, v string) token { return token{kind: k, val: v} }
	atom := func(v string) token { return str(tokAtom, v) }
	q := func(v string) token { return str(tokQuoted, v) }
	lit := func(v string) token { return str(tokLiteral, v) }
	lp, rp := token{kind: tokLParen}, token{kind: tokRParen}
	tests := []struct {
		name  string
		in    string
		tag   string
		cmd   string
		args  []token
		conts int // continuation requests sent
	}{
		{"bare", "a1 CAPABILITY\r\n", "a1", "CAPABILITY", nil, 0},
		{"lower case, LF only", "x noop\n", "x", "NOOP", nil, 0},
		{"login atoms", "a LOGIN alice secret\r\n", "a", "LOGIN", []token{atom("alice"), atom("secret")}, 0},
		{"login quoted", `a LOGIN "alice@example.org" "pa ss\"w\\d"` + "\r\n", "a", "LOGIN", []token{q("alice@example.org"), q(`pa ss"w\d`)}, 0},
		{"empty quoted", `a LOGIN "" ""` + "\r\n", "a", "LOGIN", []token{q(""), q("")}, 0},
		{"sync literal", "a LOGIN {5}\r\nalice {3}\r\np w\r\n", "a", "LOGIN", []token{lit("alice"), lit("p w")}, 2},
		{"literal+", "a LOGIN {5+}\r\nalice {3+}\r\nx\r\n\r\n", "a", "LOGIN", []token{lit("alice"), lit("x\r\n")}, 0},
		{"literal at the size limit", "a LOGIN {64}\r\n" + strings.Repeat("p", 64) + " x\r\n", "a", "LOGIN", []token{lit(strings.Repeat("p", 64)), atom("x")}, 1},
		{"zero literal", "a LOGIN {0}\r\n {0+}\r\n\r\n", "a", "LOGIN", []token{lit(""), lit("")}, 1},
		{"tag with bracket", "a]1 NOOP\r\n", "a]1", "NOOP", nil, 0},
		{"line at the limit", "a LOGIN " + strings.Repeat("u", 256-len("a LOGIN  p\r\n")) + " p\r\n", "a", "LOGIN", []token{atom(strings.Repeat("u", 256-len("a LOGIN  p\r\n"))), atom("p")}, 0},
		{"utf-8 quoted", "a LOGIN carol \"pässwörd\"\r\n", "a", "LOGIN", []token{atom("carol"), q("pässwörd")}, 0},
		{"brackets in atom", "a LOGIN user pass]word\r\n", "a", "LOGIN", []token{atom("user"), atom("pass]word")}, 0},
		{"id list", `a ID ("name" "Thunderbird" "version" NIL)` + "\r\n", "a", "ID", []token{lp, q("name"), q("Thunderbird"), q("version"), atom("NIL"), rp}, 0},
		{"id nil", "a ID NIL\r\n", "a", "ID", []token{atom("NIL")}, 0},
		{"id literal in list", "a ID (\"name\" {3}\r\nabc)\r\n", "a", "ID", []token{lp, q("name"), lit("abc"), rp}, 1},
		{"id space after paren", `a ID ( "k" "v" )` + "\r\n", "a", "ID", []token{lp, q("k"), q("v"), rp}, 0},
		{"authenticate sasl-ir", "a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n", "a", "AUTHENTICATE", []token{atom("PLAIN"), atom("AGFsaWNlAHNlY3JldA==")}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, c := newTestReader(tt.in, testLimits())
			cmd, err := r.readCommand()
			if err != nil {
				t.Fatalf("readCommand: %v", err)
			}
			if cmd.tag != tt.tag || cmd.name != tt.cmd {
				t.Errorf("got tag %q name %q, want %q %q", cmd.tag, cmd.name, tt.tag, tt.cmd)
			}
			if len(cmd.args) != len(tt.args) {
				t.Fatalf("args = %+v, want %+v", cmd.args, tt.args)
			}
			for i := range tt.args {
				if cmd.args[i] != tt.args[i] {
					t.Errorf("arg %d = %+v, want %+v", i, cmd.args[i], tt.args[i])
				}
			}
			if c.n != tt.conts {
				t.Errorf("continuations = %d, want %d", c.n, tt.conts)
			}
			if _, err := r.readCommand(); !errors.Is(err, io.EOF) {
				t.Errorf("after the command: %v, want EOF (all input consumed)", err)
			}
		})
	}
}

func TestReadCommandErrors(t *testing.T) {
	long := strings.Repeat("x", 300)
	tests := []struct {
		name  string
		in    string
		tag   string // tag in the error; "" = untagged
		code  string
		fatal bool
		ioErr error // a non-protocol error instead
		conts int
	}{
		{"empty line", "\r\n", "", "", false, nil, 0},
		{"no command", "a\r\n", "a", "", false, nil, 0},
		{"bad tag", "a+b NOOP\r\n", "", "", false, nil, 0},
		{"tag with quote", "\"a NOOP\r\n", "", "", false, nil, 0},
		{"double space", "a LOGIN  x y\r\n", "a", "", false, nil, 0},
		{"trailing space", "a NOOP \r\n", "a", "", false, nil, 0},
		{"unterminated quote", "a LOGIN \"abc\r\n", "a", "", false, nil, 0},
		{"bad escape", `a LOGIN "a\b" x` + "\r\n", "a", "", false, nil, 0},
		{"unbalanced paren", "a ID (\"a\" \"b\"\r\n", "a", "", false, nil, 0},
		{"stray close paren", "a ID )\r\n", "a", "", false, nil, 0},
		{"literal not at end", "a LOGIN {3} x\r\n", "a", "", false, nil, 0},
		{"literal bad size", "a LOGIN {x}\r\n", "a", "", false, nil, 0},
		{"literal huge size", "a LOGIN {99999999999}\r\n", "a", "", false, nil, 0},
		{"sync literal too big", "a LOGIN {65}\r\n", "a", "TOOBIG", false, nil, 0},
		{"non-sync literal too big", "a LOGIN {65+}\r\n", "", "TOOBIG", true, nil, 0},
		{"line too long", "a LOGIN " + long + "\r\n", "a", "TOOBIG", false, nil, 0},
		{"line one byte too long", "a LOGIN " + strings.Repeat("u", 257-len("a LOGIN  p\r\n")) + " p\r\n", "a", "TOOBIG", false, nil, 0},
		{"line too long, no tag", "a+ LOGIN " + long + "\r\n", "", "TOOBIG", true, nil, 0},
		{"line too long, then a non-sync literal", "a LOGIN " + long + " {5+}\r\nalice\r\n", "", "TOOBIG", true, nil, 0},
		{"line too long across literals", "a LOGIN {3}\r\nabc " + long + "\r\n", "a", "TOOBIG", false, nil, 1},
		{"no line end within the command limit", "a LOGIN " + strings.Repeat(long, 3), "", "TOOBIG", true, nil, 0},
		{"literal minus", "a LOGIN alice {4-}\r\n", "a", "", false, nil, 0},
		{"literal plus first", "a LOGIN {+5}\r\n", "a", "", false, nil, 0},
		{"literal negative", "a LOGIN {-5}\r\n", "a", "", false, nil, 0},
		{"literal space", "a LOGIN { 5}\r\n", "a", "", false, nil, 0},
		{"literal hex", "a LOGIN {0x5}\r\n", "a", "", false, nil, 0},
		{"literal two plus", "a LOGIN {5++}\r\n", "a", "", false, nil, 0},
		{"literal empty", "a LOGIN {}\r\n", "a", "", false, nil, 0},
		{"literal only plus", "a LOGIN {+}\r\n", "a", "", false, nil, 0},
		{"literal over 2^32", "a LOGIN {4294967296}\r\n", "a", "", false, nil, 0},
		{"8-bit tag", "\xc3\xa4 NOOP\r\n", "", "", false, nil, 0},
		{"control in tag", "a\x01 NOOP\r\n", "", "", false, nil, 0},
		{"bad tag, non-sync literal follows", "a+b LOGIN {5+}\r\n", "", "", true, nil, 0},
		{"bad argument, non-sync literal follows", "a LOGIN \"x {5+}\r\n", "", "", true, nil, 0},
		{"too many args", "a X" + strings.Repeat(" a", 17) + "\r\n", "a", "TOOBIG", false, nil, 0},
		{"eof mid line", "a NOOP", "", "", false, io.ErrUnexpectedEOF, 0},
		{"eof in literal", "a LOGIN {5}\r\nab", "", "", false, io.ErrUnexpectedEOF, 1},
		{"command too long across literals", "a LOGIN {60}\r\n" + strings.Repeat("a", 60) + " {60}\r\n" + strings.Repeat("b", 60) + " {60}\r\n" + strings.Repeat("c", 60) + " {60}\r\n" + strings.Repeat("d", 60) + " {60}\r\n" + strings.Repeat("e", 60) + " {60}\r\n" + strings.Repeat("f", 60) + " {60}\r\n" + strings.Repeat("g", 60) + " {60}\r\n" + strings.Repeat("h", 60) + " {60}\r\n", "a", "TOOBIG", false, nil, 7},
		{"nul in quoted", "a LOGIN \"a\x00b\" x\r\n", "a", "", false, nil, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, c := newTestReader(tt.in, testLimits())
			cmd, err := r.readCommand()
			if err == nil {
				t.Fatalf("readCommand = %+v, want an error", cmd)
			}
			if c.n != tt.conts {
				t.Errorf("continuations = %d, want %d", c.n, tt.conts)
			}
			if tt.ioErr != nil {
				if !errors.Is(err, tt.ioErr) {
					t.Fatalf("err = %v, want %v", err, tt.ioErr)
				}
				return
			}
			var pe *protoError
			if !errors.As(err, &pe) {
				t.Fatalf("err = %v (%T), want *protoError", err, err)
			}
			if pe.tag != tt.tag || pe.code != tt.code || pe.fatal != tt.fatal {
				t.Errorf("protoError = %+v, want tag %q code %q fatal %v", pe, tt.tag, tt.code, tt.fatal)
			}
		})
	}
}

// TestReadCommandBounded checks a run of commands never reads past the
// limits: a huge sync literal gets no continuation, so its bytes are
// never requested.
func TestReadCommandBadThenGood(t *testing.T) {
	r, _ := newTestReader("a LOGIN \"x\r\nb NOOP\r\n", testLimits())
	if _, err := r.readCommand(); err == nil {
		t.Fatal("want an error for the broken command")
	}
	cmd, err := r.readCommand()
	if err != nil || cmd.tag != "b" || cmd.name != "NOOP" {
		t.Fatalf("next command = %+v, %v; want b NOOP", cmd, err)
	}
}

// TestReadCommandResyncAfterTooLong: a too-long line is answered and the
// next command is read from the next line, however the long one was cut
// into reads; a short line after a long one does not keep its memory.
func TestReadCommandResyncAfterTooLong(t *testing.T) {
	long := strings.Repeat("y", 400) // over the line limit, within the command limit
	r, _ := newTestReader("a LOGIN "+long+"\r\nb NOOP\r\nc LOGIN {3}\r\nabc "+long+"\r\nd NOOP\r\n", testLimits())
	for _, want := range []string{"a", "b", "c", "d"} {
		cmd, err := r.readCommand()
		var pe *protoError
		switch {
		case want == "b" || want == "d":
			if err != nil || cmd.tag != want {
				t.Fatalf("after a too-long line: %+v, %v; want %s NOOP", cmd, err, want)
			}
			if cap(r.acc) > cmdReaderBuffer {
				t.Errorf("the reader keeps %d bytes after a long line", cap(r.acc))
			}
		case !errors.As(err, &pe) || pe.tag != want || pe.code != "TOOBIG" || pe.fatal:
			t.Fatalf("too-long line %s: %v, want a tagged BAD [TOOBIG]", want, err)
		}
	}
}

func FuzzReadCommand(f *testing.F) {
	for _, s := range []string{
		"a LOGIN alice secret\r\n",
		"a LOGIN {5}\r\nalice {3+}\r\np w\r\n",
		`a ID ("name" "x" "version" NIL)` + "\r\n",
		"a AUTHENTICATE PLAIN =\r\n",
		`a LOGIN "a\"b" "c\\d"` + "\r\n",
		"GET / HTTP/1.1\r\n",
		"a ID (\"k\" {2}\r\nvv)\r\n",
		// The grammar's corners: literal forms, tags, long lines.
		"a LOGIN {+5}\r\n", "a LOGIN {5-}\r\nalice\r\n", "a LOGIN {4294967296}\r\n",
		"a LOGIN {0}\r\n {0+}\r\n\r\n", "\xc3\xa4 NOOP\r\n", "a]b NOOP\r\n", "a+ LOGIN {5+}\r\nalice\r\n",
		"a LOGIN " + strings.Repeat("x", 300) + "\r\nb NOOP\r\n",
		"a LOGIN " + strings.Repeat("x", 300) + " {3+}\r\nabc\r\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		lim := testLimits()
		r, _ := newTestReader(in, lim)
		for i := 0; i < 20; i++ {
			cmd, err := r.readCommand()
			if err != nil {
				var pe *protoError
				if errors.As(err, &pe) && !pe.fatal {
					continue
				}
				return
			}
			if cmd.tag == "" || cmd.name == "" {
				t.Fatalf("command without tag or name: %+v", cmd)
			}
			if strings.ToUpper(cmd.name) != cmd.name {
				t.Fatalf("name not upper case: %q", cmd.name)
			}
			if len(cmd.args) > lim.maxArgs+1 {
				t.Fatalf("%d args, limit %d", len(cmd.args), lim.maxArgs)
			}
			total := 0
			for _, a := range cmd.args {
				total += len(a.val)
				if a.kind == tokLiteral && len(a.val) > lim.maxLiteral {
					t.Fatalf("literal of %d bytes passed the %d limit", len(a.val), lim.maxLiteral)
				}
			}
			if total > lim.maxCommand {
				t.Fatalf("command of %d bytes passed the %d limit", total, lim.maxCommand)
			}
		}
	})
}

func FuzzDecodePlain(f *testing.F) {
	f.Add("AGFsaWNlAHNlY3JldA==")
	f.Add("=")
	f.Add("*")
	f.Add("YQBiAGM=")
	f.Fuzz(func(t *testing.T, in string) {
		raw, err := decodeSASL(in)
		if err != nil {
			return
		}
		cr, err := decodePlain(raw)
		if err != nil {
			return
		}
		if cr.user == "" {
			t.Fatalf("accepted PLAIN without a user: %q", in)
		}
		if strings.Contains(cr.user, "\x00") || strings.Contains(cr.pass, "\x00") || strings.Contains(cr.authzid, "\x00") {
			t.Fatalf("NUL leaked into a credential: %q", in)
		}
	})
}

func FuzzDecodeOAuth(f *testing.F) {
	f.Add("XOAUTH2", []byte("user=alice@example.org\x01auth=Bearer tok\x01\x01"))
	f.Add("OAUTHBEARER", []byte("n,a=alice@example.org,\x01host=x\x01port=993\x01auth=Bearer tok\x01\x01"))
	f.Add("OAUTHBEARER", []byte("n,,\x01auth=Bearer tok\x01\x01"))
	f.Fuzz(func(t *testing.T, mech string, raw []byte) {
		if mech != mechXOAuth2 && mech != mechOAuthBearer {
			return
		}
		cr, err := decodeOAuth(mech, raw)
		if err != nil {
			return
		}
		if cr.user == "" || strings.ContainsAny(cr.user, "\x00\r\n") {
			t.Fatalf("accepted an OAuth response with user %q", cr.user)
		}
		if string(cr.oauth) != string(raw) {
			t.Fatal("the relayed response differs from the client's")
		}
	})
}
