package tls

import (
	"context"
	stdtls "crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/imapgate/imapgate/internal/testenv"
)

// ticketServer is one "instance": a TLS server on loopback whose ticket
// keys come from a TicketKeys on store. It writes one byte per
// connection, so the client reads the session ticket sent after the
// handshake.
func ticketServer(t *testing.T, cert *stdtls.Certificate, store TicketKeyStore) string {
	t.Helper()
	cfg := &stdtls.Config{Certificates: []stdtls.Certificate{*cert}, MinVersion: stdtls.VersionTLS13}
	tk, err := StartTicketKeys(context.Background(), TicketKeysConfig{Store: store, Apply: cfg.SetSessionTicketKeys}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tk.Close() })
	ln, err := stdtls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	testenv.Accept(t, ln, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write([]byte("*"))
		io.Copy(io.Discard, c)
	})
	return ln.Addr().String()
}

// resumes connects with the client's session cache and reports whether
// the session was resumed.
func resumes(t *testing.T, addr string, cfg *stdtls.Config) bool {
	t.Helper()
	c, err := stdtls.Dial("tcp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var one [1]byte
	if _, err := io.ReadFull(c, one[:]); err != nil { // the ticket comes with it
		t.Fatal(err)
	}
	return c.ConnectionState().DidResume
}

func TestTicketKeysResumeOnAnotherInstance(t *testing.T) {
	cert, err := generateSelfSigned([]string{"localhost"})
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert.Leaf)
	consulStore := func(t *testing.T) TicketKeyStore {
		c := testenv.StartConsul(t)
		client, err := api.NewClient(&api.Config{Address: c.HTTPAddr})
		if err != nil {
			t.Fatal(err)
		}
		return &ConsulTicketStore{KV: client.KV(), Key: DefaultConsulTicketKey}
	}
	fileStore := func(t *testing.T) TicketKeyStore {
		return &FileTicketStore{Path: filepath.Join(t.TempDir(), "ticket-keys.json")}
	}
	for _, tc := range []struct {
		name  string
		store func(t *testing.T) TicketKeyStore
	}{{"consul", consulStore}, {"file", fileStore}} {
		t.Run(tc.name, func(t *testing.T) {
			store := tc.store(t)
			a := ticketServer(t, cert, store)
			b := ticketServer(t, cert, store)
			// An instance with keys of its own: the control that shows a
			// resumption on b is the shared keys' doing.
			alone := ticketServer(t, cert, fileStore(t))

			client := &stdtls.Config{RootCAs: pool, ServerName: "localhost", ClientSessionCache: stdtls.NewLRUClientSessionCache(1)}
			if resumes(t, a, client) {
				t.Fatal("first handshake resumed: the client had no ticket")
			}
			if !resumes(t, b, client) {
				t.Fatal("a ticket from instance a did not resume on instance b")
			}
			if resumes(t, alone, client) {
				t.Fatal("a ticket resumed on an instance with other keys: the test proves nothing")
			}
		})
	}
}

// TestTicketKeysRotation walks a fake clock through rotations: a new key
// opens tickets before it seals any, old keys keep opening until Keep
// pushes them out, and two instances agree on the keys.
func TestTicketKeysRotation(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	store := &FileTicketStore{Path: filepath.Join(t.TempDir(), "keys.json")}
	var gotA, gotB [][32]byte
	start := func(apply func([][32]byte)) *TicketKeys {
		tk, err := StartTicketKeys(context.Background(), TicketKeysConfig{
			Store: store, Rotation: time.Hour, Keep: 3, Refresh: time.Hour, Lead: 2 * time.Minute, Apply: apply, now: clock,
		}, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tk.Close() })
		return tk
	}
	a := start(func(k [][32]byte) { gotA = k })
	b := start(func(k [][32]byte) { gotB = k })
	if len(gotA) != 1 || len(gotB) != 1 || gotA[0] != gotB[0] {
		t.Fatalf("after start: a %d keys, b %d keys, same first: %v", len(gotA), len(gotB), len(gotA) > 0 && len(gotB) > 0 && gotA[0] == gotB[0])
	}
	first := gotA[0]
	ctx := context.Background()

	now = now.Add(time.Hour) // due: a adds the next key, not yet sealing
	if err := a.sync(ctx); err != nil {
		t.Fatal(err)
	}
	if err := b.sync(ctx); err != nil {
		t.Fatal(err)
	}
	if len(gotA) != 2 || gotA[0] != first || gotB[0] != first || gotA[1] != gotB[1] {
		t.Fatalf("within the lead: want the old key sealing and the new one opening on both, got a=%x b=%x", gotA, gotB)
	}
	second := gotA[1]

	now = now.Add(3 * time.Minute) // past the lead: the new key seals
	a.sync(ctx)
	if gotA[0] != second || len(gotA) != 2 || gotA[1] != first {
		t.Fatalf("after the lead: want the new key sealing and the old one opening, got %x", gotA)
	}

	for range 3 {
		now = now.Add(time.Hour)
		a.sync(ctx)
	}
	if len(gotA) != 3 {
		t.Fatalf("keep 3: got %d keys", len(gotA))
	}
	for _, k := range gotA {
		if k == first {
			t.Fatal("the first key is still accepted after Keep rotations")
		}
	}
}
