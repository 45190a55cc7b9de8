package tls

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/imapgate/imapgate/internal/testenv"
)

func consulClient(t *testing.T, c *testenv.Consul) *api.Client {
	t.Helper()
	client, err := api.NewClient(&api.Config{Address: c.HTTPAddr})
	if err != nil {
		t.Fatal(err)
	}
	return client
}

func TestConsulStorage(t *testing.T) {
	c := testenv.StartConsul(t)
	client := consulClient(t, c)
	s := NewConsulStorage(client, "/test/storage/", nil)
	ctx := context.Background()

	if _, err := s.Load(ctx, "nope"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load of a missing key: %v, want fs.ErrNotExist", err)
	}
	if _, err := s.Stat(ctx, "nope"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Stat of a missing key: %v, want fs.ErrNotExist", err)
	}
	if _, err := s.List(ctx, "nope", true); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("List of a missing prefix: %v, want fs.ErrNotExist", err)
	}

	before := time.Now()
	for _, k := range []string{"certificates/ca/a/a.crt", "certificates/ca/a/a.key", "certificates/ca/b/b.crt", "acme/account.json"} {
		if err := s.Store(ctx, k, []byte("value of "+k)); err != nil {
			t.Fatal(err)
		}
	}
	got, err := s.Load(ctx, "certificates/ca/a/a.crt")
	if err != nil || string(got) != "value of certificates/ca/a/a.crt" {
		t.Errorf("Load: %q, %v", got, err)
	}
	ki, err := s.Stat(ctx, "certificates/ca/a/a.key")
	if err != nil || !ki.IsTerminal || ki.Size != int64(len("value of certificates/ca/a/a.key")) || ki.Modified.Before(before.Add(-time.Second)) {
		t.Errorf("Stat of a value: %+v, %v", ki, err)
	}
	if ki, err := s.Stat(ctx, "certificates/ca"); err != nil || ki.IsTerminal {
		t.Errorf("Stat of a prefix: %+v, %v", ki, err)
	}
	if !s.Exists(ctx, "certificates/ca/b") || s.Exists(ctx, "certificates/ca/c") {
		t.Error("Exists is wrong")
	}
	direct, err := s.List(ctx, "certificates/ca", false)
	if err != nil || !slices.Equal(direct, []string{"certificates/ca/a", "certificates/ca/b"}) {
		t.Errorf("List: %v, %v", direct, err)
	}
	all, err := s.List(ctx, "certificates", true)
	if want := []string{"certificates/ca/a/a.crt", "certificates/ca/a/a.key", "certificates/ca/b/b.crt"}; err != nil || !slices.Equal(all, want) {
		t.Errorf("recursive List: %v, %v; want %v", all, err, want)
	}
	if err := s.Delete(ctx, "certificates/ca/a"); err != nil {
		t.Fatal(err)
	}
	if s.Exists(ctx, "certificates/ca/a/a.crt") || !s.Exists(ctx, "certificates/ca/b/b.crt") {
		t.Error("Delete of a prefix removed the wrong keys")
	}
	// Everything lives under the prefix.
	if keys, _, err := client.KV().Keys("", "", nil); err != nil || !slices.ContainsFunc(keys, func(k string) bool { return k == "test/storage/acme/account.json" }) {
		t.Errorf("KV keys %v, %v", keys, err)
	}
}

