package testenv

import (
	"bytes"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// recorder stands in for a test so that Need's skip and failure can be
// observed without ending this test.
type recorder struct {
	testing.TB
	fatal, skip string
}

func (r *recorder) Helper()                        {}
func (r *recorder) Fatalf(format string, a ...any) { r.fatal = format }
func (r *recorder) Skipf(format string, a ...any)  { r.skip = format }

func TestNeed(t *testing.T) {
	t.Setenv("IMAPGATE_CACHE", t.TempDir())
	t.Setenv("PATH", t.TempDir())
	tests := []struct {
		ci        string
		wantFatal bool
	}{
		{ci: "", wantFatal: false},
		{ci: "true", wantFatal: true},
		{ci: "1", wantFatal: true},
	}
	for _, tt := range tests {
		t.Run("CI="+tt.ci, func(t *testing.T) {
			t.Setenv("CI", tt.ci)
			r := &recorder{TB: t}
			Need(r, "no-such-binary-for-testenv")
			if got := r.fatal != ""; got != tt.wantFatal {
				t.Fatalf("fatal=%q skip=%q, want fatal %v", r.fatal, r.skip, tt.wantFatal)
			}
			if got := r.fatal != "" || r.skip != ""; !got {
				t.Fatal("neither skipped nor failed")
			}
		})
	}
	t.Run("present", func(t *testing.T) {
		t.Setenv("CI", "true")
		writeExe(t, filepath.Join(os.Getenv("IMAPGATE_CACHE"), "bin", "pebble"))
		r := &recorder{TB: t}
		Need(r, "pebble")
		if r.fatal != "" || r.skip != "" {
			t.Fatalf("fatal=%q skip=%q", r.fatal, r.skip)
		}
	})
}

func writeExe(t *testing.T, name string) string {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(name), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(name, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return name
}

func TestBin(t *testing.T) {
	cache, path := t.TempDir(), t.TempDir()
	t.Setenv("IMAPGATE_CACHE", cache)
	t.Setenv("PATH", path)
	t.Setenv("IMAPGATE_CONSUL", "")

	cachedConsul := writeExe(t, filepath.Join(cache, "bin", "consul-"+ConsulVersion))
	pathConsul := writeExe(t, filepath.Join(path, "consul"))
	pathPebble := writeExe(t, filepath.Join(path, "pebble"))
	cachedChall := writeExe(t, filepath.Join(cache, "bin", "pebble-challtestsrv"))
	// On PATH too, but the cache wins.
	writeExe(t, filepath.Join(path, "pebble-challtestsrv"))
	pathDovecot := writeExe(t, filepath.Join(path, "dovecot"))
	envConsul := writeExe(t, filepath.Join(t.TempDir(), "my-consul"))
	// Not executable, so not found.
	if err := os.WriteFile(filepath.Join(cache, "bin", "pebble"), nil, 0o644); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name, env, want string
	}{
		{name: "consul", want: cachedConsul},
		{name: "consul", env: envConsul, want: envConsul},
		{name: "pebble", want: pathPebble},
		{name: "pebble-challtestsrv", want: cachedChall},
		{name: "dovecot", want: pathDovecot},
		{name: "no-such-binary", want: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name+" "+tt.env, func(t *testing.T) {
			t.Setenv("IMAPGATE_CONSUL", tt.env)
			if got := Bin(tt.name); got != tt.want {
				t.Errorf("Bin(%q) = %q, want %q", tt.name, got, tt.want)
			}
		})
	}

	os.Remove(cachedConsul)
	if got := Bin("consul"); got != pathConsul {
		t.Errorf("without a cached consul: Bin = %q, want %q", got, pathConsul)
	}
}

func TestFreePort(t *testing.T) {
	seen := map[int]bool{}
	for range 20 {
		p := FreePort(t)
		if p <= 0 || p > 65535 {
			t.Fatalf("port %d", p)
		}
		seen[p] = true
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			t.Fatalf("FreePort gave %d, which is not free: %v", p, err)
		}
		l.Close()
	}
	if len(seen) < 10 {
		t.Errorf("only %d distinct ports in 20 calls", len(seen))
	}
	ports, err := freePorts(6, true)
	if err != nil {
		t.Fatal(err)
	}
	distinct := map[int]bool{}
	for _, p := range ports {
		distinct[p] = true
	}
	if len(distinct) != 6 {
		t.Fatalf("freePorts(6) = %v", ports)
	}
}

func TestNewTestCA(t *testing.T) {
	ca := NewTestCA(t)
	leaf, err := x509.ParseCertificate(ca.ServerCert.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"localhost", "127.0.0.1", "::1"} {
		if _, err := leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: ca.Pool}); err != nil {
			t.Errorf("verify for %s: %v", name, err)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "example.org", Roots: ca.Pool}); err == nil {
		t.Error("certificate verifies for example.org")
	}
	if b, err := os.ReadFile(ca.CAFile); err != nil || !bytes.Equal(b, ca.CertPEM) {
		t.Errorf("CAFile: %v", err)
	}
	for _, f := range []string{ca.ServerCertFile, ca.ServerKeyFile} {
		if b, err := os.ReadFile(f); err != nil || !strings.Contains(string(b), "-----BEGIN") {
			t.Errorf("%s: %v", f, err)
		}
	}
	if other := NewTestCA(t); other.Pool.Equal(ca.Pool) {
		t.Error("two CAs are the same")
	}
}
