package bench

import (
	"context"
	"crypto/tls"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/testenv"
)

// The harness's fixed parts: who logs in, and how Dovecot is sized.
const (
	benchPass  = "benchpass"
	benchUsers = 200 // spread sessions so no per-user limit is near
)

// envInt reads a positive integer from the environment, or def.
func envInt(t testing.TB, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		t.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

func envDuration(t testing.TB, name string, def time.Duration) time.Duration {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		t.Fatalf("%s=%q: want a positive duration", name, v)
	}
	return d
}

// startBenchDovecot starts Dovecot with the benchmark users.
func startBenchDovecot(t *testing.T) (*testenv.Dovecot, []Credential) {
	creds := UsersPattern("bench%d", benchUsers, benchPass)
	users := make(map[string]string, len(creds))
	for _, c := range creds {
		users[c.User] = c.Pass
	}
	d := testenv.StartDovecot(t, testenv.DovecotOptions{Users: users, TrustedNetworks: "127.0.0.0/8", Extra: DovecotExtra})
	return d, creds
}

// raiseInotify makes room for one inotify instance per imap process
// (Debian's default is 128; install-test-deps.sh sets 8,192).
func raiseInotify(t testing.TB, want int) {
	const p = "/proc/sys/fs/inotify/max_user_instances"
	b, err := os.ReadFile(p)
	if err != nil {
		t.Logf("cannot read %s: %v", p, err)
		return
	}
	if n, _ := strconv.Atoi(strings.TrimSpace(string(b))); n >= want {
		return
	}
	if err := os.WriteFile(p, []byte(strconv.Itoa(want)), 0o644); err != nil {
		t.Logf("cannot raise %s to %d (%v): thousands of idle sessions may fail", p, want, err)
	}
}

