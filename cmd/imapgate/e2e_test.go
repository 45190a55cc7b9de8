package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/imapgate/imapgate/internal/testenv"
)

// buildBinary builds imapgate once per test binary run.
var buildOnce = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "imapgate-e2e-")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "imapgate")
	out, err := exec.Command("go", "build", "-race", "-o", bin, ".").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go build: %v\n%s", err, out)
	}
	return bin, nil
})

func imapgateBinary(t *testing.T) string {
	t.Helper()
	bin, err := buildOnce()
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// proc is a running imapgate binary with its JSON log.
type proc struct {
	cmd  *exec.Cmd
	mu   sync.Mutex
	logs []map[string]any
	seen chan struct{} // signalled on every log line
	done chan struct{}
	err  error
}

func startBinary(t *testing.T, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(imapgateBinary(t), args...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, seen: make(chan struct{}, 1), done: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go p.readLog(stderr)
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-p.done
	})
	return p
}

func (p *proc) readLog(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) != nil {
			m = map[string]any{"msg": sc.Text()}
		}
		p.mu.Lock()
		p.logs = append(p.logs, m)
		p.mu.Unlock()
		select {
		case p.seen <- struct{}{}:
		default:
		}
	}
	p.err = p.cmd.Wait()
	close(p.done)
}

// waitLog waits for a log line matching pred, or the process to exit.
func (p *proc) waitLog(t *testing.T, what string, pred func(map[string]any) bool) map[string]any {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		p.mu.Lock()
		for _, m := range p.logs {
			if pred(m) {
				p.mu.Unlock()
				return m
			}
		}
		p.mu.Unlock()
		select {
		case <-p.seen:
		case <-p.done:
			t.Fatalf("imapgate exited (%v) before logging %s; log:\n%s", p.err, what, p.dump())
		case <-timeout:
			t.Fatalf("no log line %s within 30s; log:\n%s", what, p.dump())
		}
	}
}

func (p *proc) dump() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var b strings.Builder
	for _, m := range p.logs {
		j, _ := json.Marshal(m)
		b.Write(j)
		b.WriteByte('\n')
	}
	return b.String()
}

func freeAddr(t *testing.T) string {
	return fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
}

