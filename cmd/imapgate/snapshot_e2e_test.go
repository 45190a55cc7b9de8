package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/imapgate/imapgate/internal/testenv"
)

// waitUntilSnap polls cond every 50ms until it holds or timeout passes.
func waitUntilSnap(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(timeout); !cond(); {
		if time.Now().After(end) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestBinaryConsulSnapshot: the binary started with Consul up writes its
// snapshot; restarted while Consul is down it starts from it (instead of
// exiting, TestBinaryConsulUnreachable's case without a snapshot), routes
// a known user to the same backend, and /readyz and the metrics say it is
// degraded; when Consul returns it catches up and registers.
func TestBinaryConsulSnapshot(t *testing.T) {
	consul, client := consulWithBackends(t)
	dir := t.TempDir()
	snap := filepath.Join(dir, "state", "consul-snapshot.json")
	imapAddr, httpAddr := freeAddr(t), freeAddr(t)
	conf := filepath.Join(dir, "imapgate.toml")
	os.WriteFile(conf, []byte(fmt.Sprintf(`
[log]
format = "json"

[[listen]]
addr = %q
mode = "starttls"
name = "imap"
insecure_auth = ["127.0.0.0/8"]

[routing]
router = "consul"

[consul]
address = %q
service = "imap"
snapshot_file = %q
snapshot_max_age = "1h"

[consul.register]
enable = true
id = "snaptest"

[limits]
auth_failure_delay = "-1s"

[http]
addr = %q

[shutdown]
drain_window = "200ms"
grace = "1s"
`, imapAddr, consul.HTTPAddr, snap, httpAddr)), 0o600)
	bin := opsBinary(t)
	readyz := "http://" + httpAddr + "/readyz"
	alice := func() string {
		t.Helper()
		c, err := opsDial(imapAddr, false)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		b, err := c.backend("alice@example.org", testUsers["alice@example.org"])
		if err != nil {
			t.Fatal(err)
		}
		return b
	}

	p := startOps(t, bin, "-config", conf)
	waitHTTP(t, readyz, 30*time.Second)
	if body := fetchText(t, readyz); body != "ready\n" {
		t.Errorf("/readyz with Consul up: %q", body)
	}
	home := alice()
	p.signal(syscall.SIGTERM)
	p.wait(t, 30*time.Second)
	data, err := os.ReadFile(snap)
	if err != nil || !strings.Contains(string(data), `"alice@example.org"`) {
		t.Fatalf("after a clean stop the snapshot (%v) does not hold alice:\n%.500s", err, data)
	}

	consul.Stop(t)
	p2 := startOps(t, bin, "-config", conf)
	p2.waitLog(t, 30*time.Second, "DEGRADED", "serving from the snapshot")
	waitHTTP(t, readyz, 30*time.Second)
	if body := fetchText(t, readyz); !strings.HasPrefix(body, "degraded: serving from a snapshot of ") {
		t.Errorf("/readyz serving from a snapshot: %q", body)
	}
	if page := fetchText(t, "http://"+httpAddr+"/"); !strings.Contains(page, "degraded: serving from a snapshot of ") {
		t.Errorf("the status page does not say degraded:\n%.2000s", page)
	}
	metrics := fetchText(t, "http://"+httpAddr+"/metrics")
	if v, ok := metricValue(metrics, "imapgate_consul_degraded"); !ok || v != 1 {
		t.Errorf("imapgate_consul_degraded = %v (found %v), want 1", v, ok)
	}
	if v, ok := metricValue(metrics, "imapgate_consul_snapshot_age_seconds"); !ok || v <= 0 {
		t.Errorf("imapgate_consul_snapshot_age_seconds = %v (found %v), want > 0", v, ok)
	}
	if got := alice(); got != home {
		t.Errorf("from the snapshot alice reached %s, want %s", got, home)
	}

	// Consul returns: the router catches up, /readyz says ready, and the
	// registration that failed at start-up is made.
	consul.Start(t)
	waitUntilSnap(t, 30*time.Second, "/readyz to say ready", func() bool { return fetchText(t, readyz) == "ready\n" })
	waitUntilSnap(t, 30*time.Second, "the registration", func() bool {
		svcs, err := client.Agent().Services()
		return err == nil && svcs["snaptest-imap"] != nil
	})
	if got := alice(); got != home {
		t.Errorf("after Consul returned alice reached %s, want %s", got, home)
	}
	p2.signal(syscall.SIGTERM)
	p2.wait(t, 30*time.Second)
}

// consulWithBackends starts a Consul with two in-memory backends, b1 and
// b2, registered as service "imap" with TCP checks, and returns it with
// a client.
func consulWithBackends(t *testing.T) (*testenv.Consul, *api.Client) {
	t.Helper()
	consul := testenv.StartConsul(t)
	cfg := api.DefaultConfig()
	cfg.Address = consul.HTTPAddr
	client, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cfg.Transport.CloseIdleConnections)
	for _, name := range []string{"b1", "b2"} {
		addr := opsBackend(t, name, testUsers)
		_, port, _ := net.SplitHostPort(addr)
		n, _ := strconv.Atoi(port)
		err := client.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: name, Name: "imap", Address: "127.0.0.1", Port: n,
			Check: &api.AgentServiceCheck{TCP: addr, Interval: "1s", Timeout: "500ms", Status: api.HealthPassing},
		})
		if err != nil {
			t.Fatal(err)
		}
	}

	return consul, client
}
