package testenv

import (
	"context"
	"net"
	"net/http"
	"slices"
	"testing"
	"time"
)

func TestPebble(t *testing.T) {
	p := StartPebble(t, PebbleOptions{})

	resp, err := p.httpClient().Get(p.DirectoryURL)
	if err != nil {
		t.Fatalf("GET directory: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET directory: %s", resp.Status)
	}
	if pool := p.IssuerPool(t); pool.Equal(nil) {
		t.Fatal("empty issuer pool")
	}
	if p.HTTPPort == 0 || p.TLSPort == 0 || p.HTTPPort == p.TLSPort {
		t.Errorf("validation ports %d, %d", p.HTTPPort, p.TLSPort)
	}

	// challtestsrv is Pebble's DNS: every name is 127.0.0.1, TXT on demand.
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, p.DNSAddr)
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	addrs, err := r.LookupHost(ctx, "mail.test.example")
	if err != nil || !slices.Equal(addrs, []string{"127.0.0.1"}) {
		t.Errorf("mail.test.example resolves to %v, %v; want [127.0.0.1]", addrs, err)
	}
	if err := p.SetTXT("_acme-challenge.mail.test.example", "token"); err != nil {
		t.Fatal(err)
	}
	txt, err := r.LookupTXT(ctx, "_acme-challenge.mail.test.example")
	if err != nil || !slices.Equal(txt, []string{"token"}) {
		t.Errorf("TXT = %v, %v; want [token]", txt, err)
	}
	if err := p.ClearTXT("_acme-challenge.mail.test.example"); err != nil {
		t.Fatal(err)
	}
	if n := p.Issued(); n != 0 {
		t.Errorf("Issued() = %d before any order", n)
	}
}
