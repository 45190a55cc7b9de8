package main

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/testenv"
)

// TestBinarySessionTicketsSharedByInstances: two imapgate processes
// sharing [tls.session_tickets] (a file, then Consul KV): a client that got
// its ticket from one resumes its TLS session on the other, which is what
// a fleet behind a load balancer needs. A third process with its own keys
// is the control.
func TestBinarySessionTicketsSharedByInstances(t *testing.T) {
	ca := testenv.NewTestCA(t)
	dir := t.TempDir()
	start := func(name, tickets string) string {
		addr := freeAddr(t)
		conf := filepath.Join(dir, name+".toml")
		os.WriteFile(conf, []byte(fmt.Sprintf(`
[log]
format = "json"

[[listen]]
addr = %q
mode = "tls"
name = "imaps"

[tls]
certificates = [{ cert = %q, key = %q }]

%s

[backends.unused]
addr = "127.0.0.1:1"

[routing]
default = ["unused"]

[http]
addr = "off"
`, addr, ca.ServerCertFile, ca.ServerKeyFile, tickets)), 0o600)
		p := startBinary(t, "-config", conf)
		p.waitLog(t, "listening", func(m map[string]any) bool { return m["msg"] == "listening" })
		return addr
	}
	client := &tls.Config{RootCAs: ca.Pool, ServerName: "localhost", ClientSessionCache: tls.NewLRUClientSessionCache(1)}
	resumed := func(addr string) bool {
		t.Helper()
		c, err := tls.Dial("tcp", addr, client)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n') // the ticket arrives with the greeting
		if err != nil || !strings.HasPrefix(line, "* OK") {
			t.Fatalf("greeting from %s: %q, %v", addr, line, err)
		}
		return c.ConnectionState().DidResume
	}
	consul := func() string {
		c := testenv.StartConsul(t)
		return fmt.Sprintf("[consul]\naddress = %q\n\n[tls.session_tickets]\nstore = \"consul\"\n", c.HTTPAddr)
	}
	file := func() string {
		return fmt.Sprintf("[tls.session_tickets]\nstore = \"file\"\nfile = %q\n", filepath.Join(dir, "ticket-keys.json"))
	}
	for _, tc := range []struct {
		name    string
		tickets func() string
	}{{"file", file}, {"consul", consul}} {
		t.Run(tc.name, func(t *testing.T) {
			tickets := tc.tickets()
			a := start(tc.name+"-a", tickets)
			b := start(tc.name+"-b", tickets)
			alone := start(tc.name+"-alone", "[tls.session_tickets]\nstore = \"off\"\n")
			if resumed(a) {
				t.Fatal("the first handshake resumed")
			}
			if !resumed(b) {
				t.Fatal("a ticket from instance a did not resume on instance b")
			}
			if resumed(alone) {
				t.Fatal("a ticket resumed on an instance with its own keys: the test proves nothing")
			}
		})
	}
}
