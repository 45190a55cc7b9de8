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
	return &cmdReader{br: bufio.NewReaderSize(strings.NewReader(in), lim.maxLine), cont: c, lim: lim}, c
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
		{"literal-", "a LOGIN alice {4-}\r\npass\r\n", "a", "LOGIN", []token{atom("alice"), lit("pass")}, 0},
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
		{"line too long", "a LOGIN " + long + "\r\n", "", "TOOBIG", true, nil, 0},
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

func FuzzReadCommand(f *testing.F) {
	for _, s := range []string{
		"a LOGIN alice secret\r\n",
		"a LOGIN {5}\r\nalice {3+}\r\np w\r\n",
		`a ID ("name" "x" "version" NIL)` + "\r\n",
		"a AUTHENTICATE PLAIN =\r\n",
		`a LOGIN "a\"b" "c\\d"` + "\r\n",
		"GET / HTTP/1.1\r\n",
		"a ID (\"k\" {2}\r\nvv)\r\n",
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
