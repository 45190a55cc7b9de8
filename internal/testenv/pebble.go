package testenv

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Pebble is a running Pebble ACME server (Let's Encrypt's test CA) with
// pebble-challtestsrv as its DNS: every name resolves to 127.0.0.1, so
// Pebble's validation authority connects to imapgate's own challenge
// listeners on loopback. Validation is real (PEBBLE_VA_ALWAYS_VALID is
// never set); only the 5-to-15 s sleep before each validation is skipped.
//
//	testenv.Need(t, "pebble", "pebble-challtestsrv")
//	p := testenv.StartPebble(t, testenv.PebbleOptions{HTTPPort: hp, TLSPort: tp})
//	// ACME directory p.DirectoryURL, trusting p.CAFile for its HTTPS;
//	// HTTP-01 answered on 127.0.0.1:hp, TLS-ALPN-01 on 127.0.0.1:tp.
//	pool := p.IssuerPool(t) // verifies the certificates Pebble issues
type Pebble struct {
	DirectoryURL string // the ACME directory, https://127.0.0.1:PORT/dir
	CAFile       string // PEM root that signs the ACME API's HTTPS certificate
	DNSAddr      string // pebble-challtestsrv's DNS server, 127.0.0.1:PORT (UDP and TCP)
	MgmtURL      string // Pebble's management API (roots, intermediates)

	ChallMgmtURL      string // pebble-challtestsrv's management API (TXT records for DNS-01)
	HTTPPort, TLSPort int    // where Pebble validates http-01 and tls-alpn-01 on 127.0.0.1

	caPool *x509.CertPool
	log    *syncBuffer
}

// PebbleOptions configures StartPebble.
type PebbleOptions struct {
	// HTTPPort and TLSPort are the ports on 127.0.0.1 to which Pebble's
	// validation authority connects for http-01 and tls-alpn-01. If zero,
	// free ports are chosen; read them back from Pebble.
	HTTPPort, TLSPort int

	// Validity is the lifetime of the certificates Pebble issues, in whole
	// seconds. If zero, 90 days.
	Validity time.Duration
}

// StartPebble starts pebble-challtestsrv and Pebble on free loopback ports
// and stops both when the test ends. Their output is in Log, and in the
// test's log if the test failed.
func StartPebble(t testing.TB, opts PebbleOptions) *Pebble {
	t.Helper()
	Need(t, "pebble", "pebble-challtestsrv")
	ports, err := freePorts(5, true)
	if err != nil {
		t.Fatalf("testenv: pebble: %v", err)
	}
	acmePort, mgmtPort, dnsPort, challMgmtPort := ports[0], ports[1], ports[2], ports[3]
	if opts.HTTPPort == 0 {
		opts.HTTPPort = ports[4]
	}
	if opts.TLSPort == 0 {
		opts.TLSPort = FreePort(t)
	}
	validity := int64(opts.Validity / time.Second)
	if validity <= 0 {
		validity = 90 * 24 * 3600
	}

	dir := t.TempDir()
	ca := NewTestCA(t) // Pebble's HTTPS certificate: localhost, 127.0.0.1
	p := &Pebble{
		DirectoryURL: fmt.Sprintf("https://127.0.0.1:%d/dir", acmePort),
		CAFile:       ca.CAFile,
		DNSAddr:      fmt.Sprintf("127.0.0.1:%d", dnsPort),
		MgmtURL:      fmt.Sprintf("https://127.0.0.1:%d", mgmtPort),
		ChallMgmtURL: fmt.Sprintf("http://127.0.0.1:%d", challMgmtPort),
		HTTPPort:     opts.HTTPPort,
		TLSPort:      opts.TLSPort,
		caPool:       ca.Pool,
		log:          &syncBuffer{},
	}

	var cfg struct {
		Pebble map[string]any `json:"pebble"`
	}
	cfg.Pebble = map[string]any{
		"listenAddress":                  fmt.Sprintf("127.0.0.1:%d", acmePort),
		"managementListenAddress":        fmt.Sprintf("127.0.0.1:%d", mgmtPort),
		"certificate":                    ca.ServerCertFile,
		"privateKey":                     ca.ServerKeyFile,
		"httpPort":                       opts.HTTPPort,
		"tlsPort":                        opts.TLSPort,
		"ocspResponderURL":               "",
		"externalAccountBindingRequired": false,
		"retryAfter":                     map[string]int{"authz": 1, "order": 1},
		"keyAlgorithm":                   "ecdsa",
		"profiles": map[string]any{
			"default": map[string]any{"description": "imapgate tests", "validityPeriod": validity},
		},
	}
	cfgJSON, _ := json.MarshalIndent(cfg, "", "  ")
	cfgFile := filepath.Join(dir, "pebble-config.json")
	if err := os.WriteFile(cfgFile, cfgJSON, 0o600); err != nil {
		t.Fatal(err)
	}

	chall := exec.Command(Bin("pebble-challtestsrv"),
		"-defaultIPv4", "127.0.0.1",
		"-defaultIPv6", "", // only A records: imapgate's test listeners are on 127.0.0.1
		"-dnsserver", p.DNSAddr,
		"-management", fmt.Sprintf("127.0.0.1:%d", challMgmtPort),
		"-http01", "", "-https01", "", "-tlsalpn01", "", "-doh", "",
	)
	chall.Stdout = prefixWriter{p.log, "challtestsrv: "}
	chall.Stderr = chall.Stdout
	cp, err := startProcess(chall)
	if err != nil {
		t.Fatalf("testenv: starting pebble-challtestsrv: %v", err)
	}
	t.Cleanup(func() { _ = cp.stop(syscall.SIGTERM, 5*time.Second) })

	peb := exec.Command(Bin("pebble"), "-config", cfgFile, "-dnsserver", p.DNSAddr)
	peb.Dir = dir
	peb.Env = append(os.Environ(),
		"PEBBLE_VA_NOSLEEP=1",      // validate at once instead of after 5-15 s
		"PEBBLE_WFE_NONCEREJECT=0", // no random badNonce errors: deterministic tests
		"PEBBLE_AUTHZREUSE=0",      // orders validated anew, renewals included (all but about 1 in 100: see TestACMEProxyRenewal)
	)
	peb.Stdout = prefixWriter{p.log, ""}
	peb.Stderr = peb.Stdout
	pp, err := startProcess(peb)
	if err != nil {
		t.Fatalf("testenv: starting pebble: %v", err)
	}
	t.Cleanup(func() {
		_ = pp.stop(syscall.SIGTERM, 5*time.Second)
		if t.Failed() {
			t.Logf("pebble and challtestsrv output:\n%s", p.Log())
		}
	})

	client := p.httpClient()
	err = waitFor(cp, 10*time.Second, func() error {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", challMgmtPort), time.Second)
		if err != nil {
			return err
		}
		return c.Close()
	})
	if err != nil {
		t.Fatalf("testenv: pebble-challtestsrv: %v\n%s", err, p.Log())
	}
	err = waitFor(pp, 20*time.Second, func() error {
		for _, u := range []string{p.DirectoryURL, p.MgmtURL + "/roots/0"} {
			resp, err := client.Get(u)
			if err != nil {
				return err
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("GET %s: %s", u, resp.Status)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("testenv: pebble: %v\n%s", err, p.Log())
	}
	return p
}

// httpClient trusts Pebble's HTTPS certificate.
func (p *Pebble) httpClient() *http.Client {
	return &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: p.caPool}},
	}
}

