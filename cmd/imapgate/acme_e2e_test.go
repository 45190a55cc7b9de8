package main

// The built binary with [tls.acme] against a real Pebble: a certificate
// obtained at start-up and served to clients trusting Pebble's roots, and
// two instances sharing one issuance through Consul storage.

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/hashicorp/consul/api"
	"github.com/imapgate/imapgate/internal/config"
	"github.com/imapgate/imapgate/internal/testenv"
	igtls "github.com/imapgate/imapgate/tls"
)

const (
	acmeUser, acmePass = "alice@example.org", "alicepass"
	acmeEmail          = "postmaster@test.example"
)

// acmeMemBackend runs go-imap's in-memory server with acmeUser on loopback,
// a real IMAP backend for tests about certificates, not mail.
func acmeMemBackend(t *testing.T) string {
	return opsBackend(t, "", map[string]string{acmeUser: acmePass})
}

// acmeConfigFile writes an imapgate configuration with one implicit-TLS
// listener (name "imaps") at tlsAddr, a STARTTLS one, the backend, and
// acme as the [tls.acme] section's body.
func acmeConfigFile(t *testing.T, tlsAddr, backend, httpAddr, extra, acme string) string {
	t.Helper()
	conf := filepath.Join(t.TempDir(), "imapgate.toml")
	text := fmt.Sprintf(`
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

[backends.mem]
addr = %q

[routing]
default = ["mem"]

[http]
addr = %q
%s
[tls.acme]
%s`, tlsAddr, freeAddr(t), backend, httpAddr, extra, acme)
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(imapgateBinary(t), "check", conf).CombinedOutput(); err != nil {
		t.Fatalf("imapgate check: %v\n%s\n%s", err, out, text)
	}
	return conf
}

