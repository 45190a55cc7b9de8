package testenv

import (
	"bufio"
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// DovecotOptions configures StartDovecot. The zero value is a usable
// backend with DefaultUsers.
type DovecotOptions struct {
	// Users maps user name to password; nil means DefaultUsers. Dovecot
	// lowercases user names at login (auth_username_format = %Lu), so names
	// are stored lowercased and log in in any case. Names must not contain
	// ':', '/' or control characters; passwords may contain anything.
	Users map[string]string
	// TrustedNetworks is login_trusted_networks, e.g. "127.0.0.0/8"; ""
	// means none. Connections from these networks may forward the client's
	// address (ID x-originating-ip) and skip the auth failure delay.
	TrustedNetworks string
	// Protocols are the services besides IMAP to run, each on its own
	// free port: any of "pop3" (cleartext with STLS, and implicit TLS),
	// "lmtp" (cleartext) and "sieve" (ManageSieve with STARTTLS). They need
	// the dovecot-pop3d, dovecot-lmtpd and dovecot-managesieved packages.
	Protocols []string
	// Extra is appended verbatim to the generated dovecot.conf: a later
	// setting overrides an earlier one, and extra passdb blocks are tried
	// after the built-in passwd-file.
	Extra string
}

// DefaultUsers are the users a Dovecot has unless DovecotOptions.Users is
// set. Between them they cover what a proxy most often gets wrong when it
// relays a login: an '@' in the name, spaces (quoting), quote and
// backslash (escaping), and non-ASCII (literals, UTF-8).
var DefaultUsers = map[string]string{
	"alice@example.org": "alicepass",
	"bob@example.org":   "bob pass with spaces",
	"carol":             "pässwörd-ünïcode",
	"dave@example.net":  `quote"and\backslash`,
}

// Dovecot is a running (or stopped) Dovecot started by StartDovecot.
type Dovecot struct {
	Addr    string            // "127.0.0.1:PORT": cleartext IMAP with STARTTLS available
	TLSAddr string            // "127.0.0.1:PORT": implicit TLS
	CA      *TestCA           // signed Dovecot's certificate (server name "localhost")
	Dir     string            // base of everything: dovecot.conf, run/, mail/, dovecot.log
	Users   map[string]string // the users it knows, as passed in (not lowercased)

	// The other protocols' addresses, "" unless DovecotOptions.Protocols
	// asked for them.
	POP3Addr, POP3TLSAddr, LMTPAddr, SieveAddr string

	conf string

	mu   sync.Mutex
	proc *process // nil while stopped
}

// dovecotStartTimeout bounds how long StartDovecot waits for the greeting
// on both ports; a cold start takes well under a second.
const dovecotStartTimeout = 15 * time.Second

// StartDovecot writes a standalone config into a fresh directory and starts
// Dovecot on two free loopback ports. It returns once both ports answer with
// a greeting; t.Cleanup stops it and removes the directory.
//
// The instance shares nothing with a system Dovecot (no /etc/dovecot, no
// /run/dovecot), so any number can run at once.
func StartDovecot(t testing.TB, opts DovecotOptions) *Dovecot {
	t.Helper()
	Need(t, "dovecot")

	users := opts.Users
	if users == nil {
		users = DefaultUsers
	}
	// /tmp rather than t.TempDir: Dovecot's unprivileged processes must
	// traverse it (t.TempDir's parent is 0700), and unix socket paths under
	// base_dir must stay short of the 108-byte limit.
	dir, err := os.MkdirTemp("", "imapgate-dovecot-")
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	for _, p := range opts.Protocols {
		switch p {
		case "pop3":
			Need(t, "/usr/lib/dovecot/pop3")
		case "lmtp":
			Need(t, "/usr/lib/dovecot/lmtp")
		case "sieve":
			Need(t, "/usr/lib/dovecot/managesieve")
		default:
			t.Fatalf("testenv: unknown Dovecot protocol %q", p)
		}
	}
	ports, err := freePorts(2+4, false)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	d := &Dovecot{
		Addr:    net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0])),
		TLSAddr: net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[1])),
		CA:      NewTestCA(t),
		Dir:     dir,
		Users:   maps.Clone(users),
		conf:    filepath.Join(dir, "dovecot.conf"),
	}
	for _, p := range opts.Protocols {
		at := func(i int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[i])) }
		switch p {
		case "pop3":
			d.POP3Addr, d.POP3TLSAddr = at(2), at(3)
		case "lmtp":
			d.LMTPAddr = at(4)
		case "sieve":
			d.SieveAddr = at(5)
		}
	}
	if err := d.writeConfig(opts, ports); err != nil {
		t.Fatalf("testenv: dovecot config: %v", err)
	}
	t.Cleanup(func() { d.Stop(t) })
	d.Start(t)
	return d
}