// IssuerPool returns the roots and intermediates of the certificates Pebble
// issues, from its management API. Pebble generates them at start-up, so
// each Pebble has its own.
func (p *Pebble) IssuerPool(t testing.TB) *x509.CertPool {
	t.Helper()
	pool := x509.NewCertPool()
	client := p.httpClient()
	for _, path := range []string{"/roots/0", "/intermediates/0"} {
		resp, err := client.Get(p.MgmtURL + path)
		if err != nil {
			t.Fatalf("testenv: pebble %s: %v", path, err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("testenv: pebble %s: %s %v", path, resp.Status, err)
		}
		if !pool.AppendCertsFromPEM(body) {
			t.Fatalf("testenv: pebble %s: no PEM certificate in %q", path, body)
		}
	}
	return pool
}

// Issued returns how many certificates Pebble has issued so far (one per
// finalized order), counted from its log.
func (p *Pebble) Issued() int {
	return strings.Count(p.log.String(), "Issued certificate serial")
}

// Log returns what Pebble and pebble-challtestsrv have printed so far.
func (p *Pebble) Log() string { return p.log.String() }

// SetTXT makes pebble-challtestsrv answer TXT queries for host (a DNS name,
// with or without the final dot) with value, for DNS-01 tests.
func (p *Pebble) SetTXT(host, value string) error {
	return p.challPost("/set-txt", map[string]string{"host": fqdn(host), "value": value})
}

// ClearTXT removes the TXT records SetTXT made for host.
func (p *Pebble) ClearTXT(host string) error {
	return p.challPost("/clear-txt", map[string]string{"host": fqdn(host)})
}

func fqdn(host string) string { return strings.TrimSuffix(host, ".") + "." }

func (p *Pebble) challPost(path string, body any) error {
	b, _ := json.Marshal(body)
	resp, err := http.Post(p.ChallMgmtURL+path, "application/json", bytes.NewReader(b))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("challtestsrv %s: %s %s", path, resp.Status, msg)
	}
	return nil
}

// syncBuffer is a bytes.Buffer that two processes' output can share.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// prefixWriter writes to w with prefix before each chunk (os/exec writes
// whole lines in practice, since both programs log line by line).
type prefixWriter struct {
	w      io.Writer
	prefix string
}

func (pw prefixWriter) Write(p []byte) (int, error) {
	if pw.prefix == "" {
		return pw.w.Write(p)
	}
	if _, err := pw.w.Write([]byte(pw.prefix + string(p))); err != nil {
		return 0, err
	}
	return len(p), nil
}
