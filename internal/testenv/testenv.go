// Package testenv starts real backing services (Dovecot, Consul, Pebble) for
// integration tests.
//
// Every service runs as a child process of the test binary, on loopback
// ports chosen by the test, with its state in a temporary directory, and is
// stopped by t.Cleanup. Nothing here talks to a system-wide instance, so two
// test packages (or two Dovecots in one test) never share state.
//
// The binaries are installed by scripts/install-test-deps.sh. A test that
// needs one says so first; without it the test is skipped on a developer's
// machine and fails in CI (CI set to anything non-empty), so a missing
// install step can never turn into a silently green run:
//
//	func TestLogin(t *testing.T) {
//		testenv.Need(t, "dovecot")
//		d := testenv.StartDovecot(t, testenv.DovecotOptions{})
//		c, err := net.Dial("tcp", d.Addr)
//		...
//	}
package testenv

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// ConsulVersion is the Consul release the install script builds; Bin looks
// for it under this name in the cache so an upgrade never runs a stale binary.
const ConsulVersion = "1.13.9"

// installHint is the one place that tells a developer how to get the
// binaries; it is in every skip and failure message.
const installHint = "run scripts/install-test-deps.sh (or make deps)"

// Need makes sure the named executables are available (looked up as Bin does).
// When one is missing it fails the test if the CI environment variable is
// non-empty and skips it otherwise, both with a message that names
// scripts/install-test-deps.sh.
func Need(t testing.TB, what ...string) {
	t.Helper()
	var missing []string
	for _, name := range what {
		if Bin(name) == "" {
			missing = append(missing, name)
		}
	}
	if len(missing) == 0 {
		return
	}
	msg := fmt.Sprintf("testenv: missing %s: %s", strings.Join(missing, ", "), installHint)
	if os.Getenv("CI") != "" {
		t.Fatalf("%s (CI is set, so this is a failure, not a skip)", msg)
	}
	t.Skipf("%s", msg)
}

// CacheDir is where the install script keeps what it builds:
// $IMAPGATE_CACHE, else $HOME/.cache/imapgate.
func CacheDir() string {
	if d := os.Getenv("IMAPGATE_CACHE"); d != "" {
		return d
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return ""
	}
	return filepath.Join(home, ".cache", "imapgate")
}

// Bin returns the path of a dependency binary, or "" if it is not found.
//
//   - "consul": $IMAPGATE_CONSUL, else <cache>/bin/consul-1.13.9, else "consul" on PATH.
//   - "pebble", "pebble-challtestsrv" and any other name: <cache>/bin/NAME, else PATH.
//   - "dovecot", "doveadm", "haproxy", "slapd", "slapadd", "ldapmodify": PATH, then /usr/sbin and /usr/bin, because
//     Debian puts dovecot in /usr/sbin, which is not on every user's PATH.
//
// <cache> is CacheDir().
func Bin(name string) string {
	cache := filepath.Join(CacheDir(), "bin")
	var candidates []string
	switch name {
	case "consul":
		if p := os.Getenv("IMAPGATE_CONSUL"); p != "" {
			candidates = append(candidates, p)
		}
		candidates = append(candidates, filepath.Join(cache, "consul-"+ConsulVersion), pathOnly)
	case "dovecot", "doveadm", "haproxy", "nginx", "postfix", "sendmail", "slapd", "slapadd", "ldapmodify":
		candidates = append(candidates, pathOnly, "/usr/sbin", "/usr/bin")
	default:
		candidates = append(candidates, filepath.Join(cache, name), pathOnly)
	}
	for _, c := range candidates {
		switch {
		case c == pathOnly:
			if p, err := exec.LookPath(name); err == nil {
				return p
			}
		case c == "/usr/sbin" || c == "/usr/bin":
			if p := filepath.Join(c, name); isExecutable(p) {
				return p
			}
		case isExecutable(c):
			return c
		}
	}
	return ""
}

// pathOnly marks "look the name up on PATH" in Bin's candidate list.
const pathOnly = "\x00PATH"

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0
}

// FreePort returns a currently free loopback TCP port.
//
// It prefers a port below the kernel's ephemeral range: services are
// stopped and restarted on the same port in outage tests, and while one is
// down an outgoing connection from any process could otherwise be given its
// port as a local port and keep the restart from binding it.
func FreePort(t testing.TB) int {
	t.Helper()
	ports, err := freePorts(1, false)
	if err != nil {
		t.Fatalf("testenv: no free port: %v", err)
	}
	return ports[0]
}

// freePorts returns n distinct ports that are free on 127.0.0.1 for TCP and,
// if udp is set, for UDP too (Consul's DNS and Serf listen on both).
func freePorts(n int, udp bool) ([]int, error) {
	lo, hi := 10000, ephemeralLow()
	var held []func()
	defer func() {
		for _, release := range held {
			release()
		}
	}()
	seen := map[int]bool{}
	var ports []int
	for tries := 0; len(ports) < n && tries < 1000; tries++ {
		p := 0
		if hi-lo > 1000 && tries < 900 {
			p = lo + mrand.IntN(hi-lo)
		}
		// Hold every port until all are chosen so the n ports differ.
		port, release, err := reserve(p, udp)
		if err != nil || seen[port] {
			continue
		}
		seen[port] = true
		held = append(held, release)
		ports = append(ports, port)
	}
	if len(ports) < n {
		return nil, fmt.Errorf("found %d of %d free ports", len(ports), n)
	}
	return ports, nil
}