func TestConsulStorageLock(t *testing.T) {
	c := testenv.StartConsul(t)
	client := consulClient(t, c)
	// Two instances sharing one prefix.
	s1 := NewConsulStorage(client, "test/lock", nil)
	s2 := NewConsulStorage(client, "test/lock", nil)
	ctx := context.Background()

	if err := s1.Lock(ctx, "issue_cert_mail.test.example"); err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() { got <- s2.Lock(ctx, "issue_cert_mail.test.example") }()
	select {
	case err := <-got:
		t.Fatalf("second Lock returned while the first is held: %v", err)
	case <-time.After(500 * time.Millisecond):
	}

	// A waiter whose context ends gives up promptly.
	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := NewConsulStorage(client, "test/lock", nil).Lock(short, "issue_cert_mail.test.example"); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Lock with an expiring context: %v", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Lock took %v to notice its context ended", d)
	}

	// Another name is independent.
	if err := s2.Lock(ctx, "issue_cert_other.test.example"); err != nil {
		t.Fatal(err)
	}
	if err := s2.Unlock(ctx, "issue_cert_other.test.example"); err != nil {
		t.Fatal(err)
	}

	start = time.Now()
	if err := s1.Unlock(ctx, "issue_cert_mail.test.example"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("the waiter got the lock %v after Unlock", time.Since(start).Round(time.Millisecond))
	case <-time.After(5 * time.Second):
		t.Fatal("the waiter did not get the lock 5 s after Unlock")
	}
	if err := s2.Unlock(ctx, "issue_cert_mail.test.example"); err != nil {
		t.Fatal(err)
	}
	if err := s2.Unlock(ctx, "issue_cert_mail.test.example"); err == nil {
		t.Error("Unlock of a lock not held succeeded")
	}
	// Unlock destroyed the sessions.
	deadline := time.Now().Add(5 * time.Second)
	for {
		sessions, _, err := client.Session().List(nil)
		if err != nil {
			t.Fatal(err)
		}
		if len(sessions) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions left after every lock was released", len(sessions))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestACMEConsulShared runs two Managers against one Pebble with one Consul
// storage: one issuance, and both serve the same certificate.
//
// Pebble validates HTTP-01 on 127.0.0.1, where only instance A listens;
// instance B's challenge server is on 127.0.0.2, so if B wins the lock, A
// answers B's challenge. (In one process that goes through CertMagic's
// in-memory challenge map; TestACMEConsulDistributedChallenge proves the
// path through Consul with two processes.)
func TestACMEConsulShared(t *testing.T) {
	c := testenv.StartConsul(t)
	p := testenv.StartPebble(t, testenv.PebbleOptions{})
	client := consulClient(t, c)
	prefix := fmt.Sprintf("imapgate-test/%d", time.Now().UnixNano())

	cfgFor := func(host string) Config {
		cfg := acmeTestConfig(t, p, "shared.test.example")
		cfg.HTTP01.Addr = fmt.Sprintf("%s:%d", host, p.HTTPPort)
		cfg.Storage = StorageConfig{Kind: StorageConsul, Consul: ConsulStorageConfig{Client: client, Prefix: prefix}}
		return Config{ACME: cfg}
	}
	start := time.Now()
	b, logsB := newACMEManagerLogs(t, cfgFor("127.0.0.2"))
	a, logsA := newACMEManagerLogs(t, cfgFor("127.0.0.1"))
	ea := waitACME(t, a, "shared.test.example", time.Time{}, 60*time.Second)
	eb := waitACME(t, b, "shared.test.example", time.Time{}, 60*time.Second)
	t.Logf("both instances have the certificate after %v", time.Since(start).Round(time.Millisecond))

	winner := "A"
	if logsB.FilterMessage("certificate obtained successfully").Len() > 0 {
		winner = "B (its challenge answered by A)"
	}
	t.Logf("instance %s talked to the CA", winner)
	if n := logsA.FilterMessage("certificate obtained successfully").Len() + logsB.FilterMessage("certificate obtained successfully").Len(); n != 1 {
		t.Errorf("%d instances obtained the certificate, want 1", n)
	}
	if got := p.Issued(); got != 1 {
		t.Errorf("Pebble issued %d certificates, want 1", got)
	}
	if !ea.NotAfter.Equal(eb.NotAfter) {
		t.Errorf("instances serve certificates expiring %v and %v", ea.NotAfter, eb.NotAfter)
	}

	roots := p.IssuerPool(t)
	ca := dialVerified(t, echoServer(t, a.ServerConfig()), "shared.test.example", roots)
	cb := dialVerified(t, echoServer(t, b.ServerConfig()), "shared.test.example", roots)
	if sa, sb := leafOf(ca).SerialNumber, leafOf(cb).SerialNumber; sa.Cmp(sb) != 0 {
		t.Errorf("A serves serial %x, B serves %x", sa, sb)
	}
	if keys, _, err := client.KV().Keys(prefix+"/certificates/", "", nil); err != nil || len(keys) == 0 {
		t.Errorf("no certificate under %s in Consul: %v", prefix, err)
	}

}

// The helper process of TestACMEConsulDistributedChallenge: an imapgate
// instance whose HTTP-01 server answers challenges it finds in Consul.
const helperEnv = "IMAPGATE_TLS_TEST_HELPER"

// TestACMEConsulDistributedChallenge runs instance A in another process (so
// nothing is shared in memory) with its HTTP-01 server where Pebble
// validates, and instance C in this one with its server where Pebble cannot
// reach. C obtains a certificate: its challenge can only be answered by A,
// from the token C stored in Consul.
func TestACMEConsulDistributedChallenge(t *testing.T) {
	if os.Getenv(helperEnv) != "" {
		runChallengeHelper()
		return
	}
	c := testenv.StartConsul(t)
	p := testenv.StartPebble(t, testenv.PebbleOptions{})
	prefix := fmt.Sprintf("imapgate-test/%d", time.Now().UnixNano())

	cmd := exec.Command(os.Args[0], "-test.run=^TestACMEConsulDistributedChallenge$")
	cmd.Env = append(os.Environ(), helperEnv+"=1",
		"HELPER_CONSUL="+c.HTTPAddr, "HELPER_PREFIX="+prefix,
		"HELPER_DIRECTORY="+p.DirectoryURL, "HELPER_CAFILE="+p.CAFile,
		fmt.Sprintf("HELPER_HTTP01=127.0.0.1:%d", p.HTTPPort))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr syncBuf
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	helperDone := make(chan error, 1)
	go func() { _, _ = io.Copy(io.Discard, stdout); helperDone <- cmd.Wait() }()
	t.Cleanup(func() {
		stdin.Close() // the helper exits when its stdin closes
		select {
		case <-helperDone:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-helperDone
		}
		if t.Failed() {
			t.Logf("helper output:\n%s", stderr.String())
		}
	})
	// The helper is ready when its HTTP-01 server answers.
	deadline := time.Now().Add(30 * time.Second)
	for {
		conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", p.HTTPPort))
		if err == nil {
			conn.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("helper not listening after 30 s:\n%s", stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}

	cfg := acmeTestConfig(t, p, "fleet.test.example")
	cfg.HTTP01.Addr = fmt.Sprintf("127.0.0.3:%d", p.HTTPPort)
	cfg.Storage = StorageConfig{Kind: StorageConsul, Consul: ConsulStorageConfig{Client: consulClient(t, c), Prefix: prefix}}
	start := time.Now()
	m := newACMEManager(t, Config{ACME: cfg})
	waitACME(t, m, "fleet.test.example", time.Time{}, 60*time.Second)
	t.Logf("issued through the other process's challenge server in %v", time.Since(start).Round(time.Millisecond))
	dialVerified(t, echoServer(t, m.ServerConfig()), "fleet.test.example", p.IssuerPool(t))
	if !strings.Contains(stderr.String(), `"distributed": true`) {
		t.Errorf("the helper did not log answering a distributed challenge")
	}
}

// runChallengeHelper is instance A: ACME on, nothing to obtain (on-demand
// for a name no one asks for), HTTP-01 server on, until stdin closes.
func runChallengeHelper() {
	log, _ := zap.NewDevelopment()
	client, err := api.NewClient(&api.Config{Address: os.Getenv("HELPER_CONSUL")})
	if err != nil {
		log.Fatal("consul", zap.Error(err))
	}
	m, err := New(context.Background(), Config{ACME: ACMEConfig{
		OnDemand:            &OnDemandConfig{Allow: []string{"never.test.example"}},
		DirectoryURL:        os.Getenv("HELPER_DIRECTORY"),
		CARootFile:          os.Getenv("HELPER_CAFILE"),
		HTTP01:              HTTP01Config{Addr: os.Getenv("HELPER_HTTP01")},
		TLSALPN01:           TLSALPN01Config{Disable: true},
		Storage:             StorageConfig{Kind: StorageConsul, Consul: ConsulStorageConfig{Client: client, Prefix: os.Getenv("HELPER_PREFIX")}},
		DisableOCSPStapling: true,
	}}, log)
	if err != nil {
		log.Fatal("New", zap.Error(err))
	}
	_, _ = io.Copy(io.Discard, os.Stdin)
	m.Close()
}

// syncBuf collects a child's output for the test to read while it runs.
type syncBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
