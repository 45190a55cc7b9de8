package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Postfix is a Postfix MTA started by StartPostfix with its own
// configuration and queue in a temporary directory.
type Postfix struct {
	Dir  string // conf/, queue/, data/, maillog
	conf string
}

// PostfixOptions configure StartPostfix.
type PostfixOptions struct {
	// Transport is where every message goes, e.g.
	// "lmtp:inet:127.0.0.1:2400" (default_transport). Required.
	Transport string
}

// StartPostfix writes a config that delivers everything to
// opts.Transport, with no listener of its own (mail is injected with
// Sendmail), and starts Postfix as root. t.Cleanup stops it.
func StartPostfix(t testing.TB, opts PostfixOptions) *Postfix {
	t.Helper()
	Need(t, "postfix", "sendmail")
	if os.Geteuid() != 0 {
		t.Skip("testenv: Postfix needs root")
	}
	dir, err := os.MkdirTemp("", "imapgate-postfix-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	p := &Postfix{Dir: dir, conf: filepath.Join(dir, "conf")}
	// Postfix's own processes run as the postfix user and must traverse
	// the directory.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"conf", "queue", "data"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command("chown", "postfix", filepath.Join(dir, "data")).CombinedOutput(); err != nil {
		t.Fatalf("testenv: chown: %v %s", err, out)
	}
	master, err := os.ReadFile("/etc/postfix/master.cf")
	if err != nil {
		t.Fatalf("testenv: postfix: %v", err)
	}
	var mc strings.Builder
	for _, l := range strings.SplitAfter(string(master), "\n") {
		if f := strings.Fields(l); len(f) > 1 && f[1] == "inet" {
			continue // no smtpd on port 25
		}
		mc.WriteString(l)
	}
	main := fmt.Sprintf(`compatibility_level = 3.6
queue_directory = %[1]s/queue
data_directory = %[1]s/data
myhostname = mta.test
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
default_transport = %[2]s
alias_maps =
alias_database =
maillog_file_prefixes = %[1]s
maillog_file = %[1]s/maillog
smtputf8_enable = no
lmtp_connection_cache_on_demand = no
`, dir, opts.Transport)
	for name, body := range map[string]string{"main.cf": main, "master.cf": mc.String()} {
		if err := os.WriteFile(filepath.Join(p.conf, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command(Bin("postfix"), "-c", p.conf, "start").CombinedOutput(); err != nil {
		t.Fatalf("testenv: postfix start: %v\n%s\n%s", err, out, p.Log())
	}
	t.Cleanup(func() { exec.Command(Bin("postfix"), "-c", p.conf, "stop").Run() })
	return p
}

// Sendmail injects a message for the recipients.
func (p *Postfix) Sendmail(t testing.TB, from, msg string, to ...string) {
	t.Helper()
	cmd := exec.Command(Bin("sendmail"), append([]string{"-C", p.conf, "-f", from, "--"}, to...)...)
	cmd.Stdin = strings.NewReader(msg)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("testenv: sendmail: %v\n%s", err, out)
	}
}

// Log returns Postfix's log.
func (p *Postfix) Log() string { return readFile(filepath.Join(p.Dir, "maillog")) }
