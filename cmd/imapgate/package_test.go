package main

import (
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/testenv"
)

// TestInstalledPackage runs the binary and the config file that the Debian
// package installed (scripts/package-test.sh sets IMAPGATE_INSTALLED to
// the binary's path after dpkg -i) against a real Dovecot, as the
// package's system user, and logs in through it. Without the variable it
// is skipped: it needs the package installed on this machine.
func TestInstalledPackage(t *testing.T) {
	bin := os.Getenv("IMAPGATE_INSTALLED")
	if bin == "" {
		t.Skip("IMAPGATE_INSTALLED is not set (scripts/package-test.sh sets it after installing the .deb)")
	}
	const conffile = "/etc/imapgate/imapgate.toml"
	if out, err := exec.Command(bin, "check", conffile).CombinedOutput(); err != nil {
		t.Fatalf("imapgate check %s: %v\n%s", conffile, err, out)
	}
	dc := testenv.StartDovecot(t, testenv.DovecotOptions{})

	// The installed file with its example backend pointed at Dovecot; the
	// listeners and the HTTP port come from flags, as an operator trying
	// it on a busy machine would do.
	b, err := os.ReadFile(conffile)
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	if !strings.Contains(text, `addr = "127.0.0.1:10143"`) {
		t.Fatalf("%s no longer has the example backend this test replaces", conffile)
	}
	text = strings.Replace(text, `addr = "127.0.0.1:10143"`, "addr = "+strconv.Quote(dc.Addr), 1)
	dir, err := os.MkdirTemp("", "imapgate-pkg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	cfgPath := filepath.Join(dir, "imapgate.toml")
	if err := os.WriteFile(cfgPath, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	imapAddr, httpAddr := freeAddr(t), freeAddr(t)
	cmd := exec.Command(bin, "-config", cfgPath, "-listen-tls", imapAddr, "-http", httpAddr)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET=")
	// As the package's user, when we may: proves the user exists and that
	// the binary needs nothing root has.
	if u, err := user.Lookup("imapgate"); err == nil && os.Geteuid() == 0 {
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
		cmd.Env = append(cmd.Env, "HOME=/var/lib/imapgate", "STATE_DIRECTORY=/var/lib/imapgate")
	} else if os.Geteuid() == 0 {
		t.Fatalf("the package's user imapgate does not exist: %v", err)
	}
	p := startOpsCmd(t, cmd)
	p.waitLog(t, 15*time.Second, `"msg":"http listening"`)
	waitHTTP(t, "http://"+httpAddr+"/readyz", 15*time.Second)

	c, err := opsDial(imapAddr, true)
	if err != nil {
		t.Fatalf("dial: %v\n%s", err, p.dump())
	}
	defer c.Close()
	if err := c.login("alice@example.org", dc.Users["alice@example.org"]); err != nil {
		t.Fatalf("login through the installed imapgate: %v\n%s", err, p.dump())
	}
	if _, err := c.cmd("SELECT INBOX"); err != nil {
		t.Fatalf("SELECT on Dovecot through the installed imapgate: %v", err)
	}
	if out, err := exec.Command(bin, "version").Output(); err != nil || !strings.HasPrefix(string(out), "imapgate ") {
		t.Errorf("imapgate version: %q, %v", out, err)
	} else if want := os.Getenv("IMAPGATE_VERSION"); want != "" && !strings.Contains(string(out), want) {
		t.Errorf("imapgate version = %q, want %s", out, want)
	}
	p.signal(syscall.SIGTERM)
	if code := p.wait(t, 30*time.Second); code != 0 {
		t.Errorf("SIGTERM: exit %d\n%s", code, p.dump())
	}
}