// reserve binds 127.0.0.1:port (0 means any) and returns the port bound
// and a function that releases it.
func reserve(port int, udp bool) (int, func(), error) {
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return 0, nil, err
	}
	port = l.Addr().(*net.TCPAddr).Port
	if !udp {
		return port, func() { l.Close() }, nil
	}
	u, err := net.ListenPacket("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		l.Close()
		return 0, nil, err
	}
	return port, func() { l.Close(); u.Close() }, nil
}

// ephemeralLow is the bottom of the kernel's ephemeral port range (32768 if
// it cannot be read).
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 32768
	}
	n, err := strconv.Atoi(f[0])
	if err != nil || n <= 10000 {
		return 32768
	}
	return n
}

// TestCA is a test certificate authority and a server certificate signed by
// it, valid for "localhost", 127.0.0.1 and ::1.
type TestCA struct {
	CertPEM []byte         // the CA certificate, PEM
	CAFile  string         // CertPEM written to a file, for configs that name a CA file
	Pool    *x509.CertPool // holds only the CA, for tls.Config.RootCAs

	ServerCertFile, ServerKeyFile string // PEM files in a temporary directory
	ServerCert                    tls.Certificate
}

// NewTestCA makes a fresh CA and server certificate; the files are removed
// when the test ends.
func NewTestCA(t testing.TB) *TestCA {
	t.Helper()
	ca, err := newTestCA(t.TempDir())
	if err != nil {
		t.Fatalf("testenv: test CA: %v", err)
	}
	return ca
}

func newTestCA(dir string) (*TestCA, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	// Backdated so that a clock a little behind still accepts it.
	notBefore := time.Now().Add(-time.Hour)
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "imapgate test CA"},
		NotBefore:             notBefore,
		NotAfter:              notBefore.Add(10 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: "localhost"},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		NotBefore:    notBefore,
		NotAfter:     notBefore.Add(10 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}

	ca := &TestCA{
		CertPEM:        pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		CAFile:         filepath.Join(dir, "ca.pem"),
		Pool:           x509.NewCertPool(),
		ServerCertFile: filepath.Join(dir, "server.pem"),
		ServerKeyFile:  filepath.Join(dir, "server-key.pem"),
	}
	ca.Pool.AddCert(caCert)
	// The chain goes in the cert file so that clients which only know the CA
	// by file can verify either way.
	certPEM := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), ca.CertPEM...)
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	if ca.ServerCert, err = tls.X509KeyPair(certPEM, keyPEM); err != nil {
		return nil, err
	}
	for name, data := range map[string][]byte{ca.CAFile: ca.CertPEM, ca.ServerCertFile: certPEM, ca.ServerKeyFile: keyPEM} {
		if err := os.WriteFile(name, data, 0o600); err != nil {
			return nil, err
		}
	}
	return ca, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}

// process is a started service: its command, and a channel closed when it
// has exited.
type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error // valid after done is closed
}

// startProcess starts cmd in its own process group, so that stop can reach
// the children a service forks (Dovecot's login and imap processes).
//
// The service is also killed if the test binary dies without running its
// cleanups (a -timeout panic, a SIGKILL), so it does not keep its ports
// and CPU for the rest of the run. Pdeathsig fires when the forking thread
// exits, which in Go happens only if a goroutine locked to its thread
// ends: tests must not start services from such a goroutine.
func startProcess(cmd *exec.Cmd) (*process, error) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go p.wait()
	return p, nil
}

func (p *process) wait() {
	p.err = p.cmd.Wait()
	close(p.done)
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends sig to every process of the group, gives them grace to exit,
// then kills what is left, and returns once no process of the group
// remains: a service restarted on the same ports must not race its
// predecessor. The whole group is signalled because Dovecot's master
// exits without waiting for its imap processes, which would otherwise
// linger with their clients connected.
func (p *process) stop(sig syscall.Signal, grace time.Duration) error {
	pgid := p.cmd.Process.Pid
	_ = syscall.Kill(-pgid, sig)
	deadline := time.Now().Add(grace)
	for time.Now().Before(deadline) && !(p.exited() && groupGone(pgid)) {
		time.Sleep(20 * time.Millisecond)
	}
	if !p.exited() || !groupGone(pgid) {
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
	}
	<-p.done
	for end := time.Now().Add(10 * time.Second); !groupGone(pgid); {
		if time.Now().After(end) {
			return fmt.Errorf("process group %d still alive 10s after SIGKILL", pgid)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

// groupGone reports whether no process is left in process group pgid.
// Zombies count as gone: their parent (the test binary reaps only the
// leader) is what keeps them, and they hold no ports.
func groupGone(pgid int) bool {
	err := syscall.Kill(-pgid, 0)
	if errors.Is(err, syscall.ESRCH) {
		return true
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return false
	}
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// Fields after the parenthesised command: state ppid pgrp ...
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(stat[i+1:]))
		if len(f) < 3 || f[0] == "Z" || f[0] == "X" {
			continue
		}
		if g, _ := strconv.Atoi(f[2]); g == pgid {
			return false
		}
	}
	return true
}

// waitFor polls ready every 50 ms until it returns nil, the process exits,
// or timeout passes, and returns the last error.
func waitFor(p *process, timeout time.Duration, ready func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := ready()
		if err == nil {
			return nil
		}
		if p.exited() {
			return fmt.Errorf("process exited (%v) before it was ready: %w", p.err, err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after %v: %w", timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// readFile returns the file's contents, or a line saying why it could not.
func readFile(name string) string {
	b, err := os.ReadFile(name)
	if err != nil {
		return fmt.Sprintf("(%v)\n", err)
	}
	return string(b)
}