// server is a proxy process started by the harness.
type server struct {
	name string
	addr string // implicit-TLS address clients use
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

func (s *server) proc() *Proc { return &Proc{PID: s.cmd.Process.Pid} }

// stop sends SIGTERM to the process (by its id) and waits; SIGKILL after
// 15 s.
func (s *server) stop(t testing.TB) {
	select {
	case <-s.done:
		return
	default:
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(15 * time.Second):
		t.Logf("%s did not stop within 15 s; killing pid %d", s.name, s.cmd.Process.Pid)
		s.cmd.Process.Kill()
		<-s.done
	}
}

// startServer runs argv with its output in logFile and waits until addr
// greets over TLS.
func startServer(t *testing.T, name, addr, logFile string, ca *testenv.TestCA, argv ...string) *server {
	t.Helper()
	return startServerEnv(t, name, addr, logFile, ca, nil, argv...)
}

// startServerEnv is startServer with env added to the process's
// environment.
func startServerEnv(t *testing.T, name, addr, logFile string, ca *testenv.TestCA, env []string, argv ...string) *server {
	t.Helper()
	out, err := os.Create(logFile)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = out, out
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	// If the test binary dies (timeout, SIGQUIT), the proxy goes with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	s := &server{name: name, addr: addr, cmd: cmd, log: logFile, done: make(chan struct{})}
	go func() { cmd.Wait(); close(s.done) }()
	t.Cleanup(func() { s.stop(t) })
	d := Dialer{Addr: addr, TLS: &tls.Config{RootCAs: ca.Pool, ServerName: "localhost"}, Timeout: time.Second}
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := d.Dial(context.Background())
		if err == nil {
			c.Close()
			return s
		}
		select {
		case <-s.done:
			b, _ := os.ReadFile(logFile)
			t.Fatalf("%s exited: %v\n%s", name, cmd.ProcessState, b)
		default:
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logFile)
			t.Fatalf("%s on %s did not answer: %v\n%s", name, addr, err, b)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// buildImapgate builds the proxy binary and returns it with the commit it
// was built from. With rev empty it builds the working tree; otherwise
// (IMAPGATE_BENCH_REV, e.g. HEAD) a clean export of that revision, so a
// shared checkout's uncommitted edits do not leak into the numbers.
func buildImapgate(t *testing.T, dir, rev string) (bin, commit string) {
	t.Helper()
	bin = filepath.Join(dir, "imapgate")
	build := exec.Command("go", "build", "-o", bin, "./cmd/imapgate")
	build.Dir = ".."
	commit = firstLine(exec.Command("git", "describe", "--always", "--dirty", "--abbrev=12"))
	if rev != "" {
		src := filepath.Join(dir, "src")
		if err := os.Mkdir(src, 0o755); err != nil {
			t.Fatal(err)
		}
		export := exec.Command("sh", "-c", `git archive "$1" | tar -x -C "$2"`, "sh", rev, src)
		export.Dir = ".."
		if out, err := export.CombinedOutput(); err != nil {
			t.Fatalf("git archive %s: %v\n%s", rev, err, out)
		}
		build.Dir = src
		commit = firstLine(exec.Command("git", "rev-parse", "--short=12", rev))
	}
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin, commit
}

// imapgateConfig is the configuration the harness runs imapgate with:
// one implicit-TLS listener, Dovecot's cleartext port as the only
// backend (as HAProxy's server line), no per-IP limit (every benchmark
// client is 127.0.0.1), session ticket keys in a file as a fleet without
// Consul shares them (so the resumed login row resumes with those keys),
// and otherwise the defaults, logging included.
func imapgateConfig(listen, backend, cert, key, ticketKeys string) string {
	return fmt.Sprintf(`[log]
format = "json"

[[listen]]
addr = %q
mode = "tls"

[tls]
certificates = [{ cert = %q, key = %q }]

[tls.session_tickets]
store = "file"
file = %q

[limits]
max_connections_per_ip = -1

[backends.dovecot]
addr = %q
security = "none"

[routing]
default = ["dovecot"]

[http]
addr = "off"
`, listen, cert, key, ticketKeys, backend)
}

func startImapgate(t *testing.T, dir, bin string, d *testenv.Dovecot) *server {
	return startImapgateWith(t, dir, bin, d, "", nil)
}

// startImapgateWith is startImapgate with extra configuration appended
// and extra environment variables (e.g. GOGC) for the process.
func startImapgateWith(t *testing.T, dir, bin string, d *testenv.Dovecot, extra string, env []string) *server {
	t.Helper()
	addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	conf := filepath.Join(dir, "imapgate.toml")
	if err := os.WriteFile(conf, []byte(imapgateConfig(addr, d.Addr, d.CA.ServerCertFile, d.CA.ServerKeyFile, filepath.Join(dir, "ticket-keys.json"))+extra), 0o644); err != nil {
		t.Fatal(err)
	}
	return startServerEnv(t, "imapgate", addr, filepath.Join(dir, "imapgate.log"), d.CA, env, bin, "-config", conf)
}

// haproxyConfig is HAProxy as an L4 TLS terminator: mode tcp, TLS on the
// bind line, Dovecot's cleartext port behind it. maxconn stays under the
// 20,000 descriptors a process may have (two a session).
func haproxyConfig(listen, backend, pem string) string {
	return fmt.Sprintf(`global
    maxconn 9950
    # AES-128-GCM first, as Go and Dovecot choose: OpenSSL's default
    # order would pick AES-256-GCM and cost HAProxy more per MiB.
    ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256

defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h

frontend imaps
    bind %s ssl crt %s defer-accept
    default_backend dovecot

backend dovecot
    server s1 %s
`, listen, pem, backend)
}

func startHAProxy(t *testing.T, dir string, d *testenv.Dovecot) *server {
	t.Helper()
	cert, err := os.ReadFile(d.CA.ServerCertFile)
	if err != nil {
		t.Fatal(err)
	}
	key, err := os.ReadFile(d.CA.ServerKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	pem := filepath.Join(dir, "combined.pem")
	if err := os.WriteFile(pem, append(cert, key...), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	conf := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(conf, []byte(haproxyConfig(addr, d.Addr, pem)), 0o644); err != nil {
		t.Fatal(err)
	}
	// -db: stay in the foreground, no master process, so the pid is the
	// proxy's.
	return startServer(t, "haproxy", addr, filepath.Join(dir, "haproxy.log"), d.CA, testenv.Bin("haproxy"), "-db", "-f", conf)
}

// waitFDs waits until p holds at most n descriptors (sessions of the last
// scenario have gone), up to timeout.
func waitFDs(p *Proc, n int, timeout time.Duration) int {
	deadline := time.Now().Add(timeout)
	for {
		got, err := p.FDs()
		if err != nil || got <= n || time.Now().After(deadline) {
			return got
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitHibernated waits until Dovecot holds no imap process of its own
// (every remaining session is hibernated or gone), so one target's
// sessions do not crowd the next one's.
func waitHibernated(d *testenv.Dovecot, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	instance := filepath.Base(d.Dir)
	for time.Now().Before(deadline) {
		if countProcs(instance, "/imap ") == 0 {
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// countProcs counts processes whose command line mentions both the
// Dovecot instance name and what (Dovecot's verbose_proctitle puts the
// instance name first: "dovecot-XXX/imap [user ...]").
func countProcs(instance, what string) int {
	ents, _ := os.ReadDir("/proc")
	n := 0
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		s := strings.ReplaceAll(string(b), "\x00", " ")
		if strings.Contains(s, instance) && strings.Contains(s, what) {
			n++
		}
	}
	return n
}