// Start starts Dovecot (again) on the same ports with the same config and
// mail, and returns when both ports greet. Starting a running Dovecot is a
// test bug and fails the test.
func (d *Dovecot) Start(t testing.TB) {
	t.Helper()
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.proc != nil {
		t.Fatalf("testenv: Dovecot in %s is already running", d.Dir)
	}
	out, err := os.OpenFile(filepath.Join(d.Dir, "stderr.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	defer out.Close()
	// Go hands children the soft fd limit it found at startup, which may be
	// 1024; a thousand test sessions need more, so raise it to the hard
	// limit on the way in. exec keeps Dovecot the process group leader.
	cmd := exec.Command("/bin/sh", "-c", `ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$@"`,
		"sh", Bin("dovecot"), "-F", "-c", d.conf)
	cmd.Stdout, cmd.Stderr = out, out
	start := time.Now()
	p, err := startProcess(cmd)
	if err != nil {
		t.Fatalf("testenv: start dovecot: %v", err)
	}
	d.proc = p
	err = waitFor(p, dovecotStartTimeout, func() error {
		if err := greeting(d.Addr, nil); err != nil {
			return err
		}
		if err := d.otherGreetings(); err != nil {
			return err
		}
		return greeting(d.TLSAddr, &tls.Config{RootCAs: d.CA.Pool, ServerName: "localhost"})
	})
	if err != nil {
		d.stopLocked()
		t.Fatalf("testenv: dovecot in %s did not start: %v\n%s", d.Dir, err, d.Log())
	}
	t.Logf("testenv: dovecot on %s (TLS %s) ready in %v", d.Addr, d.TLSAddr, time.Since(start).Round(time.Millisecond))
}

// Stop stops Dovecot and waits until its master and every child process are
// gone, so the ports are free. Stopping a stopped Dovecot does nothing.
func (d *Dovecot) Stop(t testing.TB) {
	t.Helper()
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.stopLocked(); err != nil {
		t.Errorf("testenv: stop dovecot in %s: %v", d.Dir, err)
	}
}

func (d *Dovecot) stopLocked() error {
	if d.proc == nil {
		return nil
	}
	p := d.proc
	d.proc = nil
	// SIGTERM makes the master kill its children and exit; 10 s is far
	// more than it needs, after that the group gets SIGKILL.
	return p.stop(syscall.SIGTERM, 10*time.Second)
}

// Log returns Dovecot's log file, preceded by anything it printed to stderr
// (config errors are reported there, before the log file is open).
func (d *Dovecot) Log() string {
	var b strings.Builder
	if s, err := os.ReadFile(filepath.Join(d.Dir, "stderr.log")); err == nil && len(s) > 0 {
		b.WriteString("--- stderr ---\n")
		b.Write(s)
		b.WriteString("--- dovecot.log ---\n")
	}
	b.WriteString(readFile(filepath.Join(d.Dir, "dovecot.log")))
	return b.String()
}

// Doveadm runs doveadm against this instance and returns its stdout. A
// non-zero exit fails the test with doveadm's stderr.
func (d *Dovecot) Doveadm(t testing.TB, args ...string) string {
	t.Helper()
	Need(t, "doveadm")
	cmd := exec.Command(Bin("doveadm"), append([]string{"-c", d.conf}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("testenv: doveadm %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return string(out)
}

// greeting connects to addr (over TLS if conf is set) and reads the
// untagged OK greeting.
func greeting(addr string, conf *tls.Config) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(3 * time.Second)); err != nil {
		return err
	}
	if conf != nil {
		tc := tls.Client(c, conf)
		if err := tc.Handshake(); err != nil {
			return fmt.Errorf("%s: TLS: %w", addr, err)
		}
		c = tc
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("%s: reading greeting: %w", addr, err)
	}
	if !strings.HasPrefix(line, "* OK") {
		return fmt.Errorf("%s: unexpected greeting %q", addr, line)
	}
	return nil
}

// mailOwner is the uid and gid mail is stored as, and the names of the
// accounts Dovecot's own processes run as.
type mailOwner struct {
	uid, gid                int
	internalUser, loginUser string
	internalGroup           string
	rootless                bool
}

// owner picks who owns the mail. Dovecot refuses to access mail as root,
// so as root the mail belongs to nobody (any unprivileged account would
// do; nobody exists everywhere) and Dovecot's own processes use the
// dovecot and dovenull accounts the Debian package creates. Not as root,
// everything runs as the current user (Dovecot's "rootless" mode).
func owner() (mailOwner, error) {
	if os.Geteuid() != 0 {
		u, err := user.Current()
		if err != nil {
			return mailOwner{}, err
		}
		g, err := user.LookupGroupId(u.Gid)
		if err != nil {
			return mailOwner{}, err
		}
		return mailOwner{
			uid: os.Getuid(), gid: os.Getgid(),
			internalUser: u.Username, loginUser: u.Username, internalGroup: g.Name,
			rootless: true,
		}, nil
	}
	o := mailOwner{uid: 65534, gid: 65534, internalUser: "dovecot", loginUser: "dovenull", internalGroup: "dovecot"}
	if u, err := user.Lookup("nobody"); err == nil {
		o.uid, _ = strconv.Atoi(u.Uid)
		o.gid, _ = strconv.Atoi(u.Gid)
	}
	for _, name := range []string{o.internalUser, o.loginUser} {
		if _, err := user.Lookup(name); err != nil {
			return mailOwner{}, fmt.Errorf("system user %q (made by the dovecot-core package): %w", name, err)
		}
	}
	return o, nil
}

// writeConfig writes dovecot.conf and the passwd-file, and makes the
// directories Dovecot expects with the owners it checks for.
func (d *Dovecot) writeConfig(opts DovecotOptions, ports []int) error {
	o, err := owner()
	if err != nil {
		return err
	}
	mailDir := filepath.Join(d.Dir, "mail")
	if err := os.Mkdir(mailDir, 0o755); err != nil {
		return err
	}
	// Users from an Extra passdb get their homes here too, so the mail uid
	// must be able to create directories in it.
	if err := os.Chown(mailDir, o.uid, o.gid); err != nil {
		return err
	}

	var users strings.Builder
	for _, name := range slices.Sorted(maps.Keys(d.Users)) {
		if strings.ContainsAny(name, ":/") || strings.ContainsFunc(name, func(r rune) bool { return r < 0x20 || r == 0x7f }) || name == "" {
			return fmt.Errorf("user name %q cannot be stored in a passwd-file", name)
		}
		key := strings.ToLower(name)
		home := filepath.Join(mailDir, key)
		if err := os.Mkdir(home, 0o700); err != nil {
			return err
		}
		if err := os.Chown(home, o.uid, o.gid); err != nil {
			return err
		}
		// base64 so that no character of a password (':', newline, a
		// leading '{') can be mistaken for passwd-file syntax.
		pass := base64.StdEncoding.EncodeToString([]byte(d.Users[name]))
		fmt.Fprintf(&users, "%s:{PLAIN.b64}%s:%d:%d::%s::\n", key, pass, o.uid, o.gid, home)
	}
	usersFile := filepath.Join(d.Dir, "users")
	if err := os.WriteFile(usersFile, []byte(users.String()), 0o640); err != nil {
		return err
	}
	// The auth process reads it as the internal user; nobody else should.
	if g, err := user.LookupGroup(o.internalGroup); err == nil {
		gid, _ := strconv.Atoi(g.Gid)
		if err := os.Chown(usersFile, -1, gid); err != nil {
			return err
		}
	}

	var plugins string
	if _, err := os.Stat(filepath.Join(dovecotModuleDir, "lib30_imap_zlib_plugin.so")); err == nil {
		plugins = "imap_zlib"
	}
	conf := dovecotConfig{
		Dir:             d.Dir,
		Instance:        filepath.Base(d.Dir),
		Owner:           o,
		Port:            ports[0],
		TLSPort:         ports[1],
		CertFile:        d.CA.ServerCertFile,
		KeyFile:         d.CA.ServerKeyFile,
		UsersFile:       usersFile,
		TrustedNetworks: opts.TrustedNetworks,
		IMAPPlugins:     plugins,
		Extra:           opts.Extra,
		Protocols:       opts.Protocols,
		Ports:           ports,
	}
	return os.WriteFile(d.conf, []byte(conf.String()), 0o644)
}

// dovecotModuleDir is where Debian's dovecot-core installs plugins.
const dovecotModuleDir = "/usr/lib/dovecot/modules"

type dovecotConfig struct {
	Dir, Instance     string
	Owner             mailOwner
	Port, TLSPort     int
	CertFile, KeyFile string
	UsersFile         string
	TrustedNetworks   string
	IMAPPlugins       string
	Extra             string
	Protocols         []string
	Ports             []int
}

// String renders a complete dovecot.conf for Dovecot 2.3. It includes
// nothing from /etc/dovecot so the system's config cannot change a test.
func (c dovecotConfig) String() string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	w("# Written by imapgate internal/testenv for one test run.")
	w("base_dir = %s/run", c.Dir)
	w("state_dir = %s/state", c.Dir)
	w("instance_name = %s", c.Instance)
	w("log_path = %s/dovecot.log", c.Dir)
	w("protocols = imap %s", strings.Join(c.Protocols, " "))
	w("listen = 127.0.0.1")
	w("")
	w("default_internal_user = %s", c.Owner.internalUser)
	w("default_internal_group = %s", c.Owner.internalGroup)
	w("default_login_user = %s", c.Owner.loginUser)
	w("first_valid_uid = %d", min(c.Owner.uid, 500))
	w("first_valid_gid = %d", min(c.Owner.gid, 1))
	w("")
	// Logging that tests assert on: who logged in, and what the proxy
	// forwarded in ID (x-originating-ip and friends).
	w("auth_verbose = yes")
	w("verbose_proctitle = yes")
	w("imap_id_log = *")
	w("")
	w("ssl = yes")
	w("ssl_cert = <%s", c.CertFile)
	w("ssl_key = <%s", c.KeyFile)
	// Plaintext auth keeps Dovecot's default (refused without TLS), but
	// Dovecot counts loopback connections as secure, so LOGIN works on Addr
	// without STARTTLS.
	w("auth_mechanisms = plain login")
	if c.TrustedNetworks != "" {
		w("login_trusted_networks = %s", c.TrustedNetworks)
	}
	w("")
	w("passdb {")
	w("  driver = passwd-file")
	w("  args = %s", c.UsersFile)
	w("}")
	w("userdb {")
	w("  driver = passwd-file")
	w("  args = %s", c.UsersFile)
	w("}")
	w("mail_location = maildir:~/Maildir")
	w("")
	// Sized for about a thousand concurrent test sessions; imap-login in
	// high-performance mode (long-lived processes serving many clients)
	// so that logins do not fork.
	w("mail_max_userip_connections = 10000")
	w("default_process_limit = 2000")
	w("default_client_limit = 10000")
	w("default_vsz_limit = 1G")
	w("service imap-login {")
	w("  inet_listener imap {")
	w("    port = %d", c.Port)
	w("  }")
	w("  inet_listener imaps {")
	w("    port = %d", c.TLSPort)
	w("    ssl = yes")
	w("  }")
	w("  service_count = 0")
	w("  process_min_avail = 2")
	w("  client_limit = 2000")
	if c.Owner.rootless {
		w("  chroot =")
	}
	w("}")
	// Idle sessions (IDLE for 5 s) move into the shared imap-hibernate
	// process, so a thousand idling clients are not a thousand imap
	// processes. imap-hibernate runs as the internal user and hands a
	// waking session back through imap-master, hence the owner change.
	w("imap_hibernate_timeout = 5s")
	w("service imap {")
	w("  extra_groups = $default_internal_group")
	w("  unix_listener imap-master {")
	w("    user = $default_internal_user")
	w("  }")
	w("}")
	w("service imap-hibernate {")
	w("  unix_listener imap-hibernate {")
	w("    mode = 0660")
	w("    group = $default_internal_group")
	w("  }")
	w("}")
	if c.Owner.rootless {
		w("service anvil {")
		w("  chroot =")
		w("}")
		w("service auth-worker {")
		w("  user = $default_internal_user")
		w("}")
	}
	w("protocol imap {")
	if c.IMAPPlugins != "" {
		// imap_zlib adds COMPRESS=DEFLATE after login.
		w("  mail_plugins = $mail_plugins %s", c.IMAPPlugins)
	}
	w("}")
	c.otherProtocols(w)
	if c.Extra != "" {
		w("")
		w("# DovecotOptions.Extra")
		w("%s", c.Extra)
	}
	return b.String()
}