// TestBinaryWithConfigFile starts the built binary with a config file in
// front of a real Dovecot and talks to it as a mail client would.
func TestBinaryWithConfigFile(t *testing.T) {
	testenv.Need(t, "dovecot")
	d := testenv.StartDovecot(t, testenv.DovecotOptions{TrustedNetworks: "127.0.0.0/8"})
	ca := testenv.NewTestCA(t)
	tlsAddr, startTLSAddr, httpAddr := freeAddr(t), freeAddr(t), freeAddr(t)
	conf := filepath.Join(t.TempDir(), "imapgate.toml")
	os.WriteFile(conf, []byte(fmt.Sprintf(`
[log]
format = "json"

[[listen]]
addr = %q
mode = "tls"
name = "imaps"

[[listen]]
addr = %q
mode = "starttls"
name = "imap"

[tls]
certificates = [{ cert = %q, key = %q }]

[backends.dovecot]
addr = %q
security = "starttls"
ca_file = %q
server_name = "localhost"

[routing]
default = ["dovecot"]

[http]
addr = %q

[shutdown]
drain_window = "2s"
grace = "20s"
`, tlsAddr, startTLSAddr, ca.ServerCertFile, ca.ServerKeyFile, d.Addr, d.CA.CAFile, httpAddr)), 0o600)

	out, err := exec.Command(imapgateBinary(t), "check", conf).CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("OK")) {
		t.Fatalf("imapgate check: %v\n%s", err, out)
	}

	p := startBinary(t, "-config", conf)
	for _, name := range []string{"imaps", "imap"} {
		p.waitLog(t, "listening on "+name, func(m map[string]any) bool { return m["msg"] == "listening" && m["name"] == name })
	}
	clientTLS := &tls.Config{RootCAs: ca.Pool, ServerName: "localhost"}
	for user, pass := range d.Users {
		for _, starttls := range []bool{false, true} {
			var c *imapclient.Client
			if starttls {
				c, err = imapclient.DialStartTLS(startTLSAddr, &imapclient.Options{TLSConfig: clientTLS})
			} else {
				c, err = imapclient.DialTLS(tlsAddr, &imapclient.Options{TLSConfig: clientTLS})
			}
			if err != nil {
				t.Fatal(err)
			}
			if err := c.Login(user, pass).Wait(); err != nil {
				t.Fatalf("login %s (starttls=%v): %v", user, starttls, err)
			}
			if _, err := c.Select("INBOX", nil).Wait(); err != nil {
				t.Fatal(err)
			}
			if err := c.Logout().Wait(); err != nil {
				t.Fatal(err)
			}
			c.Close()
		}
	}
	// One summary line per session, with the user and no password.
	p.waitLog(t, "a session end for carol", func(m map[string]any) bool {
		return m["msg"] == "session end" && m["user"] == "carol" && m["backend"] == "dovecot"
	})
	if dump := p.dump(); strings.Contains(dump, d.Users["carol"]) || strings.Contains(dump, d.Users["alice@example.org"]) {
		t.Errorf("a password reached the log")
	}

	// A session that stays open through SIGTERM: the process drains and
	// exits 0 once the client logs out.
	c, err := imapclient.DialTLS(tlsAddr, &imapclient.Options{TLSConfig: clientTLS})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Login("alice@example.org", d.Users["alice@example.org"]).Wait(); err != nil {
		t.Fatal(err)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	p.waitLog(t, "shutting down", func(m map[string]any) bool { return m["msg"] == "shutting down" })
	if _, err := net.DialTimeout("tcp", tlsAddr, time.Second); err == nil {
		// Listeners close right after the log line; give it a moment.
		deadline := time.Now().Add(5 * time.Second)
		for err == nil && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
			var cc net.Conn
			cc, err = net.DialTimeout("tcp", tlsAddr, time.Second)
			if cc != nil {
				cc.Close()
			}
		}
		if err == nil {
			t.Error("still accepting after SIGTERM")
		}
	}
	if err := c.Noop().Wait(); err != nil {
		t.Fatalf("a live session was cut at SIGTERM: %v", err)
	}
	if err := c.Logout().Wait(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.done:
		if p.err != nil {
			t.Fatalf("imapgate exited with %v after SIGTERM", p.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("imapgate did not exit after its last session ended; log:\n%s", p.dump())
	}
}

func TestCheckRejectsBrokenConfig(t *testing.T) {
	bin := imapgateBinary(t)
	dir := t.TempDir()
	for name, text := range map[string]string{
		"unknown key":   "[[listen]]\naddr = \"127.0.0.1:993\"\nmdoe = \"tls\"\n",
		"bad mode":      "[[listen]]\naddr = \"127.0.0.1:993\"\nmode = \"ssl\"\n[backends.a]\naddr = \"127.0.0.1:143\"\n",
		"no backends":   "[[listen]]\naddr = \"127.0.0.1:993\"\n",
		"unknown pin":   "[[listen]]\naddr = \"127.0.0.1:993\"\n[backends.a]\naddr = \"127.0.0.1:143\"\n[routing.users]\n\"x@y\" = \"b\"\n",
		"not toml":      "this is = = not toml",
		"exposed admin": "[[listen]]\naddr = \"127.0.0.1:993\"\n[backends.a]\naddr = \"127.0.0.1:143\"\n[http]\naddr = \"0.0.0.0:8080\"\n",
		"bad security":  "[[listen]]\naddr = \"127.0.0.1:993\"\n[backends.a]\naddr = \"127.0.0.1:143\"\nsecurity = \"ssl3\"\n",
	} {
		t.Run(name, func(t *testing.T) {
			f := filepath.Join(dir, strings.ReplaceAll(name, " ", "_")+".toml")
			os.WriteFile(f, []byte(text), 0o600)
			out, err := exec.Command(bin, "check", f).CombinedOutput()
			if err == nil {
				t.Fatalf("check accepted a broken config:\n%s", out)
			}
			if !bytes.Contains(out, []byte("invalid")) {
				t.Errorf("check output does not say why: %s", out)
			}
		})
	}
}

// TestBinaryFlagsOnly runs the binary in front of one backend with flags
// alone (no config file), as the README shows: once trusting the
// backend's CA, once trusting another CA, which must refuse the backend.
func TestBinaryFlagsOnly(t *testing.T) {
	testenv.Need(t, "dovecot")
	d := testenv.StartDovecot(t, testenv.DovecotOptions{TrustedNetworks: "127.0.0.0/8"})
	ca := testenv.NewTestCA(t)
	for _, tt := range []struct {
		name, backendCA string
		ok              bool
	}{
		{"backend CA", d.CA.CAFile, true},
		{"another CA", ca.CAFile, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tlsAddr := freeAddr(t)
			p := startBinary(t, "-backend", d.TLSAddr, "-backend-security", "tls", "-backend-ca", tt.backendCA,
				"-listen-tls", tlsAddr, "-cert", ca.ServerCertFile, "-key", ca.ServerKeyFile, "-http", "off", "-log-format", "json")
			p.waitLog(t, "listening", func(m map[string]any) bool { return m["msg"] == "listening" })
			c, err := imapclient.DialTLS(tlsAddr, &imapclient.Options{TLSConfig: &tls.Config{RootCAs: ca.Pool, ServerName: "localhost"}})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			err = c.Login("alice@example.org", d.Users["alice@example.org"]).Wait()
			if tt.ok {
				if err != nil {
					t.Fatalf("login: %v", err)
				}
				if _, err := c.Select("INBOX", nil).Wait(); err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), "UNAVAILABLE") {
				t.Fatalf("login through an untrusted backend: %v, want NO [UNAVAILABLE]", err)
			}
			p.waitLog(t, "the backend's certificate refused", func(m map[string]any) bool {
				e, _ := m["error"].(string)
				return m["msg"] == "login failed: backend unavailable" && strings.Contains(e, "certificate")
			})
		})
	}
}

