package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/imapgate/imapgate/internal/ctl"
)

// TestBinaryCtlAnnounce: the operator story of consul.users_watch =
// "feed" through the binary. A placement changed by hand (`consul kv
// put`) is announced with `imapgate ctl announce`: the session on the old
// backend closes and the next login lands on the new one. With Consul
// down the announce fails with the API's 503 and exit status 1, and says
// why.
func TestBinaryCtlAnnounce(t *testing.T) {
	consul, client := consulWithBackends(t) // snapshot_e2e_test.go
	dir := t.TempDir()
	imapAddr, httpAddr := freeAddr(t), freeAddr(t)
	conf := filepath.Join(dir, "imapgate.toml")
	os.WriteFile(conf, []byte(fmt.Sprintf(`
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
users_watch = "feed"

[limits]
auth_failure_delay = "-1s"

[http]
addr = %q
admin_token = %q

[shutdown]
drain_window = "200ms"
grace = "1s"
`, imapAddr, consul.HTTPAddr, httpAddr, testToken)), 0o600)
	p := startOps(t, opsBinary(t), "-config", conf)
	waitHTTP(t, "http://"+httpAddr+"/readyz", 30*time.Second)
	announce := func(user string) (int, string) {
		var out, errb bytes.Buffer
		code := ctl.Main([]string{"-addr", "http://" + httpAddr, "-token", testToken, "announce", user}, &out, &errb)
		return code, out.String() + errb.String()
	}

	const user = "alice@example.org"
	c, err := opsDial(imapAddr, false)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	home, err := c.backend(user, testUsers[user])
	if err != nil {
		t.Fatalf("login: %v\n%s", err, p.dump())
	}
	other := map[string]string{"b1": "b2", "b2": "b1"}[home]
	if _, err := client.KV().Put(&api.KVPair{Key: "imapgate/users/" + user, Value: []byte(other)}, nil); err != nil {
		t.Fatal(err)
	}
	if code, out := announce(user); code != 0 || !strings.Contains(out, user) {
		t.Fatalf("ctl announce: exit %d %q", code, out)
	}
	if err := c.waitClosed(10 * time.Second); err != nil {
		t.Errorf("the session on %s after the announced move to %s: %v", home, other, err)
	}
	c2, err := opsDial(imapAddr, false)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if got, err := c2.backend(user, testUsers[user]); err != nil || got != other {
		t.Errorf("login after the announce reached %q (%v), want %s", got, err, other)
	}

	consul.Stop(t)
	if code, out := announce(user); code != 1 || !strings.Contains(out, "consul reachable") {
		t.Errorf("ctl announce with Consul down: exit %d %q, want 1 and the 503's reason", code, out)
	}
}
