package testenv

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Consul is a single-server Consul agent started by StartConsul.
//
// It is a real server (not -dev): its state lives in DataDir on disk, so KV
// entries, services and sessions survive Stop and Start, as they would in
// an outage of a production cluster. -dev keeps everything in memory and
// would come back empty.
type Consul struct {
	HTTPAddr string // "127.0.0.1:PORT" of the HTTP API
	DNSAddr  string // "127.0.0.1:PORT", UDP and TCP
	DataDir  string // Raft and Serf state, kept across restarts

	dir, conf, node string

	mu   sync.Mutex
	proc *process // nil while stopped
}

// consulStartTimeout bounds the wait for a leader. A fresh single server
// elects itself in one or two seconds, a restarted one after its election
// timeout; a minute leaves room for a loaded CI machine.
const consulStartTimeout = 60 * time.Second

// StartConsul starts a one-node Consul server on loopback ports chosen by
// the test (HTTP, DNS, Serf LAN and WAN, server RPC, gRPC) and returns once
// it has a leader and has registered itself in the catalog. t.Cleanup
// stops it.
func StartConsul(t testing.TB) *Consul {
	t.Helper()
	Need(t, "consul")
	dir := t.TempDir()
	// Serf and DNS listen on UDP as well as TCP, so all ports are checked
	// for both.
	ports, err := freePorts(6, true)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	c := &Consul{
		HTTPAddr: net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0])),
		DNSAddr:  net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[1])),
		DataDir:  filepath.Join(dir, "data"),
		dir:      dir,
		conf:     filepath.Join(dir, "consul.json"),
		node:     "imapgate-test-" + strconv.Itoa(ports[0]),
	}
	conf := map[string]any{
		"server":           true,
		"bootstrap_expect": 1,
		"node_name":        c.node,
		"datacenter":       "dc1",
		"data_dir":         c.DataDir,
		"bind_addr":        "127.0.0.1",
		"client_addr":      "127.0.0.1",
		"advertise_addr":   "127.0.0.1",
		"log_level":        "INFO",
		"ports": map[string]int{
			"http": ports[0], "dns": ports[1], "serf_lan": ports[2],
			"serf_wan": ports[3], "server": ports[4], "grpc": ports[5],
			"https": -1,
		},
		// Production Raft timings are five times slower; 1 is what -dev
		// uses, and makes elections after a restart take about a second.
		"performance":          map[string]any{"raft_multiplier": 1},
		"disable_update_check": true,
		// A single server that left the cluster on shutdown could not
		// elect itself again.
		"leave_on_terminate":      false,
		"skip_leave_on_interrupt": true,
		// Every imapgate in a test talks from 127.0.0.1 with blocking
		// queries; the default of 200 connections per client IP is too
		// few for load tests.
		"limits":    map[string]any{"http_max_conns_per_client": 10000},
		"ui_config": map[string]any{"enabled": false},
	}
	b, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	if err := os.WriteFile(c.conf, b, 0o600); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(func() { c.Stop(t) })
	c.Start(t)
	return c
}

// Start starts the agent (again) on the same ports and data directory and
// waits until there is a leader and the node is in the catalog. Starting a
// running agent is a test bug and fails the test.
func (c *Consul) Start(t testing.TB) {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.proc != nil {
		t.Fatalf("testenv: Consul %s is already running", c.HTTPAddr)
	}
	out, err := os.OpenFile(c.logFile(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	defer out.Close()
	cmd := exec.Command(Bin("consul"), "agent", "-config-file", c.conf)
	cmd.Stdout, cmd.Stderr = out, out
	start := time.Now()
	p, err := startProcess(cmd)
	if err != nil {
		t.Fatalf("testenv: start consul: %v", err)
	}
	c.proc = p
	if err := waitFor(p, consulStartTimeout, c.ready); err != nil {
		_ = p.stop(syscall.SIGKILL, 0)
		c.proc = nil
		t.Fatalf("testenv: consul on %s did not start: %v\n%s", c.HTTPAddr, err, c.Log())
	}
	t.Logf("testenv: consul on %s ready in %v", c.HTTPAddr, time.Since(start).Round(time.Millisecond))
}

// Stop stops the agent without leaving the cluster (so it can lead again
// after Start) and waits until the process is gone. Stopping a stopped
// agent does nothing.
func (c *Consul) Stop(t testing.TB) {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.proc == nil {
		return
	}
	p := c.proc
	c.proc = nil
	if err := p.stop(syscall.SIGTERM, 15*time.Second); err != nil {
		t.Errorf("testenv: stop consul on %s: %v", c.HTTPAddr, err)
	}
}

// Log returns everything the agent printed, across restarts.
func (c *Consul) Log() string { return readFile(c.logFile()) }

func (c *Consul) logFile() string { return filepath.Join(c.dir, "consul.log") }

// ready reports nil once a leader is known and this node is registered in
// the catalog. The catalog check matters: right after an election the
// leader is still establishing itself, and writes fail with "No cluster
// leader" until it has; a consistent catalog read succeeds only after.
func (c *Consul) ready() error {
	var leader string
	if err := c.get("/v1/status/leader", &leader); err != nil {
		return err
	}
	if leader == "" {
		return fmt.Errorf("no leader yet")
	}
	// The answer is null until the node is registered.
	var node *struct{ Node struct{ Node string } }
	if err := c.get("/v1/catalog/node/"+c.node+"?consistent", &node); err != nil {
		return err
	}
	if node == nil || node.Node.Node != c.node {
		return fmt.Errorf("node %s not in the catalog yet", c.node)
	}
	return nil
}

var consulHTTP = &http.Client{Timeout: 2 * time.Second}

func (c *Consul) get(path string, v any) error {
	resp, err := consulHTTP.Get("http://" + c.HTTPAddr + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %s", path, resp.Status, body)
	}
	return json.Unmarshal(body, v)
}
