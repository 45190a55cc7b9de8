package tls

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	stdtls "crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// testCA issues leaf certificates for tests.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newTestCA(t testing.TB) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "imapgate test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool}
}

var serialCounter int64 = 100

// writeLeaf issues a certificate for names and writes it and its key as
// PEM into dir/base.pem and dir/base.key (by rename, as certbot does).
func (ca *testCA) writeLeaf(t testing.TB, dir, base string, names ...string) CertFile {
	t.Helper()
	return ca.writeLeafValid(t, dir, base, time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour), names...)
}

// writeLeafValid is writeLeaf with a given validity.
func (ca *testCA) writeLeafValid(t testing.TB, dir, base string, notBefore, notAfter time.Time, names ...string) CertFile {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serialCounter++
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serialCounter),
		Subject:      pkix.Name{CommonName: names[0]},
		DNSNames:     names,
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	cf := CertFile{CertFile: filepath.Join(dir, base+".pem"), KeyFile: filepath.Join(dir, base+".key")}
	writeFileAtomic(t, cf.CertFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	writeFileAtomic(t, cf.KeyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}))
	return cf
}

func writeFileAtomic(t testing.TB, path string, data []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// handshake runs a TLS handshake between server and client over an
// in-memory pipe and returns the client's view of it.
func handshake(t testing.TB, server, client *stdtls.Config) (stdtls.ConnectionState, error) {
	t.Helper()
	cc, sc := net.Pipe()
	defer cc.Close()
	done := make(chan error, 1)
	go func() {
		defer sc.Close()
		s := stdtls.Server(sc, server)
		err := s.Handshake()
		if err == nil {
			// Let the client read the session tickets TLS 1.3 sends after
			// the handshake before the pipe closes.
			_, _ = io.Copy(io.Discard, s)
		}
		done <- err
	}()
	c := stdtls.Client(cc, client)
	err := c.Handshake()
	st := c.ConnectionState()
	c.Close()
	<-done
	return st, err
}

// leafNames returns the DNS names of the certificate the server presented.
func leafNames(st stdtls.ConnectionState) []string {
	if len(st.PeerCertificates) == 0 {
		return nil
	}
	return st.PeerCertificates[0].DNSNames
}