// servedCert waits until the implicit-TLS listener at addr serves name a
// certificate that verifies against roots, and returns it. Until then it
// serves the self-signed fallback, which does not.
func servedCert(t *testing.T, addr, name string, roots *x509.CertPool) *x509.Certificate {
	t.Helper()
	deadline := time.Now().Add(45 * time.Second)
	for {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr,
			&tls.Config{ServerName: name, RootCAs: roots, NextProtos: []string{igtls.ALPNIMAP}})
		if err == nil {
			defer c.Close()
			st := c.ConnectionState()
			if st.NegotiatedProtocol != igtls.ALPNIMAP {
				t.Errorf("negotiated ALPN %q", st.NegotiatedProtocol)
			}
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if g, err := bufio.NewReader(c).ReadString('\n'); err != nil || !strings.HasPrefix(g, "* OK ") {
				t.Fatalf("greeting over TLS from %s: %q, %v", addr, g, err)
			}
			return st.PeerCertificates[0]
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not serve a certificate for %s that verifies within 45 s: %v", addr, name, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// obtainedBy reports whether p logged obtaining a certificate from the CA
// (as opposed to loading one another instance stored).
func obtainedBy(p *proc) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, m := range p.logs {
		if m["msg"] == "certificate obtained successfully" {
			return true
		}
	}
	return false
}

// TestBinaryACMEStartup: with [tls.acme] the binary obtains its
// certificate from Pebble at start-up, validated by TLS-ALPN-01 on its own
// implicit-TLS listener, and mail clients trusting Pebble's roots log in on
// both listeners. The expiry is in /metrics.
func TestBinaryACMEStartup(t *testing.T) {
	const name = "imap.test.example"
	p := testenv.StartPebble(t, testenv.PebbleOptions{})
	tlsAddr := fmt.Sprintf("127.0.0.1:%d", p.TLSPort)
	httpAddr := freeAddr(t)
	conf := acmeConfigFile(t, tlsAddr, acmeMemBackend(t), httpAddr, "", fmt.Sprintf(`
names = [%q]
email = %q
directory = %q
ca_root = %q
no_http01 = true
tls_alpn01_port = %d
storage_dir = %q
no_ocsp_stapling = true
renewal_window_ratio = 0.25
renew_check_interval = "1m"
`, name, acmeEmail, p.DirectoryURL, p.CAFile, p.TLSPort, t.TempDir()))

	start := time.Now()
	bin := startBinary(t, "-config", conf)
	bin.waitLog(t, "the certificate obtained", func(m map[string]any) bool {
		return m["msg"] == "certificate obtained successfully" && m["identifier"] == name
	})
	t.Logf("certificate obtained %v after start", time.Since(start).Round(time.Millisecond))
	bin.waitLog(t, "a TLS-ALPN-01 validation on the imaps listener", func(m map[string]any) bool {
		return m["msg"] == "session end" && m["end"] == "acme_challenge" && m["listener"] == "imaps"
	})
	if got := p.Issued(); got != 1 {
		t.Errorf("Pebble issued %d certificates, want 1", got)
	}

	roots := p.IssuerPool(t)
	leaf := servedCert(t, tlsAddr, name, roots)
	if len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != name {
		t.Errorf("served a certificate for %v", leaf.DNSNames)
	}
	clientTLS := &tls.Config{ServerName: name, RootCAs: roots}
	startTLSAddr := ""
	bin.waitLog(t, "the imap listener", func(m map[string]any) bool {
		if m["msg"] == "listening" && m["name"] == "imap" {
			startTLSAddr, _ = m["addr"].(string)
			return true
		}
		return false
	})
	for _, starttls := range []bool{false, true} {
		var c *imapclient.Client
		var err error
		if starttls {
			c, err = imapclient.DialStartTLS(startTLSAddr, &imapclient.Options{TLSConfig: clientTLS})
		} else {
			c, err = imapclient.DialTLS(tlsAddr, &imapclient.Options{TLSConfig: clientTLS})
		}
		if err != nil {
			t.Fatalf("connect (starttls=%v): %v", starttls, err)
		}
		if err := c.Login(acmeUser, acmePass).Wait(); err != nil {
			t.Fatalf("login (starttls=%v): %v", starttls, err)
		}
		if _, err := c.Select("INBOX", nil).Wait(); err != nil {
			t.Fatal(err)
		}
		if err := c.Logout().Wait(); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}

	resp, err := http.Get("http://" + httpAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	want := fmt.Sprintf(`imapgate_tls_certificate_expiry_timestamp_seconds{name=%q,source="acme"}`, name)
	if !strings.Contains(string(body), want) {
		t.Errorf("/metrics lacks %s", want)
	}
}

// TestBinaryACMEConsulShared runs two binaries with storage = "consul"
// against one Pebble and one Consul. Their HTTP-01 servers share the port
// Pebble validates, on 127.0.0.1 and 127.0.0.2: Pebble only reaches the
// first, so if the second wins the issuance lock, its challenge is answered
// by the first from the token in Consul. Pebble issues once and both serve
// the same certificate.
func TestBinaryACMEConsulShared(t *testing.T) {
	const name = "shared.test.example"
	c := testenv.StartConsul(t)
	p := testenv.StartPebble(t, testenv.PebbleOptions{})
	prefix := fmt.Sprintf("imapgate-test/%d", time.Now().UnixNano())
	backend := acmeMemBackend(t)

	// The test holds the issuance lock (CertMagic's "issue_cert_NAME")
	// until both instances wait for it: whichever then wins, every HTTP-01
	// server is up, as in a fleet that has been running for a while. Without
	// the gate, an instance that starts first would order before the one
	// Pebble reaches is listening.
	client, err := api.NewClient(&api.Config{Address: c.HTTPAddr})
	if err != nil {
		t.Fatal(err)
	}
	gate := igtls.NewConsulStorage(client, prefix, nil)
	lock := "issue_cert_" + name
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := gate.Lock(ctx, lock); err != nil {
		t.Fatal(err)
	}
	gated := true
	defer func() {
		if gated {
			gate.Unlock(context.Background(), lock)
		}
	}()

	var bins []*proc
	var addrs []string
	start := time.Now()
	for _, host := range []string{"127.0.0.2", "127.0.0.1"} {
		tlsAddr := freeAddr(t)
		conf := acmeConfigFile(t, tlsAddr, backend, freeAddr(t), fmt.Sprintf("\n[consul]\naddress = %q\n", c.HTTPAddr), fmt.Sprintf(`
names = [%q]
email = %q
directory = %q
ca_root = %q
http01_addr = "%s:%d"
no_tls_alpn01 = true
storage = "consul"
consul_prefix = %q
no_ocsp_stapling = true
`, name, acmeEmail, p.DirectoryURL, p.CAFile, host, p.HTTPPort, prefix))
		bin := startBinary(t, "-config", conf)
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("log of the instance on %s:\n%s", host, bin.dump())
			}
		})
		bins = append(bins, bin)
		addrs = append(addrs, tlsAddr)
	}
	for _, bin := range bins {
		bin.waitLog(t, "waiting for the issuance lock", func(m map[string]any) bool {
			return m["msg"] == "acquiring lock" && m["identifier"] == name
		})
	}
	gated = false
	if err := gate.Unlock(ctx, lock); err != nil {
		t.Fatal(err)
	}

	roots := p.IssuerPool(t)
	var leaves []*x509.Certificate
	for _, addr := range addrs {
		leaves = append(leaves, servedCert(t, addr, name, roots))
	}
	t.Logf("both instances serve the certificate %v after start", time.Since(start).Round(time.Millisecond))

	if got := p.Issued(); got != 1 {
		t.Errorf("Pebble issued %d certificates, want 1", got)
	}
	if !leaves[0].Equal(leaves[1]) {
		t.Errorf("the instances serve different certificates: serials %x and %x", leaves[0].SerialNumber, leaves[1].SerialNumber)
	}
	switch a, b := obtainedBy(bins[0]), obtainedBy(bins[1]); {
	case a && b:
		t.Error("both instances obtained the certificate")
	case !a && !b:
		t.Error("neither instance logged obtaining the certificate")
	case a:
		t.Log("the instance on 127.0.0.2 talked to the CA; its challenge was answered by the other from Consul")
		bins[1].waitLog(t, "a challenge answered from Consul", func(m map[string]any) bool {
			return m["msg"] == "served key authentication" && m["challenge"] == "http-01" && m["distributed"] == true
		})
	default:
		t.Log("the instance on 127.0.0.1 talked to the CA")
	}
	// A login through each, to be sure both are whole proxies.
	for _, addr := range addrs {
		cl, err := imapclient.DialTLS(addr, &imapclient.Options{TLSConfig: &tls.Config{ServerName: name, RootCAs: roots}})
		if err != nil {
			t.Fatal(err)
		}
		if err := cl.Login(acmeUser, acmePass).Wait(); err != nil {
			t.Fatalf("login through %s: %v", addr, err)
		}
		cl.Close()
	}
}

// TestACMEConfigKeys checks the [tls.acme] keys reach the tls package.
func TestACMEConfigKeys(t *testing.T) {
	cfg, err := config.Parse(`
[consul]
address = "127.0.0.1:8500"
[tls.acme]
names = ["imap.example.org"]
on_demand_allow = ["*.mail.example.org"]
renewal_window_ratio = 0.25
renew_check_interval = "90s"
storage = "consul"
consul_prefix = "fleet/acme"
`)
	if err != nil {
		t.Fatal(err)
	}
	a := cfg.TLSOptions().ACME
	if a.RenewalWindowRatio != 0.25 || a.RenewCheckInterval != 90*time.Second {
		t.Errorf("renewal: ratio %v, interval %v", a.RenewalWindowRatio, a.RenewCheckInterval)
	}
	if a.OnDemand == nil || len(a.OnDemand.Allow) != 1 || a.OnDemand.Allow[0] != "*.mail.example.org" {
		t.Errorf("on-demand: %+v", a.OnDemand)
	}
	if a.Storage.Kind != igtls.StorageConsul || a.Storage.Consul.Prefix != "fleet/acme" || a.Storage.Consul.Address != "127.0.0.1:8500" {
		t.Errorf("storage: %+v", a.Storage)
	}
}
