package main

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/testenv"
)

// TestBinaryAllProtocols: the binary with lmtp, pop3 and sieve listeners
// from its config file delivers with swaks and serves the message over
// POP3, and a SIGTERM still exits cleanly.
func TestBinaryAllProtocols(t *testing.T) {
	testenv.Need(t, "dovecot", "swaks")
	d := testenv.StartDovecot(t, testenv.DovecotOptions{TrustedNetworks: "127.0.0.0/8", Protocols: []string{"pop3", "lmtp", "sieve"}})
	ca := testenv.NewTestCA(t)
	imaps, pop3s, sieve, lmtp, httpAddr := freeAddr(t), freeAddr(t), freeAddr(t), freeAddr(t), freeAddr(t)
	conf := filepath.Join(t.TempDir(), "imapgate.toml")
	os.WriteFile(conf, []byte(fmt.Sprintf(`
[log]
format = "json"

[[listen]]
addr = %q
name = "imaps"

[[listen]]
addr = %q
protocol = "pop3"
name = "pop3s"

[[listen]]
addr = %q
protocol = "sieve"
mode = "starttls"
name = "sieve"

[[listen]]
addr = %q
protocol = "lmtp"
name = "lmtp"
allow_from = ["127.0.0.0/8"]

[tls]
certificates = [{ cert = %q, key = %q }]

[backends.dovecot]
addr = %q
pop3_addr = %q
sieve_addr = %q
lmtp_addr = %q

[routing]
default = ["dovecot"]

[http]
addr = %q

[shutdown]
drain_window = "1s"
grace = "5s"
`, imaps, pop3s, sieve, lmtp, ca.ServerCertFile, ca.ServerKeyFile, d.Addr, d.POP3Addr, d.SieveAddr, d.LMTPAddr, httpAddr)), 0o600)
	if out, err := exec.Command(imapgateBinary(t), "check", conf).CombinedOutput(); err != nil {
		t.Fatalf("imapgate check: %v\n%s", err, out)
	}
	p := startBinary(t, "-config", conf)
	for _, name := range []string{"imaps", "pop3s", "sieve", "lmtp"} {
		p.waitLog(t, "listening on "+name, func(m map[string]any) bool { return m["msg"] == "listening" && m["name"] == name })
	}
	out, err := exec.Command(testenv.Bin("swaks"), "--protocol", "LMTP", "--server", lmtp,
		"--from", "s@example.com", "--to", "bob@example.org", "--header", "Subject: e2e", "--body", "hi").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "<-  250 2.0.0 <bob@example.org>") {
		t.Fatalf("swaks: %v\n%s\n%s", err, out, p.dump())
	}
	c, err := tls.Dial("tcp", pop3s, &tls.Config{RootCAs: ca.Pool, ServerName: "localhost"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	expect := func(prefix string) {
		t.Helper()
		l, err := br.ReadString('\n')
		if err != nil || !strings.HasPrefix(l, prefix) {
			t.Fatalf("got %q (%v), want %q\n%s", l, err, prefix, p.dump())
		}
	}
	expect("+OK")
	fmt.Fprintf(c, "USER bob@example.org\r\nPASS %s\r\nSTAT\r\n", d.Users["bob@example.org"])
	expect("+OK")
	expect("+OK")
	expect("+OK 1 ")
	fmt.Fprintf(c, "QUIT\r\n")
	expect("+OK")
	sc, err := net.Dial("tcp", sieve)
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	sc.SetDeadline(time.Now().Add(10 * time.Second))
	if l, err := bufio.NewReader(sc).ReadString('\n'); err != nil || !strings.HasPrefix(l, `"IMPLEMENTATION" "imapgate"`) {
		t.Fatalf("ManageSieve greeting %q %v", l, err)
	}
	sc.Close()
	resp, err := http.Get("http://" + httpAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if want := `imapgate_lmtp_recipients_total{backend="dovecot",result="ok",stage="data"} 1`; !strings.Contains(string(metrics), want) {
		t.Errorf("/metrics lacks %s", want)
	}
	// An MTA's idle cached connection does not hold the shutdown.
	mta, err := net.Dial("tcp", lmtp)
	if err != nil {
		t.Fatal(err)
	}
	defer mta.Close()
	mbr := bufio.NewReader(mta)
	if l, _ := mbr.ReadString('\n'); !strings.HasPrefix(l, "220 ") {
		t.Fatalf("LMTP greeting %q", l)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		t.Fatalf("imapgate did not exit after SIGTERM\n%s", p.dump())
	}
	if p.err != nil {
		t.Errorf("exit after SIGTERM: %v\n%s", p.err, p.dump())
	}
	mta.SetDeadline(time.Now().Add(5 * time.Second))
	if l, _ := mbr.ReadString('\n'); !strings.HasPrefix(l, "421 ") {
		t.Errorf("the idle MTA connection got %q, want 421", l)
	}
}
