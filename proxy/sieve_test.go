package proxy

import (
	"bufio"
	"encoding/base64"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imapgate/imapgate/internal/testenv"
)

// These tests run imapgate's ManageSieve front end (sieve.go) in front of
// a real Dovecot with dovecot-managesieved, with sieve-connect as the
// client and scripted conversations.

// TestSieveConnect uploads and lists a script with sieve-connect through
// imapgate (STARTTLS, AUTHENTICATE PLAIN), and checks it is on the
// user's backend.
func TestSieveConnect(t *testing.T) {
	testenv.Need(t, "sieve-connect")
	e := newProtoEnv(t, []string{"sieve"}, nil)
	host, port, _ := net.SplitHostPort(e.addrs["sieve"])
	dir := t.TempDir()
	script := filepath.Join(dir, "vacation.sieve")
	if err := os.WriteFile(script, []byte("require \"fileinto\";\nif header :contains \"subject\" \"x\" { fileinto \"INBOX\"; }\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) string {
		t.Helper()
		base := []string{"--server", host, "--port", port, "--user", "alice@example.org", "--passwordfd", "0",
			"--tlscafile", e.ca.CAFile, "--tlshostname", "localhost", "--authmech", "PLAIN"}
		cmd := exec.Command(testenv.Bin("sieve-connect"), append(base, args...)...)
		cmd.Stdin = strings.NewReader(e.d.Users["alice@example.org"] + "\n")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("sieve-connect %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	run("--upload", "--localsieve", script, "--remotesieve", "vac")
	if out := run("--list"); !strings.Contains(out, "vac") {
		t.Errorf("--list does not show the uploaded script:\n%s", out)
	}
	if _, err := os.Stat(filepath.Join(e.d.Dir, "mail", "alice@example.org", "sieve", "vac.sieve")); err != nil {
		t.Errorf("script not on the backend: %v", err)
	}
}

// TestSieveConversation: the greeting, STARTTLS with the capabilities
// re-sent, the three forms of AUTHENTICATE, and the bad-input classes.
func TestSieveConversation(t *testing.T) {
	e := newProtoEnv(t, []string{"sieve"}, func(o *Options) { o.Limits.MaxBadCommands = 3 })
	pass := e.d.Users["alice@example.org"]
	plain := base64.StdEncoding.EncodeToString([]byte("\x00alice@example.org\x00" + pass))
	startTLS := func(t *testing.T) *conv {
		c := dialConv(t, e.addrs["sieve"], nil)
		caps, st := c.SieveResponse()
		joined := strings.Join(caps, " ")
		if !strings.HasPrefix(st, "OK") || !strings.Contains(joined, `"STARTTLS"`) || !strings.Contains(joined, `"SASL" ""`) {
			t.Fatalf("cleartext greeting %q %q", caps, st)
		}
		// Injection after STARTTLS: the pipelined command is dropped.
		c.Send("STARTTLS\r\nAUTHENTICATE \"PLAIN\" \"" + plain + "\"\r\n")
		c.Expect("OK")
		c.Handshake(e.clientTLS)
		caps, st = c.SieveResponse()
		if joined := strings.Join(caps, " "); !strings.HasPrefix(st, "OK") || strings.Contains(joined, "STARTTLS") || !strings.Contains(joined, `"SASL" "PLAIN"`) {
			t.Fatalf("capabilities after STARTTLS %q %q", caps, st)
		}
		return c
	}
	loggedIn := func(t *testing.T, c *conv) {
		t.Helper()
		c.Expect("OK")
		c.Send("LISTSCRIPTS\r\n")
		_, st := c.SieveResponse()
		if !strings.HasPrefix(st, "OK") {
			t.Fatalf("LISTSCRIPTS after login: %q", st)
		}
		c.Send("LOGOUT\r\n")
		c.Expect("OK")
	}
	t.Run("quoted initial response", func(t *testing.T) {
		c := startTLS(t)
		c.Send("AUTHENTICATE \"PLAIN\" \"" + plain + "\"\r\n")
		loggedIn(t, c)
	})
	t.Run("literal initial response", func(t *testing.T) {
		c := startTLS(t)
		c.Send(fmt.Sprintf("AUTHENTICATE \"PLAIN\" {%d+}\r\n%s\r\n", len(plain), plain))
		loggedIn(t, c)
	})
	t.Run("continuation, cancel, then noop and login", func(t *testing.T) {
		c := startTLS(t)
		c.Send("AUTHENTICATE \"PLAIN\"\r\n")
		c.Expect(`""`)
		c.Send("*\r\n")
		c.Expect("NO")
		c.Send("NOOP \"tag1\"\r\n")
		c.Expect(`OK (TAG "tag1")`)
		c.Send("AUTHENTICATE \"PLAIN\"\r\n")
		c.Expect(`""`)
		c.Send("\"" + plain + "\"\r\n")
		loggedIn(t, c)
	})
	t.Run("cleartext login refused", func(t *testing.T) {
		c := dialConv(t, e.addrs["sieve"], nil)
		c.SieveResponse()
		c.Send("AUTHENTICATE \"PLAIN\" \"" + plain + "\"\r\n")
		c.Expect("NO (ENCRYPT-NEEDED)")
	})
	for _, tc := range []struct{ name, send, want string }{
		{"long line", strings.Repeat("A", 10<<10) + "\r\n", `BYE "Line too long"`},
		{"NUL", "NOOP \"a\x00\"\r\n", `BYE "NUL in command"`},
		{"huge literal", "AUTHENTICATE \"PLAIN\" {999999999+}\r\n", `BYE "Literal too large"`},
		{"IMAP on the ManageSieve port", "a1 LOGIN alice pass\r\n", `BYE "This is a ManageSieve server"`},
		{"POP3 on the ManageSieve port", "USER alice\r\n", `BYE "This is a ManageSieve server"`},
		{"TLS on the cleartext port", "\x16\x03\x01\x00\x05hello", `BYE "This port speaks cleartext`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dialConv(t, e.addrs["sieve"], nil)
			c.SieveResponse()
			c.Send(tc.send)
			c.Expect(tc.want)
			c.ExpectClosed("")
		})
	}
	t.Run("too many bad commands", func(t *testing.T) {
		c := dialConv(t, e.addrs["sieve"], nil)
		c.SieveResponse()
		c.Send("PUTSCRIPT \"a\" \"b\"\r\n\"unterminated\r\nHAVESPACE\r\n")
		c.Expect("NO")
		c.Expect("NO")
		c.Expect("BYE")
		c.ExpectClosed("")
	})
	t.Run("XCLIENT gives Dovecot the client's address", func(t *testing.T) {
		c := testenv.DialConvFrom(t, e.addrs["sieve"], net.ParseIP("127.0.0.4"), nil)
		c.SieveStartTLS(e.clientTLS)
		c.Send("AUTHENTICATE \"PLAIN\" \"" + plain + "\"\r\nLOGOUT\r\n")
		c.Expect("OK")
		c.Expect("OK")
		testenv.WaitFor(t, func() bool { return strings.Contains(e.d.Log(), "rip=127.0.0.4") })
	})
	t.Run("eviction closes the session", func(t *testing.T) {
		c := startTLS(t)
		c.Send("AUTHENTICATE \"PLAIN\" \"" + plain + "\"\r\n")
		c.Expect("OK")
		testenv.WaitFor(t, func() bool { return len(e.srv.Sessions("alice@example.org", "")) == 1 })
		if n := e.srv.EvictUser("alice@example.org", ""); n != 1 {
			t.Fatalf("EvictUser closed %d sessions, want 1", n)
		}
		c.Expect(`BYE (TRYLATER) "Your mailbox moved`)
		c.ExpectClosed("")
	})
	// Last: Dovecot penalises this client address for a while after it.
	t.Run("wrong password", func(t *testing.T) {
		c := startTLS(t)
		bad := base64.StdEncoding.EncodeToString([]byte("\x00alice@example.org\x00wrong"))
		c.Send("AUTHENTICATE \"PLAIN\" \"" + bad + "\"\r\n")
		c.Expect(`NO "Authentication failed."`)
	})
}

func TestReadSieveCommand(t *testing.T) {
	lim := readLimits{maxLine: 1024, maxLiteral: 100, maxCommand: 400, maxArgs: 8}
	for _, tc := range []struct {
		in   string
		want string // words joined by |, quoted ones in ""
		err  string
	}{
		{"authenticate \"PLAIN\" \"abc\"\r\n", `AUTHENTICATE|"PLAIN"|"abc"`, ""},
		{"AUTHENTICATE \"PLAIN\" {3+}\r\nabc\r\n", `AUTHENTICATE|"PLAIN"|"abc"`, ""},
		{"AUTHENTICATE \"PLAIN\" {3}\r\nabc\r\n", `AUTHENTICATE|"PLAIN"|"abc"`, ""},
		{"NOOP \"a\\\"b\\\\c\"\r\n", `NOOP|"a"b\c"`, ""},
		{"\r\n", ``, ""},
		{"NOOP \"open\r\n", "", "Unterminated"},
		{"X {101+}\r\n", "", "Literal too large"},
		{"X {1a}\r\n", "", "Bad literal size"},
		{"X {3} y\r\n", "", "Bad literal"},
		{"a b c d e f g h i j\r\n", "", "Too many arguments"},
		{"X\x01Y\r\n", "", "Bad character"},
	} {
		args, err := readSieveCommand(bufio.NewReaderSize(strings.NewReader(tc.in), 1024), lim)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: %v, want %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", tc.in, err)
			continue
		}
		var words []string
		for _, a := range args {
			if a.quoted {
				words = append(words, `"`+a.val+`"`)
			} else {
				words = append(words, a.val)
			}
		}
		if got := strings.Join(words, "|"); got != tc.want {
			t.Errorf("%q = %s, want %s", tc.in, got, tc.want)
		}
	}
}

func FuzzReadSieveCommand(f *testing.F) {
	f.Add([]byte("AUTHENTICATE \"PLAIN\" {3+}\r\nabc\r\n"))
	f.Add([]byte("NOOP \"a\\\"\"\r\n"))
	f.Add([]byte("X {99999999999}\r\n"))
	lim := readLimits{maxLine: 256, maxLiteral: 64, maxCommand: 512, maxArgs: 8}
	f.Fuzz(func(t *testing.T, in []byte) {
		args, err := readSieveCommand(bufio.NewReaderSize(strings.NewReader(string(in)), 256), lim)
		if err != nil {
			return
		}
		if len(args) > lim.maxArgs+1 {
			t.Fatalf("%d args over the limit", len(args))
		}
		for _, a := range args {
			if len(a.val) > lim.maxCommand || strings.ContainsRune(a.val, 0) {
				t.Fatalf("arg %q escapes the limits", a.val)
			}
		}
	})
}