// TestBinaryDemo runs the embedded demo (on ports of the test's choosing)
// and reads which demo backend a user landed on.
func TestBinaryDemo(t *testing.T) {
	tlsAddr, stAddr := freeAddr(t), freeAddr(t)
	p := startBinary(t, "-demo", "-listen-tls", tlsAddr, "-listen-starttls", stAddr, "-http", "off", "-log-format", "json")
	p.waitLog(t, "listening", func(m map[string]any) bool { return m["msg"] == "listening" && m["addr"] == stAddr })
	c, err := imapclient.DialStartTLS(stAddr, &imapclient.Options{TLSConfig: &tls.Config{InsecureSkipVerify: true}}) // the demo's certificate is self-signed
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Login("dave@example.net", "davepass").Wait(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Select("INBOX", nil).Wait(); err != nil {
		t.Fatal(err)
	}
	msgs, err := c.Fetch(imap.SeqSetNum(1), &imap.FetchOptions{Envelope: true}).Collect()
	if err != nil || len(msgs) != 1 {
		t.Fatalf("FETCH: %v (%d messages)", err, len(msgs))
	}
	// dave is pinned to demo2 in the embedded configuration.
	if got := msgs[0].Envelope.Subject; got != "Hello from backend demo2" {
		t.Errorf("dave reached %q, want demo2", got)
	}
	if err := c.Logout().Wait(); err != nil {
		t.Fatal(err)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		if p.err != nil {
			t.Fatalf("demo exited with %v", p.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("the demo did not exit after SIGTERM; log:\n%s", p.dump())
	}
}

// TestBinaryConsulUnreachable: with the Consul router and no Consul, the
// binary says so and exits non-zero instead of serving without a view.
func TestBinaryConsulUnreachable(t *testing.T) {
	consulAddr := freeAddr(t) // nothing listens there
	conf := filepath.Join(t.TempDir(), "imapgate.toml")
	os.WriteFile(conf, []byte(fmt.Sprintf(`
[log]
format = "json"

[[listen]]
addr = %q

[routing]
router = "consul"

[consul]
address = %q
service = "imap"

[http]
addr = "off"
`, freeAddr(t), consulAddr)), 0o600)
	p := startBinary(t, "-config", conf)
	select {
	case <-p.done:
	case <-time.After(60 * time.Second):
		t.Fatalf("imapgate kept running without Consul; log:\n%s", p.dump())
	}
	var ee *exec.ExitError
	if !errors.As(p.err, &ee) || ee.ExitCode() == 0 {
		t.Fatalf("exit: %v, want a non-zero exit code", p.err)
	}
	if dump := p.dump(); !strings.Contains(dump, "consul") {
		t.Errorf("the log does not say Consul is the problem:\n%s", dump)
	}
}
